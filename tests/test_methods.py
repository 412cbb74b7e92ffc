"""Every fine-tuning method runs through the one job API and its result loads outside Tuneforge."""

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from app.jobs.schemas import PEFT_METHODS as ALL_METHODS
from tests.helpers import TEST_HOME, chat_jsonl, job_body, quantization_expected, upload, wait_for_status

# Every adapter method the API accepts; `full` and `freeze` ship whole models and are tested apart.
PEFT_METHODS = [m for m in ALL_METHODS if m not in ("full", "freeze")]
PEFT_TYPES = {
    **dict.fromkeys(("lora", "dora", "qlora", "lora_8bit"), "LORA"),
    "loha": "LOHA",
    "lokr": "LOKR",
    "ia3": "IA3",
    "prefix_tuning": "PREFIX_TUNING",
    "prompt_tuning": "PROMPT_TUNING",
    "p_tuning": "P_TUNING",
    "llama_adapter": "ADAPTION_PROMPT",
}
WEIGHT_FILES = {"adapter": "adapter_model.safetensors", "model": "model.safetensors"}


# What the quantized methods promise: bitsandbytes' 4-bit layers for QLoRA, its 8-bit ones for lora_8bit.
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
    first = unpack(
        TEST_HOME / "artifacts" / "checkpoints" / job["id"] / "attempt-1" / "step-1.tar.gz",
        tmp_path / "step1",
    )
    final_weights = load_file(final / WEIGHT_FILES["adapter"])
    assert changed_tensors(load_file(first / WEIGHT_FILES["adapter"]), final_weights), (
        "step 2 changed nothing"
    )

    base_dir = TEST_HOME / "models" / "tiny-llama"
    # Counted by the run from the layers of the model it trained: a fall-back to a full-precision base fails.
    quantization = json.loads((final / "tuneforge.json").read_text())["quantization"]
    assert quantization == quantization_expected(peft, base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    config = model.peft_config["default"]
    assert config.peft_type.value == PEFT_TYPES[peft]
    assert getattr(config, "use_dora", False) == (peft == "dora")
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits.isfinite().all()

    events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    counted = next(e["data"] for e in events if (e["data"] or {}).get("trainable_parameters"))
    if peft != "p_tuning":
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


def test_invalid_method_specs_are_400_naming_the_field(http: httpx.Client, training_id: str) -> None:
    body = job_body(training_id, peft="loha", target_modules=["q_proj", "no_such_proj"])
    error = http.post("/v1/fine_tuning/jobs", json=body)
    assert error.status_code == 400 and error.json()["error"]["param"].endswith("target_modules")
    unknown = http.post("/v1/fine_tuning/jobs", json=job_body(training_id, peft="adapterfusion"))
    assert unknown.status_code == 400 and unknown.json()["error"]["param"].endswith(".peft")


@pytest.fixture(scope="module")
def tiny_gpt2(database: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registered GPT-2: not Llama-family, and its Conv1D layers give bitsandbytes nothing to quantize."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from app.models.local import register_folder

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    ).save_pretrained(folder)
    register_folder("tiny-gpt2", folder)
    return "tiny-gpt2"


@pytest.mark.parametrize("peft", ["llama_adapter", "qlora", "lora_8bit"])
def test_method_the_model_cannot_take_is_400(
    http: httpx.Client, training_id: str, tiny_gpt2: str, peft: str
) -> None:
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training_id, peft=peft) | {"model": tiny_gpt2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (
        error["param"] == "method.supervised.hyperparameters.peft" and error["code"] == "unsupported_method"
    )
    assert tiny_gpt2 in error["message"]
