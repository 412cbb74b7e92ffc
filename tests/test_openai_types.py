"""Every object the openai SDK reads from Tuneforge validates against the SDK's own types, strictly.

The SDK itself never validates a response (it builds its models with `construct`), so a missing or
mistyped field only shows up later, in the user's code. Here each raw JSON answer goes through the SDK's
pydantic model with `strict=True`: no coercion, so `"created_at": "1700000000"` or `1.5` fails, as does a
value outside a `Literal` (a status or `object` OpenAI does not have). Strict mode alone is not enough,
though: the SDK gives every `Optional` field a default of None, so a field OpenAI's API reference always
sends (as null when empty), such as a job's `finished_at` or an error's `param`, could go missing
unnoticed. `check` therefore also walks the object and fails on any field the SDK requires or that
`ALWAYS_SENT` lists. `test_the_check_is_strict` proves the check fails on exactly those mistakes.
"""

import json
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest
from openai.pagination import SyncCursorPage, SyncPage
from openai.types import Completion, CompletionChoice, FileDeleted, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from openai.types.shared import ErrorObject

from tests.helpers import chat_jsonl, job_body, upload

# Fields OpenAI's API reference marks required (nullable) that the SDK's models give a None default.
ALWAYS_SENT: dict[type[pydantic.BaseModel], set[str]] = {
    FineTuningJob: {"error", "fine_tuned_model", "finished_at", "trained_tokens", "validation_file"},
    ErrorObject: {"param", "code"},
    ChatChoice: {"logprobs"},
    ChatCompletionMessage: {"content", "refusal"},
    ChunkChoice: {"finish_reason"},
    CompletionChoice: {"logprobs"},
}


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    """The pydantic models a field's annotation holds (through Optional, List, Union, Dict)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _missing(model: type[pydantic.BaseModel], obj: dict, path: str) -> Iterator[str]:
    """Fields of `obj` the SDK requires, or OpenAI always sends, that are absent, nested ones included."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in obj:
            if field.is_required() or key in ALWAYS_SENT.get(model, set()):
                yield f"{path}.{key}"
            continue
        nested = _models_in(field.annotation)
        if len(nested) != 1:  # no model, or a union of several that only validation can tell apart
            continue
        values = obj[key] if isinstance(obj[key], list) else [obj[key]]
        for i, value in enumerate(values):
            if isinstance(value, dict):
                where = f"{path}.{key}[{i}]" if isinstance(obj[key], list) else f"{path}.{key}"
                yield from _missing(nested[0], value, where)


def check(model: type[pydantic.BaseModel], obj: Any) -> Any:
    """`obj`, raw JSON from the server, as the SDK's `model` in strict mode, with nothing missing."""
    assert isinstance(obj, dict), obj
    parsed = model.model_validate(obj, strict=True)
    missing = sorted(_missing(model, obj, model.__name__))
    assert not missing, f"missing fields {missing} in {json.dumps(obj)[:500]}"
    return parsed


def check_error(response: httpx.Response, status: int) -> dict:
    """OpenAI's error envelope: {"error": ErrorObject} and nothing else."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    check(ErrorObject, body["error"])
    return body["error"]


def stream_chunks(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON objects of a server-sent event stream, up to [DONE]."""
    chunks, done = [], False
    with http.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line.removeprefix("data: ")))
    assert done and chunks
    return chunks


def as_finished(chunk: dict) -> dict:
    """A text completion stream chunk with its null finish reasons filled in, to check as a Completion.

    The SDK reads these chunks as Completion objects, whose choices' `finish_reason` it types for the whole
    answer; mid-stream it is null, as in OpenAI's own streams. Only a present null is filled in: a missing
    key, or any other value, is still checked.
    """
    choices = [
        choice | {"finish_reason": "stop"}
        if "finish_reason" in choice and choice["finish_reason"] is None
        else choice
        for choice in chunk["choices"]
    ]
    return chunk | {"choices": choices}


def test_files(http: httpx.Client) -> None:
    uploaded = upload(http, chat_jsonl(count=5))
    check(FileObject, uploaded)
    check(FileObject, http.get(f"/v1/files/{uploaded['id']}").json())
    check(SyncCursorPage[FileObject], http.get("/v1/files").json())
    check(FileDeleted, http.delete(f"/v1/files/{uploaded['id']}").json())


def test_jobs_events_and_checkpoints(http: httpx.Client, finished_job: dict) -> None:
    job_id = finished_job["id"]
    check(FineTuningJob, http.get(f"/v1/fine_tuning/jobs/{job_id}").json())
    page = http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()
    # Other tests' classification and paused jobs, and integrations other than W&B, use Tuneforge's
    # extensions, outside the SDK's literals.
    page["data"] = [
        job
        for job in page["data"]
        if job["method"]["type"] != "classification"
        and job["status"] != "paused"
        and all(i["type"] == "wandb" for i in job.get("integrations") or [])
    ]
    assert job_id in {job["id"] for job in page["data"]}
    check(SyncCursorPage[FineTuningJob], page)
    events = check(
        SyncCursorPage[FineTuningJobEvent], http.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    )
    assert events.data
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert check(SyncCursorPage[FineTuningJobCheckpoint], checkpoints).data

    # A job as created, and as cancelled before it ran.
    training = upload(http, chat_jsonl(count=5))
    created = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"]))
    check(FineTuningJob, created.json())
    check(FineTuningJob, http.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel").json())


def test_models(http: httpx.Client, finished_job: dict) -> None:
    models = check(SyncPage[Model], http.get("/v1/models").json())
    assert finished_job["fine_tuned_model"] in {m.id for m in models.data}
    check(Model, http.get(f"/v1/models/{finished_job['fine_tuned_model']}").json())
    check(Model, http.get("/v1/models/tiny-llama").json())


def test_chat_and_completions(http: httpx.Client) -> None:
    """Through the API, so these need the API to send the inference server its secret."""
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    answer = http.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    check(ChatCompletion, answer.json())
    for chunk in stream_chunks(
        http, "/v1/chat/completions", chat | {"stream_options": {"include_usage": True}}
    ):
        check(ChatCompletionChunk, chunk)
    several = chat | {"n": 2, "logprobs": True, "top_logprobs": 2}
    answer = http.post("/v1/chat/completions", json=several)
    assert answer.status_code == 200, answer.text
    assert all(c.logprobs and c.logprobs.content for c in check(ChatCompletion, answer.json()).choices)
    for chunk in stream_chunks(http, "/v1/chat/completions", several):
        check(ChatCompletionChunk, chunk)

    text = {"model": "tiny-llama", "prompt": ["The quick", "brown fox"], "max_tokens": 6, "logprobs": 2}
    answer = http.post("/v1/completions", json=text)
    assert answer.status_code == 200, answer.text
    assert len(check(Completion, answer.json()).choices) == 2
    for chunk in stream_chunks(http, "/v1/completions", text | {"stream_options": {"include_usage": True}}):
        check(Completion, as_finished(chunk))


def test_errors(server: str, http: httpx.Client) -> None:
    check_error(http.get("/v1/files/file-nope"), 404)
    check_error(httpx.get(f"{server}/v1/models"), 401)
    error = check_error(http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama"}), 400)
    assert error["param"] == "training_file"
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "n": 0}
    assert check_error(http.post("/v1/chat/completions", json=chat), 400)["param"] == "n"


def test_the_check_is_strict(http: httpx.Client, finished_job: dict) -> None:
    """A wrong type, a value outside a Literal, or a missing required or always-sent field fails `check`."""
    job = http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}").json()
    check(FineTuningJob, job)
    required = {name for name, field in FineTuningJob.model_fields.items() if field.is_required()}
    for key in sorted(required | ALWAYS_SENT[FineTuningJob]):
        with pytest.raises((AssertionError, pydantic.ValidationError)):
            check(FineTuningJob, {k: v for k, v in job.items() if k != key})
    wrong = {
        "created_at": str(job["created_at"]),  # a digit string, which lax mode would coerce
        "finished_at": float(job["finished_at"]) + 0.5,
        "seed": True,
        "status": "paused",  # Tuneforge's, not in the SDK's Literal
        "object": "fine_tuning.jobs",
        "result_files": "file-1",
        "hyperparameters": {"n_epochs": "1"},
        "error": {"message": "m"},  # an error without its code
    }
    for key, value in wrong.items():
        with pytest.raises((AssertionError, pydantic.ValidationError)):
            check(FineTuningJob, job | {key: value})
    with pytest.raises(AssertionError, match="param"):
        check(ErrorObject, {"message": "m", "type": "invalid_request_error", "code": None})
