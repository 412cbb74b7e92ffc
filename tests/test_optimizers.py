"""The `optimizer` hyperparameter: each choice trains through the API and the real worker with the optimizer
it names, the estimate counts its states as the real optimizer keeps them, and a device that cannot run a
paged optimizer (or Liger's kernels) refuses it: the API with a 400 naming the field, a CPU worker by failing
the job.

Which optimizer ran is read from the job's last checkpoint: Trainer saves the optimizer's state there, and
each optimizer keeps states of its own kind (torch's AdamW `exp_avg`, bitsandbytes' `state1` in uint8 for
8 bits, Adafactor's factored `exp_avg_sq_row`).
"""

import os
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from app.estimate import planner
from app.jobs.schemas import CUDA_ONLY_OPTIMIZERS, OPTIMIZERS, SupervisedHyperparameters
from tests.helpers import TEST_HOME, api_process, chat_jsonl, job_body, upload, wait_for_status
from worker.training.base_models import inspect_model
from worker.training.methods import ModelInfo, plan_for
from worker.training.optimizers import TRAINER_OPTIM

TINY = TEST_HOME / "models" / "tiny-llama"
CPU_OPTIMIZERS = [o for o in OPTIMIZERS if o not in CUDA_ONLY_OPTIMIZERS]
FIELD = "method.supervised.hyperparameters.optimizer"
# What each optimizer's saved state holds, as kind_of_state() reads it.
KINDS = {
    "adamw": "torch AdamW",
    "adamw_8bit": "bitsandbytes AdamW, 8-bit states",
    "paged_adamw_8bit": "bitsandbytes AdamW, 8-bit states",
    "paged_adamw_32bit": "bitsandbytes AdamW, 32-bit states",
    "adafactor": "Adafactor",
}


@pytest.fixture(scope="module")
def training_id(http: httpx.Client) -> str:
    return upload(http, chat_jsonl(16))["id"]


def full_job(training_id: str, optimizer: str) -> dict:
    """Every weight of tiny-llama trains: its larger matrices reach bitsandbytes' 4096-value 8-bit minimum."""
    return job_body(training_id, peft="full", optimizer=optimizer)


def kind_of_state(optimizer_state: dict) -> str:
    """Which optimizer saved this state dict, from the states it keeps."""
    # bitsandbytes nests its states one level down in a state dict (so that FSDP leaves them alone).
    states = [s | s.get("__bnb_optimizer_quant_state__", {}) for s in optimizer_state["state"].values()]
    keys = set().union(*states)
    if "exp_avg_sq_row" in keys:
        return "Adafactor"
    if "exp_avg" in keys:
        return "torch AdamW"
    if "state1" in keys:
        bits = {s["state1"].dtype for s in states}
        return f"bitsandbytes AdamW, {'8' if torch.uint8 in bits else '32'}-bit states"
    return f"unknown: {sorted(keys)}"


def saved_optimizer_state(job_id: str, into: Path) -> dict:
    """The optimizer state of the job's last checkpoint, from its resume archive in the artifact store."""
    archives = sorted((TEST_HOME / "artifacts" / "checkpoints" / job_id / "attempt-1").glob("*.state.tar"))
    with tarfile.open(archives[-1]) as archive:
        archive.extract("optimizer.pt", into, filter="data")
    return torch.load(into / "optimizer.pt", weights_only=True)


@pytest.mark.parametrize("optimizer", CPU_OPTIMIZERS)
def test_each_optimizer_trains_a_job_with_itself(
    optimizer: str, http: httpx.Client, training_id: str, tmp_path: Path
) -> None:
    job = http.post("/v1/fine_tuning/jobs", json=full_job(training_id, optimizer)).json()
    assert job["method"]["supervised"]["hyperparameters"]["optimizer"] == optimizer
    job = wait_for_status(http, job["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert kind_of_state(saved_optimizer_state(job["id"], tmp_path)) == KINDS[optimizer]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need a CUDA GPU")
@pytest.mark.parametrize("optimizer", list(CUDA_ONLY_OPTIMIZERS))
def test_paged_optimizers_train_on_a_gpu(
    optimizer: str, http: httpx.Client, training_id: str, tmp_path: Path
) -> None:
    job = http.post("/v1/fine_tuning/jobs", json=full_job(training_id, optimizer)).json()
    job = wait_for_status(http, job["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert kind_of_state(saved_optimizer_state(job["id"], tmp_path)) == KINDS[optimizer]


def api_for_workers_on(device: str, log_name: str):  # type: ignore[no-untyped-def]
    return api_process(os.environ | {"TUNEFORGE_WORKER_DEVICE": device}, log_name)


def test_a_cpu_deployment_refuses_paged_optimizers_and_liger_naming_the_field(
    api_key: str, training_id: str
) -> None:
    with api_for_workers_on("cpu", "api-cpu-workers.log") as (url, _):
        headers = {"Authorization": f"Bearer {api_key}"}
        for optimizer, unpaged in CUDA_ONLY_OPTIMIZERS.items():
            response = httpx.post(
                f"{url}/v1/fine_tuning/jobs", json=full_job(training_id, optimizer), headers=headers
            )
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == FIELD and error["type"] == "invalid_request_error"
            assert optimizer in error["message"] and f"'{unpaged}'" in error["message"]
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"optimizer": "paged_adamw_8bit"}}}
        response = httpx.post(
            f"{url}/v1/fine_tuning/jobs", json=job_body(training_id) | {"method": dpo}, headers=headers
        )
        assert response.json()["error"]["param"] == "method.dpo.hyperparameters.optimizer"
        # Liger's kernels are Triton kernels for CUDA.
        response = httpx.post(
            f"{url}/v1/fine_tuning/jobs", json=job_body(training_id, liger_kernels=True), headers=headers
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "method.supervised.hyperparameters.liger_kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU worker runs paged optimizers and Liger")
def test_a_cpu_worker_fails_paged_and_liger_jobs_naming_the_choice(
    api_key: str, http: httpx.Client, training_id: str
) -> None:
    # An API that believes its workers have GPUs queues them; a CPU worker taking one must not run it without
    # what it asked for (unpaged, or without the kernels).
    bodies = [full_job(training_id, "paged_adamw_8bit"), job_body(training_id, liger_kernels=True)]
    with api_for_workers_on("cuda", "api-gpu-workers.log") as (url, _):
        headers = {"Authorization": f"Bearer {api_key}"}
        responses = [httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, headers=headers) for body in bodies]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    paged, liger = (wait_for_status(http, r.json()["id"], {"succeeded", "failed"}) for r in responses)
    assert paged["status"] == "failed", paged
    assert "optimizer 'paged_adamw_8bit'" in paged["error"]["message"], paged["error"]
    assert "'adamw_8bit'" in paged["error"]["message"]
    assert liger["status"] == "failed", liger
    assert "liger_kernels" in liger["error"]["message"] and "no GPU" in liger["error"]["message"], liger


def test_the_estimate_refuses_paged_optimizers_on_cpu_only(http: httpx.Client, training_id: str) -> None:
    for optimizer in CUDA_ONLY_OPTIMIZERS:
        body = full_job(training_id, optimizer)
        on_cpu = http.post("/v1/fine_tuning/estimate", json=body | {"device": "cpu"})
        assert on_cpu.status_code == 400 and on_cpu.json()["error"]["param"] == FIELD, on_cpu.text
        on_gpu = http.post("/v1/fine_tuning/estimate", json=body | {"device": "cuda"})
        assert on_gpu.status_code == 200, on_gpu.text


def measured_state_bytes(peft: str, optimizer: str, tmp_path: Path) -> tuple[int, int]:
    """Bytes of state the real optimizer, as Trainer builds it, keeps for tiny-llama after one step, and
    how many tensors it keeps state for. On a CPU bitsandbytes runs a paged optimizer unpaged: same bytes."""
    hp = SupervisedHyperparameters(peft=peft).resolved().model_dump()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    plan = plan_for(hp, ModelInfo(inspect_model(TINY)["linear_modules"], model.config.num_hidden_layers))
    if plan.peft_config is not None:
        model = get_peft_model(model, plan.peft_config)
    args = TrainingArguments(tmp_path, optim=TRAINER_OPTIM[optimizer], report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    step = trainer.create_optimizer()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    step.step()
    storages = {}  # bitsandbytes shares its quantization maps between tensors: count memory once
    for state in step.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values()), len(step.state)


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_the_estimate_counts_each_optimizers_states(
    peft: str, http: httpx.Client, training_id: str, tmp_path: Path
) -> None:
    profile = inspect_model(TINY)
    planned = {}
    for optimizer in OPTIMIZERS:
        hp = SupervisedHyperparameters(peft=peft, optimizer=optimizer).resolved().model_dump()
        planned[optimizer] = planner.plan_method(profile, hp, peft=peft, device="cpu").optimizer_states
        measured, tensors = measured_state_bytes(peft, optimizer, tmp_path)
        # Left out of the plan: a 4-byte step or RMS scalar per tensor, bitsandbytes' 2 KiB quantization maps.
        assert 0 <= measured - planned[optimizer] <= 4 * tensors + 2048, (optimizer, measured, planned)
    # Equal for LoRA on tiny-llama: its adapter matrices are under bitsandbytes' 4096-value 8-bit minimum.
    assert planned["adafactor"] < planned["adamw_8bit"] <= planned["adamw"]
    assert planned["paged_adamw_8bit"] == planned["adamw_8bit"]
    assert planned["paged_adamw_32bit"] == planned["adamw"]
    # The API plans the same, and on cuda adds the fp32 master copy of trainable base weights only.
    for device in ("cpu", "cuda"):
        body = job_body(training_id, peft=peft, optimizer="adafactor") | {"device": device}
        answer = http.post("/v1/fine_tuning/estimate", json=body).json()["estimates"][0]
        master = 4 * answer["trainable_parameters"] if device == "cuda" and peft == "full" else 0
        assert answer["bytes"]["optimizer_states"] == planned["adafactor"] + master
