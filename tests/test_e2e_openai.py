"""The whole flow through the official `openai` SDK, then the adapter loaded with plain PEFT."""

import io
import json
import tarfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import TEST_HOME, chat_jsonl, wait_for_status

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(server: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)


def test_sdk_drives_the_whole_flow(client: openai.OpenAI, http: httpx.Client, tmp_path: Path) -> None:
    training = client.files.create(file=("train.jsonl", chat_jsonl(48)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", chat_jsonl(8, offset=100)), purpose="fine-tune")
    assert training.id in {f.id for f in client.files.list()}

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        validation_file=validation.id,
        suffix="sdk",
        seed=3,
        metadata={"team": "e2e"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 8,
                    "learning_rate_multiplier": 10,
                    "checkpoint_every_steps": 3,
                }
            },
        },
    )
    assert job.status == "queued" and job.metadata == {"team": "e2e"}
    done = wait_for_status(http, job.id, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model == f"ft:tiny-llama:sdk:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at and job.finished_at >= job.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5).iter_pages())
    all_events = [e for page in events for e in page.data]
    assert len(events) > 1, "events must page"
    # Training steps; the validation passes (at the checkpoints) are `metrics` events without a train_loss
    metrics = [e for e in all_events if e.type == "metrics" and "train_loss" in e.data]
    assert {m.data["step"] for m in metrics} == set(range(1, 13))  # 48 examples / 8 per step * 2 epochs
    assert all({"train_loss", "learning_rate", "tokens_per_second"} <= set(m.data) for m in metrics)
    assert any("successfully completed" in e.message for e in all_events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 9, 6]  # the newest TUNEFORGE_KEEP_CHECKPOINTS
    assert all(c.metrics.valid_loss and c.metrics.train_loss for c in checkpoints)

    models = {m.id for m in client.models.list()}
    assert {"tiny-llama", job.fine_tuned_model} <= models
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "alpha"

    archive = client.get(f"/models/{job.fine_tuned_model}/adapter", cast_to=httpx.Response).content
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(adapter_dir, filter="data")
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tuneforge.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pkl"))}, "no pickles in artifacts"
    manifest = json.loads((adapter_dir / "tuneforge.json").read_text())
    assert manifest["seed"] == 3 and manifest["base_model"] == "tiny-llama"
    assert len(manifest["training_data_sha256"]) == 64
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["library_versions"])
    assert "train_loss" in manifest["metrics"] and "valid_loss" in manifest["metrics"]

    base_dir = TEST_HOME / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 5 plus 5?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(**prompt).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        tuned_logits = tuned(**prompt).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4), (
        "the adapter must change the model's output"
    )


def test_jobs_page_with_after_and_has_more(client: openai.OpenAI, http: httpx.Client) -> None:
    training = client.files.create(file=("t.jsonl", chat_jsonl(4)), purpose="fine-tune")
    created = []
    for _ in range(3):
        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id)
        created.append(client.fine_tuning.jobs.cancel(job.id).id)  # keep the worker free
    first = client.fine_tuning.jobs.list(limit=2)
    assert first.has_more and [j.id for j in first.data] == created[::-1][:2]
    second = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == created[0]
    seen = [j.id for j in client.fine_tuning.jobs.list(limit=1)]  # auto-pagination over every page
    assert seen[:3] == created[::-1] and len(seen) == len(set(seen))


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    assert "ftjob-nope" in missing.value.message
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{oops\n"), purpose="fine-tune")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="tf-wrong", max_retries=0).models.list()
