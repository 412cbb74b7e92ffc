"""DPO jobs: OpenAI's preference format through the API and the SDK, trained with TRL on tiny-llama.

The pairs prefer an arithmetic answer over a refusal, a pattern even a random tiny model can pick up, so
the tests can check that DPO did its job: the preferred answers gained log-probability over the rejected
ones, relative to the base model, measured here with plain torch on the downloaded adapter.
"""

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from sqlalchemy import text
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.db.session import get_engine
from app.jobs.schemas import DpoHyperparameters
from tests.helpers import (
    QUANTIZED_METHODS,
    TEST_HOME,
    chat_jsonl,
    is_training_step,
    quantization_expected,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)
from worker.training import dpo
from worker.training.methods import ModelInfo, plan_for
from worker.training.sft import RunSpec

BASE_DIR = TEST_HOME / "models" / "tiny-llama"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def pair(i: int) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
        "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
    }


def preference_jsonl(count: int, offset: int = 0) -> bytes:
    return "".join(json.dumps(pair(i)) + "\n" for i in range(offset, offset + count)).encode()


def dpo_body(training_file: str, **hyperparameters: object) -> dict:
    hp = {"n_epochs": 1, "batch_size": 8} | hyperparameters
    return {
        "model": "tiny-llama",
        "training_file": training_file,
        "seed": 11,
        "method": {"type": "dpo", "dpo": {"hyperparameters": hp}},
    }


def run_job(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return job


def events_of(http: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, oldest first (the API pages newest first, 100 at most)."""
    events: list[dict] = []
    params: dict = {"limit": 100}
    while True:
        page = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events[::-1]
        params["after"] = page["data"][-1]["id"]


def unpack(archive: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def completion_logp(model: Any, tokenizer: Any, prompt: list[dict], completion: list[dict]) -> float:
    """log p(completion | prompt) under `model`, summed over the completion's tokens."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    per_token = logps.gather(1, targets[:, None])[:, 0]
    return per_token[len(prompt_ids) - 1 :].sum().item()


def preference_margins(model: Any, tokenizer: Any, pairs: list[dict]) -> torch.Tensor:
    """log p(preferred) - log p(non-preferred) for each pair."""
    return torch.tensor(
        [
            completion_logp(model, tokenizer, p["input"]["messages"], p["preferred_output"])
            - completion_logp(model, tokenizer, p["input"]["messages"], p["non_preferred_output"])
            for p in pairs
        ]
    )


def test_lora_dpo_job_widens_the_preference_margin_and_loads_with_plain_peft(
    http: httpx.Client, tmp_path: Path
) -> None:
    training = upload(http, preference_jsonl(48))
    validation = upload(http, preference_jsonl(8, offset=100), filename="valid.jsonl")
    body = dpo_body(training["id"], n_epochs=2, batch_size=4, beta=0.2, learning_rate_multiplier=5)
    job = run_job(http, body | {"validation_file": validation["id"], "suffix": "prefs"})
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2

    events = events_of(http, job["id"])
    steps = [e["data"] for e in events if is_training_step(e)]
    assert [s["step"] for s in steps] == list(range(1, 25))  # 48 pairs / 4 a step * 2 epochs
    # At step 1 the policy is the reference (a fresh adapter starts as a no-op), so DPO's loss is log 2.
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 0.05
    reference = next(e["data"] for e in events if "reference_model" in (e["data"] or {}))
    assert reference == {"reference_model": "base_with_adapters_disabled"}
    prepared = next(e["data"] for e in events if e["message"].startswith("Training on 48 preference pairs"))
    assert job["trained_tokens"] == 2 * prepared["tokens"]
    finished = next(e["data"] for e in events if e["message"].startswith("Training finished"))
    assert finished["valid_loss"] < math.log(2) and finished["train_rewards/accuracies"] > 0.9
    assert finished["train_rewards/margins"] > 0 and finished["peak_memory_mb"] is not None

    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [24, 12]  # one per epoch
    assert all(c["metrics"]["valid_loss"] < math.log(2) for c in checkpoints)
    assert all(c["metrics"]["valid_rewards/margins"] > 0 for c in checkpoints)

    adapter_dir = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "a")
    manifest = json.loads((adapter_dir / "tuneforge.json").read_text())
    assert manifest["method"]["type"] == "dpo" and "valid_loss" in manifest["metrics"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "PEFT starts lora_B at zero; training moves it"

    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), adapter_dir).eval()
    pairs = [pair(i) for i in range(48)]
    # DPO's implicit reward margin, beta * (policy margin - reference margin), is 0 before training.
    reward_margin = 0.2 * (
        preference_margins(tuned, tokenizer, pairs) - preference_margins(base, tokenizer, pairs)
    )
    assert reward_margin.mean() > 0.1 and (reward_margin > 0).float().mean() > 0.9, reward_margin
    held_out = [pair(i) for i in range(200, 208)]  # unseen numbers: the preference generalises
    tuned_margins = preference_margins(tuned, tokenizer, held_out)
    assert (tuned_margins > preference_margins(base, tokenizer, held_out)).all()


def test_full_dpo_keeps_a_frozen_reference_copy(http: httpx.Client, tmp_path: Path) -> None:
    training = upload(http, preference_jsonl(16))
    job = run_job(http, dpo_body(training["id"], peft="full"))
    events = events_of(http, job["id"])
    reference = next(e for e in events if "reference_model" in (e["data"] or {}))
    assert (
        reference["data"] == {"reference_model": "frozen_copy"}
        and "twice the weight memory" in reference["message"]
    )
    counted = next(e["data"] for e in events if "trainable_parameters" in (e["data"] or {}))
    assert counted["trainable_parameters"] == counted["total_parameters"]
    steps = [e["data"] for e in events if is_training_step(e)]
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)  # the copy equals the start

    model_dir = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "m")
    base, tuned = load_file(BASE_DIR / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(base[name], tensor) for name, tensor in tuned.items())
    AutoModelForCausalLM.from_pretrained(model_dir)  # loads with plain transformers


@pytest.mark.parametrize("peft", QUANTIZED_METHODS)
def test_quantized_dpo_trains_on_a_quantized_base(http: httpx.Client, tmp_path: Path, peft: str) -> None:
    job = run_job(http, dpo_body(upload(http, preference_jsonl(8))["id"], peft=peft))  # one step
    adapter_dir = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path)
    manifest = json.loads((adapter_dir / "tuneforge.json").read_text())
    assert manifest["quantization"] == quantization_expected(peft, BASE_DIR)
    reference = next(e["data"] for e in events_of(http, job["id"]) if "reference_model" in (e["data"] or {}))
    assert reference == {"reference_model": "base_with_adapters_disabled"}  # the quantized base, once


def test_reference_is_the_base_with_the_adapter_disabled(tiny_model: str, tmp_path: Path) -> None:
    """In process, on the recipe's own trainer: no second model, and reference log-probs are the base's."""
    (tmp_path / "train.jsonl").write_bytes(preference_jsonl(16))
    hp = DpoHyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=5).resolved().model_dump()
    spec = RunSpec(
        job_id="ftjob-local",
        attempt=1,
        base_model=tiny_model,
        base_model_path=BASE_DIR,
        linear_modules=ATTENTION,
        profile={},
        hyperparameters=hp,
        method={"type": "dpo", "dpo": {"hyperparameters": hp}},
        seed=5,
        training_file=tmp_path / "train.jsonl",
        training_file_id="file-local",
        validation_file=None,
        validation_file_id=None,
        workdir=tmp_path / "work",
    )
    plan = plan_for(hp, ModelInfo(linear_modules=ATTENTION, num_layers=2))
    tokenizer, model, train, valid = dpo.setup(spec, plan)
    trainer = dpo.build_trainer(spec, plan, tokenizer, model, train, valid, callbacks=[])
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)

    base = AutoModelForCausalLM.from_pretrained(BASE_DIR).eval()
    base_count = sum(p.numel() for p in base.parameters())
    adapter_count = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in trainer.model.parameters()) == base_count + adapter_count

    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    def logps(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        per_token = torch.log_softmax(out.float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        return (per_token * batch["completion_mask"][:, 1:]).sum(1)

    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), logps(base), atol=1e-3)
    trainer.model.eval()
    assert not torch.allclose(logps(trainer.model), logps(base), atol=1e-3), "the adapter trained"


def test_cancel_stops_a_dpo_job_within_the_step_in_flight(http: httpx.Client) -> None:
    """A cancel that lands between steps 2 and 3 stops the run at the end of step 3, with nothing after it.

    Where the run is when the cancel commits is fixed, not timed: the test holds a lock on the checkpoints
    table, so the run's checkpoint of step 2, written after step 2's status check and metrics, waits in
    its database write until the cancel has committed. Step 3 is then the step in flight.
    """
    training = upload(http, preference_jsonl(64))
    body = dpo_body(training["id"], n_epochs=3, batch_size=1, checkpoint_every_steps=2)
    with get_engine().connect() as connection, connection.begin():
        connection.execute(text("LOCK TABLE checkpoints IN SHARE MODE"))  # reads pass, writes wait
        job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        wait_for_step(http, job_id, 2)
        assert http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    stopped = wait_for_event(http, job_id, "Training stopped at step")
    steps = [e["data"]["step"] for e in events_of(http, job_id) if is_training_step(e)]
    assert stopped["data"]["step"] == 3 and max(steps) <= 3, (stopped["message"], steps)
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None


def test_sdk_creates_a_dpo_job(server: str, api_key: str, http: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    training = client.files.create(file=("prefs.jsonl", preference_jsonl(16)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 8}}},
    )
    assert job.status == "queued"
    assert wait_for_status(http, job.id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.method is not None and done.method.type == "dpo"
    assert done.method.dpo is not None and done.method.dpo.hyperparameters is not None
    assert done.method.dpo.hyperparameters.beta == 0.1
    assert done.fine_tuned_model in {m.id for m in client.models.list()}


def test_bad_dpo_requests_name_what_is_wrong(http: httpx.Client) -> None:
    preferences = upload(http, preference_jsonl(4))["id"]
    chat = http.post("/v1/fine_tuning/jobs", json=dpo_body(upload(http, chat_jsonl(4))["id"]))
    assert chat.status_code == 400
    assert chat.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "training_file",
        "code": "invalid_file_format",
    }
    prefix = http.post("/v1/fine_tuning/jobs", json=dpo_body(preferences, peft="prefix_tuning"))
    assert prefix.status_code == 400
    assert prefix.json()["error"]["param"] == "method.dpo.hyperparameters.peft"
    for beta in (0, -0.5):
        response = http.post("/v1/fine_tuning/jobs", json=dpo_body(preferences, beta=beta))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "method.dpo.hyperparameters.beta"

    lines = [pair(0), pair(1) | {"preferred_output": [{"role": "user", "content": "2 plus 2 is 4."}]}]
    bad = http.post(
        "/v1/files",
        files={"file": ("bad.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())},
        data={"purpose": "fine-tune"},
    )
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["code"] == "invalid_preferred_output" and "line 2" in error["message"]
