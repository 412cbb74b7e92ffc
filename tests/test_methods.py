"""Every fine-tuning method runs through the one job API and its result loads outside Tuneforge."""

import io
import tarfile
from pathlib import Path
from typing import get_args

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from app.jobs.schemas import PeftMethod
from tests.helpers import TEST_HOME, chat_jsonl, job_body, upload, wait_for_status

# Every adapter method the API accepts; `full` and `freeze` ship whole models and are tested apart.
PEFT_METHODS = [m for m in get_args(PeftMethod) if m not in ("full", "freeze")]
WEIGHT_FILES = {"adapter": "adapter_model.safetensors", "model": "model.safetensors"}


def unpack(archive: Path | bytes, into: Path) -> Path:
    source = io.BytesIO(archive) if isinstance(archive, bytes) else archive.open("rb")
    with tarfile.open(fileobj=source) as tar:
        tar.extractall(into, filter="data")
    return into


def run_method(http: httpx.Client, training_id: str, peft: str, **extra: object) -> dict:
    body = job_body(training_id, peft=peft, checkpoint_every_steps=1, **extra)
    job = wait_for_status(
        http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
    )
    assert job["status"] == "succeeded", job
    return job


def changed_tensors(first: dict[str, torch.Tensor], last: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in last.items() if not torch.equal(tensor, first[name])]


@pytest.fixture(scope="module")
def training_id(http: httpx.Client) -> str:
    return upload(http, chat_jsonl(16))["id"]


@pytest.mark.parametrize("peft", PEFT_METHODS)
def test_peft_method_trains_and_loads_with_plain_peft(
    peft: str, http: httpx.Client, training_id: str, tmp_path: Path
) -> None:
    job = run_method(http, training_id, peft)
    final = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "final")
    first = unpack(TEST_HOME / "artifacts" / "checkpoints" / job["id"] / "step-1.tar.gz", tmp_path / "step1")
    final_weights = load_file(final / WEIGHT_FILES["adapter"])
    assert changed_tensors(load_file(first / WEIGHT_FILES["adapter"]), final_weights), (
        "step 2 changed nothing"
    )

    base_dir = TEST_HOME / "models" / "tiny-llama"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    assert model.peft_config["default"].peft_type.value.lower().replace("_", "") in {
        "lora",
        "prefixtuning",
        "prompttuning",
        "ptuning",
        "ia3",
        "loha",
        "lokr",
    }
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits.isfinite().all()

    events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    counted = next(e["data"] for e in events if (e["data"] or {}).get("trainable_parameters"))
    if peft in ("lora", "dora", "loha", "lokr", "ia3", "prefix_tuning", "prompt_tuning"):
        # What trained is what ships (p-tuning ships the encoder's output, not the encoder).
        assert counted["trainable_parameters"] == sum(t.numel() for t in final_weights.values())
    assert 0 < counted["trainable_parameters"] < counted["total_parameters"]


def test_freeze_trains_only_the_top_blocks_and_head(
    http: httpx.Client, training_id: str, tmp_path: Path
) -> None:
    job = run_method(http, training_id, "freeze", n_trainable_layers=1, learning_rate_multiplier=20)
    final = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "final")
    base = load_file(TEST_HOME / "models" / "tiny-llama" / WEIGHT_FILES["model"])
    tuned = load_file(final / WEIGHT_FILES["model"])
    changed = set(changed_tensors(base, tuned))
    assert changed, "the top block and head must change"
    assert all(name.startswith(("model.layers.1.", "lm_head.")) for name in changed), changed
    assert not any(name.startswith(("model.layers.0.", "model.embed_tokens")) for name in changed)
    AutoModelForCausalLM.from_pretrained(final)  # loads with plain transformers


def test_invalid_method_specs_are_422_naming_the_field(http: httpx.Client, training_id: str) -> None:
    body = job_body(training_id, peft="loha", target_modules=["q_proj", "no_such_proj"])
    error = http.post("/v1/fine_tuning/jobs", json=body)
    assert error.status_code == 422 and error.json()["error"]["param"].endswith("target_modules")
    unknown = http.post("/v1/fine_tuning/jobs", json=job_body(training_id, peft="adapterfusion"))
    assert unknown.status_code == 422 and unknown.json()["error"]["param"].endswith(".peft")
