"""Chat and text completions through the API (key -> project -> inference server), with the openai SDK.

The `server` stack runs the inference server as its own process; `finished_job` trains while that stack
is up, so chatting with its model here also shows a new model is served without a restart.
"""

import os

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.helpers import api_process, chat_jsonl, job_body, upload

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]


def sdk(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def chat_both_ways(client: openai.OpenAI, model: str) -> str:
    """The greedy answer of `model`, checked equal whether streamed or not; usage reported both ways."""
    whole = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.model == model
    assert whole.usage is not None and whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = whole.choices[0].message.content
    assert streamed == answer
    assert chunks[-1].usage == whole.usage
    assert answer is not None
    return answer


def test_chat_with_base_and_fine_tuned_model(server: str, api_key: str, finished_job: dict) -> None:
    client = sdk(server, api_key)
    base = chat_both_ways(client, "tiny-llama")
    tuned = chat_both_ways(client, finished_job["fine_tuned_model"])
    assert tuned != base  # the adapter is applied, not silently the base model

    text = client.completions.create(model="tiny-llama", prompt="3 plus 3 is", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.usage is not None and text.usage.completion_tokens == 5


def test_errors_pass_through_in_openai_shapes(
    server: str, api_key: str, other_key: str, finished_job: dict, http: httpx.Client
) -> None:
    client = sdk(server, api_key)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.NotFoundError):  # another project's model is not found, never forbidden
        sdk(server, other_key).chat.completions.create(
            model=finished_job["fine_tuned_model"], messages=QUESTION
        )
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "tf-not-a-key").chat.completions.create(model="tiny-llama", messages=QUESTION)
    no_key = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny-llama", "messages": QUESTION})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"

    # A job that has not succeeded: its model id is known but not ready.
    training = upload(http, chat_jsonl())
    job = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()
    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model=f"ft:tiny-llama::{job['id']}", messages=QUESTION)
    assert conflict.value.code == "model_not_ready"

    long_message = [{"role": "user", "content": "seven " * 600}]  # tiny-llama's context is 512 tokens
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny-llama", messages=long_message, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"

    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    for body in (b"[1, 2]", b"not json"):
        response = httpx.post(f"{server}/v1/completions", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"


def test_what_the_spec_allows_and_what_is_not_implemented(
    server: str, api_key: str, http: httpx.Client
) -> None:
    """Nulls, several prompts and token ids pass through the API; unimplemented fields are 400 naming them."""
    client = sdk(server, api_key)
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "max_tokens": 4}
    answer = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": QUESTION} | nulls)
    assert answer.status_code == 200, answer.text

    several = client.completions.create(model="tiny-llama", prompt=[[20, 30, 40], [50, 60]], temperature=0)
    assert [choice.index for choice in several.choices] == [0, 1]
    assert several.usage is not None and several.usage.completion_tokens <= 2 * 16  # 16 each by default

    refused = {
        "n": {"n": 129},
        "tool_choice": {"tool_choice": "required"},  # with no tools to call
        "response_format.type": {"response_format": {"type": "xml"}},
        "top_logprobs": {"top_logprobs": 2},
        "temperature": {"temperature": 3},
        "max_tokens": {"max_tokens": 0},
    }
    for param, fields in refused.items():
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny-llama", messages=QUESTION, **fields)  # type: ignore[call-overload]
        assert error.value.param == param, error.value.body


def test_unreachable_inference_server_is_503_and_not_unready(api_key: str, database: str) -> None:
    """An API pointed at a port nothing listens on: ready (inference is optional), chat says how to fix it."""
    env = os.environ | {"TUNEFORGE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}
    with api_process(env, "api-no-inference.log") as (base_url, _):
        ready = httpx.get(f"{base_url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["inference"].startswith("unavailable")

        with pytest.raises(openai.InternalServerError) as error:
            sdk(base_url, api_key).chat.completions.create(model="tiny-llama", messages=QUESTION)
        assert error.value.status_code == 503 and error.value.code == "inference_unavailable"
        assert "tuneforge serve" in error.value.message
