"""What the README promises about a finished job's artifact, checked against where each value comes from.

README: the adapter archive holds `tuneforge.json` "(resolved spec, training-data sha256, base model
revision, seed, library versions, final metrics)". Each field is compared with its source: the bytes
that were uploaded, the weights of the base model as registered, the job as the API reports it, the
libraries installed here, and the metrics the run reported while it trained.
"""

import hashlib
import io
import json
import tarfile
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from app.db.session import session_scope
from app.models import service as model_service
from tests.helpers import all_events, chat_jsonl, is_training_step


def manifest_of(http: httpx.Client, model_id: str) -> dict:
    """`tuneforge.json` from the adapter archive the API serves for `model_id`."""
    archive = http.get(f"/v1/models/{model_id}/adapter")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        member = tar.extractfile("tuneforge.json")
        assert member is not None
        return json.loads(member.read())


def registered_revision(model_id: str) -> str:
    """The revision of a registered base model: the sha256 of its weight files' sha256s, in name order."""
    with session_scope() as session:
        folder = Path(model_service.get_base_model(session, model_id=model_id).path or "")
    weights = sorted(folder.glob("*.safetensors"))
    assert weights, folder
    digests = "".join(hashlib.sha256(path.read_bytes()).hexdigest() for path in weights)
    return hashlib.sha256(digests.encode()).hexdigest()


def test_manifest_records_what_made_the_adapter(http: httpx.Client, finished_job: dict) -> None:
    job = http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}").json()
    manifest = manifest_of(http, job["fine_tuned_model"])

    # The resolved spec: the job as the API reports it, no `auto` left in it.
    assert manifest["tuneforge_job_id"] == job["id"]
    assert manifest["method"] == job["method"]
    hyperparameters = manifest["method"]["supervised"]["hyperparameters"]
    assert "auto" not in hyperparameters.values(), hyperparameters
    assert (hyperparameters["n_epochs"], hyperparameters["batch_size"]) == (1, 8)  # what finished_job asked

    # The training data: the sha256 of the bytes finished_job uploaded.
    assert manifest["training_file"] == job["training_file"]
    assert manifest["training_data_sha256"] == hashlib.sha256(chat_jsonl()).hexdigest()
    assert manifest["validation_file"] is None and manifest["validation_data_sha256"] is None

    # The base model and its revision, from the weights the registry points at.
    assert manifest["base_model"] == job["model"] == "tiny-llama"
    assert manifest["base_model_revision"] == registered_revision("tiny-llama")

    assert manifest["seed"] == job["seed"] == 7
    for name, installed in manifest["library_versions"].items():
        assert installed == version(name), name
    assert {"torch", "transformers", "peft", "trl"} <= manifest["library_versions"].keys()

    # The final metrics: those the run reported, and what the job counted.
    steps = [event["data"] for event in all_events(http, job["id"]) if is_training_step(event)]
    metrics = manifest["metrics"]
    assert metrics["steps"] == max(step["step"] for step in steps) == 5  # 40 examples at batch 8
    # Trainer's train_loss is the mean of the logged step losses (one log per step).
    assert metrics["train_loss"] == pytest.approx(sum(s["train_loss"] for s in steps) / len(steps), rel=1e-3)
    assert manifest["trained_tokens"] == job["trained_tokens"]
