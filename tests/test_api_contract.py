"""The API behaves as OpenAI's where the SDK looks: bounds, 400s, lists, time zones, checkpoint models."""

import io
import os
import tarfile
import time

import httpx
import openai
import pytest

from tests.helpers import api_process, chat_jsonl, job_body, upload


@pytest.fixture(scope="module")
def client(server: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def training_id(http: httpx.Client) -> str:
    return upload(http, chat_jsonl(4))["id"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ],
)
def test_out_of_range_values_are_bad_requests_naming_them(
    client: openai.OpenAI, training_id: str, change: dict, param: str
) -> None:
    """OpenAI's bounds; the SDK raises BadRequestError (400), never a 5xx or a 422."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(**{"model": "tiny-llama", "training_file": training_id} | change)
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"lora_r": 2000}, "lora_r"),
        ({"max_seq_length": 10**9}, "max_seq_length"),
        ({"max_seq_length": 4096}, "max_seq_length"),  # within our cap, beyond tiny-llama's 512 positions
        ({"gradient_accumulation_steps": 10**6}, "gradient_accumulation_steps"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"peft": "freeze", "n_trainable_layers": 3}, "n_trainable_layers"),  # tiny-llama has 2 blocks
    ],
)
def test_method_hyperparameters_have_bounds(
    http: httpx.Client, training_id: str, hyperparameters: dict, field: str
) -> None:
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training_id, **hyperparameters))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == f"method.supervised.hyperparameters.{field}"


def test_dpo_beta_is_at_most_two(http: httpx.Client, training_id: str) -> None:
    body = job_body(training_id) | {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}}
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "method.dpo.hyperparameters.beta"


def test_the_largest_seed_and_a_64_character_suffix_are_accepted(
    client: openai.OpenAI, training_id: str
) -> None:
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_id, seed=2**31 - 1, suffix="s" * 64
    )
    client.fine_tuning.jobs.cancel(job.id)  # keep the worker free
    assert job.seed == 2**31 - 1 and job.suffix == "s" * 64


def test_job_lists_filter_by_metadata_and_clamp_the_limit(client: openai.OpenAI, training_id: str) -> None:
    tag = f"run-{time.monotonic_ns()}"
    tagged = []
    for color in ("red", "blue", "red"):
        job = client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training_id, metadata={"tag": tag, "color": color}
        )
        tagged.append((client.fine_tuning.jobs.cancel(job.id).id, color))
    red = client.fine_tuning.jobs.list(metadata={"tag": tag, "color": "red"})
    assert [j.id for j in red.data] == [job_id for job_id, color in reversed(tagged) if color == "red"]
    assert client.fine_tuning.jobs.list(metadata={"tag": "no-such-tag"}).data == []
    clamped = client.fine_tuning.jobs.list(limit=100_000)  # clamped, not refused
    assert 3 <= len(clamped.data) <= 100


def test_timestamps_are_right_under_another_time_zone(database: str, api_key: str) -> None:
    """Stored times are UTC; an API process whose local zone is New York still reports Unix time."""
    env = os.environ | {"TZ": "America/New_York"}
    with api_process(env, "new-york-api.log") as (url, _):
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        created = upload(http, chat_jsonl(2))
        assert abs(created["created_at"] - time.time()) < 120, created
        listed = http.get("/v1/files", params={"limit": 1}).json()["data"][0]
        assert abs(listed["created_at"] - time.time()) < 120, listed


def test_checkpoints_are_models(
    client: openai.OpenAI, http: httpx.Client, other_http: httpx.Client, finished_job: dict
) -> None:
    """A checkpoint's `fine_tuned_model_checkpoint` can be retrieved, chatted with and downloaded."""
    checkpoints = client.fine_tuning.jobs.checkpoints.list(finished_job["id"]).data
    assert checkpoints, "the fixture's job saves checkpoints"
    checkpoint = checkpoints[-1].fine_tuned_model_checkpoint  # the oldest kept
    assert checkpoint.startswith(finished_job["fine_tuned_model"] + ":ckpt-step-")

    model = client.models.retrieve(checkpoint)
    assert model.id == checkpoint and model.owned_by == "alpha"
    answer = client.chat.completions.create(
        model=checkpoint, messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=4
    )
    assert answer.model == checkpoint and answer.choices[0].message.content is not None

    archive = http.get(f"/v1/models/{checkpoint}/adapter")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(tar.getnames())

    missing = checkpoint.rsplit("-", 1)[0] + "-99999"
    for caller, model_id in ((other_http, checkpoint), (http, missing)):  # another project's; no such step
        unknown = caller.get(f"/v1/models/{model_id}")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found"), (
            unknown.text
        )
    refused = http.delete(f"/v1/models/{checkpoint}")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "checkpoint_not_deletable"
