"""The inference engine and server (worker/serving): mixed-adapter batches, LRU residency, sampling, HTTP.

Adapters are built without training: a LoRA PeftModel over tiny-llama whose lora_B weights are set to
seeded random values, so each adapter changes the model's answers in its own way.
"""

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pydantic
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import free_port
from tests.helpers import api_process, scrape, serving_process
from tests.helpers import sample as metric_sample
from worker.serving.app import create_app, run_server
from worker.serving.batcher import Batcher, Order
from worker.serving.decode import sample
from worker.serving.engine import Engine, GenerationRequest, PromptTooLong, Refused, Target, adapter_name
from worker.training.base_models import make_tiny_llama

BASE = "serving-tiny"
SECRET = f"test-inference-secret-{uuid.uuid4().hex}"  # what the API sends as its bearer token
QUESTIONS = ["What is 2 plus 2?", "Tell me a joke.", "Who wrote Romeo and Juliet?", "How are you?", "Hi"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / BASE
    make_tiny_llama(folder, seed=0)
    return folder


def make_lora(base_folder: Path, dest: Path, seed: int, config: LoraConfig | None = None) -> Path:
    """A LoRA adapter as training leaves one, saved as PEFT saves it: random (non-zero) B matrices, and for
    DoRA magnitudes moved off their initial weight norms, so the adapter changes what the model says."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = config or LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # PEFT starts B at zero (A, for embeddings), so that a fresh adapter changes nothing
            if "lora_B" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def adapters(base_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {f"ft:{BASE}:a{i}:job{i}": make_lora(base_folder, root / f"a{i}", seed=i) for i in range(4)}


def target(base_folder: Path, model_id: str = BASE, adapter: Path | None = None) -> Target:
    return Target(model_id=model_id, base_id=BASE, base_path=base_folder, adapter_path=adapter)


def run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[str, str | None, int, int]]:
    """(text, finish_reason, prompt_tokens, completion_tokens) per request, served as one batch."""
    prepared = [engine.prepare(r) for r in requests]
    texts, finish, tokens = [""] * len(requests), [None] * len(requests), [0] * len(requests)
    for steps in engine.generate(prepared):
        for step in steps:
            texts[step.row] += step.text
            finish[step.row], tokens[step.row] = step.finish_reason, step.completion_tokens
    return [
        (t, f, len(p.row.prompt_ids), n) for t, f, p, n in zip(texts, finish, prepared, tokens, strict=True)
    ]


def chat(t: Target, question: str, **settings: object) -> GenerationRequest:
    settings = {"max_tokens": 12, "temperature": 0.0} | settings
    return GenerationRequest(target=t, messages=[{"role": "user", "content": question}], **settings)  # type: ignore[arg-type]


def test_mixed_batch_equals_each_request_alone(base_folder: Path, adapters: dict[str, Path]) -> None:
    engine = Engine(max_active_adapters=8)
    targets = [target(base_folder)] + [target(base_folder, mid, path) for mid, path in adapters.items()]
    # Different questions per row give different prompt lengths, so left padding is exercised too.
    requests = [chat(t, q) for t, q in zip(targets, QUESTIONS, strict=True)]
    mixed = run(engine, requests)
    alone = [run(engine, [r])[0] for r in requests]
    assert mixed == alone
    assert sorted(engine.active_adapters()) == sorted(adapter_name(mid) for mid in adapters)

    # Each adapter changes the answer: the same question differs from the base's answer for every adapter.
    same_question = run(engine, [chat(t, QUESTIONS[0]) for t in targets])
    texts = [text for text, *_ in same_question]
    assert all(text != texts[0] for text in texts[1:]), texts
    assert len(set(texts)) == len(texts)


def test_repeated_adapter_runs_on_swapped_weights_and_swaps_back_exactly(
    base_folder: Path, adapters: dict[str, Path]
) -> None:
    """Consecutive single-adapter batches run on W + BA; the next mixed batch gets the very original W."""
    engine = Engine()
    plain = Engine(merge_single_adapter=False)  # PEFT's LoRA layers on every step
    (id0, p0), (id1, p1) = list(adapters.items())[:2]
    one, other = target(base_folder, id0, p0), target(base_folder, id1, p1)
    expected = run(plain, [chat(one, q) for q in QUESTIONS[:3]])
    for t in (one, other):  # both adapters loaded before any swap
        engine.ensure_adapter(t)
    base = engine.base(BASE, base_folder)
    weights = {n: w for n, w in base.model.get_base_model().named_parameters() if "base_layer" in n}
    before = {n: w.detach().clone() for n, w in weights.items()}

    served = [run(engine, [chat(one, q)])[0] for q in QUESTIONS[:3]]
    assert base.alone == adapter_name(id0)  # swapped in from the second batch on
    swapped = dict(base.model.get_base_model().named_parameters())
    assert any(not torch.equal(swapped[n], w) for n, w in before.items())
    assert served == expected  # W + BA answers as PEFT's layers do (greedy, same tokens)

    mixed = run(engine, [chat(one, QUESTIONS[0]), chat(other, QUESTIONS[0])])
    assert base.alone is None
    restored = dict(base.model.get_base_model().named_parameters())
    assert all(restored[n] is w and torch.equal(w, before[n]) for n, w in weights.items())
    assert mixed == run(plain, [chat(one, QUESTIONS[0]), chat(other, QUESTIONS[0])])


def test_batcher_serves_concurrent_requests_together(base_folder: Path, adapters: dict[str, Path]) -> None:
    """Requests that arrive while the idle engine's window is open share one prefill pass.

    No clock decides it: the window opens once the engine thread wakes for the first request, and the
    others are submitted in the same event-loop pass, well within its 50 ms. The batcher's own count of
    prefill passes is the evidence.
    """
    engine = Engine()
    targets = [target(base_folder)] + [target(base_folder, mid, path) for mid, path in adapters.items()]
    requests = [chat(t, q) for t, q in zip(targets, QUESTIONS, strict=True)]
    alone = [run(engine, [r])[0][0] for r in requests]

    async def serve_all() -> tuple[list[str], int]:
        batcher = Batcher(engine, window_s=0.05)
        batcher.start()
        try:
            orders = [batcher.submit([r]) for r in requests]

            async def answer(order: Order) -> str:
                await order.accepted()
                return "".join([step.text async for _, step in order.steps()])

            texts = await asyncio.gather(*(answer(o) for o in orders))
            return list(texts), batcher.prefills
        finally:
            await batcher.stop()

    texts, prefills = asyncio.run(serve_all())
    assert texts == alone and prefills == 1


def test_lru_evicts_and_reloads(base_folder: Path, adapters: dict[str, Path]) -> None:
    engine = Engine(max_active_adapters=2)
    (id0, p0), (id1, p1), (id2, p2) = list(adapters.items())[:3]
    first = run(engine, [chat(target(base_folder, id0, p0), QUESTIONS[1])])
    run(engine, [chat(target(base_folder, id1, p1), QUESTIONS[1])])
    run(engine, [chat(target(base_folder, id0, p0), QUESTIONS[1])])  # id0 is now the most recently used
    run(engine, [chat(target(base_folder, id2, p2), QUESTIONS[1])])  # evicts id1, the least recently used
    names = engine.active_adapters()
    assert names == [adapter_name(id0), adapter_name(id2)]
    assert engine.loads == 3
    run(engine, [chat(target(base_folder, id1, p1), QUESTIONS[1])])  # reloads id1, evicting id0
    assert engine.loads == 4
    assert (
        run(engine, [chat(target(base_folder, id0, p0), QUESTIONS[1])]) == first
    )  # and id0 comes back the same
    assert engine.loads == 5
    # A batch naming three adapters would not fit two slots; the batcher splits such batches.
    with pytest.raises(RuntimeError):
        run(engine, [chat(target(base_folder, i, p), "Hi") for i, p in list(adapters.items())[:3]])


def test_sampling_stop_max_tokens_and_usage(base_folder: Path, adapters: dict[str, Path]) -> None:
    engine = Engine()
    mid, path = next(iter(adapters.items()))
    t = target(base_folder, mid, path)
    sampled = dict(temperature=1.0, top_p=0.9, seed=42, max_tokens=16)
    a = run(engine, [chat(t, "Hi", **sampled)])
    b = run(engine, [chat(t, "Hi", **sampled), chat(target(base_folder), "Hello there", **sampled)])[:1]
    assert a == b  # the same seed gives the same text, whatever else shares the batch
    assert run(engine, [chat(t, "Hi", **(sampled | {"seed": 43}))]) != a

    text, finish, prompt_tokens, completion_tokens = run(engine, [chat(t, "Hi", max_tokens=7)])[0]
    tokenizer = engine.base(BASE, base_folder).tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True
    )
    assert prompt_tokens == len(rendered["input_ids"])
    assert (finish, completion_tokens) == ("length", 7)

    long_text, *_ = run(engine, [chat(t, "Hi", max_tokens=30)])[0]
    stop = long_text[len(long_text) // 2 : len(long_text) // 2 + 2]
    stopped, finish, *_ = run(engine, [chat(t, "Hi", max_tokens=30, stop=[stop])])[0]
    assert finish == "stop" and stopped == long_text[: long_text.index(stop)]


def test_prompt_longer_than_context(base_folder: Path) -> None:
    engine = Engine()
    with pytest.raises(PromptTooLong, match="context of 512 tokens"):
        engine.prepare(GenerationRequest(target=target(base_folder), prompt="seven " * 600, max_tokens=4))


def test_token_budget_is_the_callers_or_a_default_that_fits(base_folder: Path) -> None:
    """An explicit max_tokens that does not fit is refused, naming its field; a default is cut to fit."""
    engine = Engine()
    prompt = "seven " * 500  # 502 of tiny-llama's 512 tokens
    prepared = engine.prepare(GenerationRequest(target=target(base_folder), prompt=prompt))
    room = 512 - len(prepared.row.prompt_ids)
    assert 0 < room < 16 and prepared.row.max_tokens == room  # no limit: up to the context
    default = GenerationRequest(target=target(base_folder), prompt="Hi", default_max_tokens=16)
    assert engine.prepare(default).row.max_tokens == 16
    cut = GenerationRequest(target=target(base_folder), prompt=prompt, default_max_tokens=16)
    assert engine.prepare(cut).row.max_tokens == room
    with pytest.raises(PromptTooLong) as too_long:
        engine.prepare(GenerationRequest(target=target(base_folder), prompt=prompt, max_tokens=room + 1))
    assert too_long.value.field == "prompt" and too_long.value.code == "context_length_exceeded"
    with pytest.raises(Refused, match="context of 512") as too_many:
        engine.prepare(GenerationRequest(target=target(base_folder), prompt="Hi", max_tokens=513))
    assert too_many.value.field == "max_tokens" and not isinstance(too_many.value, PromptTooLong)
    with pytest.raises(Refused, match="not in the vocabulary") as bad_id:
        engine.prepare(GenerationRequest(target=target(base_folder), prompt_ids=[1, 10**6]))
    assert bad_id.value.field == "prompt"


def test_a_chat_for_a_model_without_chat_template_is_refused(base_folder: Path, tmp_path: Path) -> None:
    import shutil

    plain = tmp_path / "no-template"
    shutil.copytree(base_folder, plain)
    (plain / "chat_template.jinja").unlink()
    engine = Engine()
    t = Target(model_id="no-template", base_id="no-template", base_path=plain)
    with pytest.raises(Refused, match="no chat template") as refused:
        engine.prepare(chat(t, "Hi"))
    assert (refused.value.field, refused.value.code) == ("model", "model_not_chat")
    assert engine.prepare(GenerationRequest(target=t, prompt="Hi", max_tokens=2)).row.max_tokens == 2


def test_top_p_zero_keeps_the_likeliest_token() -> None:
    """OpenAI allows top_p=0: the nucleus is the likeliest token alone, never an empty (NaN) distribution."""
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.5, 0.0, generator) for _ in range(50)} == {1}


# --- over HTTP, with models resolved from the database ---------------------------------------------------


@pytest.fixture(scope="module")
def inference_server(tiny_model: str) -> Iterator[str]:
    """The inference server as its own process, on the test database and artifact store."""
    port = free_port()
    env = os.environ | {"TUNEFORGE_BATCH_WINDOW_MS": "20", "TUNEFORGE_INFERENCE_SECRET": SECRET}
    command = [sys.executable, "-m", "worker.serving", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    with serving_process(command, env, "serving.log", f"{base_url}/healthz", "the inference server"):
        yield base_url


def client(base_url: str, project: str = "alpha") -> openai.OpenAI:
    """The SDK as the API calls this server: its api_key is the shared secret, sent as the bearer token."""
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=SECRET,
        default_headers={"X-Tuneforge-Project": project},
        max_retries=0,
    )


def post(base_url: str, path: str, body: dict, secret: str | None = SECRET) -> httpx.Response:
    headers = {"X-Tuneforge-Project": "alpha"} | ({"Authorization": f"Bearer {secret}"} if secret else {})
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60)


def test_openai_sdk_chat_streaming_matches_whole(inference_server: str, tiny_model: str) -> None:
    sdk = client(inference_server)
    messages = [{"role": "user", "content": "Tell me a joke."}]
    whole = sdk.chat.completions.create(model=tiny_model, messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    chunks = list(
        sdk.chat.completions.create(
            model=tiny_model,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage

    text = sdk.completions.create(model=tiny_model, prompt="The quick brown", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.usage is not None and text.usage.completion_tokens == 5


def test_http_errors(inference_server: str, tiny_model: str) -> None:
    sdk = client(inference_server)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as error:
        sdk.completions.create(model=tiny_model, prompt="seven " * 600, max_tokens=4)
    assert error.value.code == "context_length_exceeded"
    raw = post(inference_server, "/v1/chat/completions", {"model": tiny_model, "messages": [], "n": 2})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"


def test_serves_a_trained_adapter_by_its_ft_id(
    inference_server: str, finished_job: dict, http: httpx.Client
) -> None:
    model_id = finished_job["fine_tuned_model"]
    question = [{"role": "user", "content": "What is 3 plus 3?"}]
    answer = client(inference_server).chat.completions.create(
        model=model_id, messages=question, max_tokens=12, temperature=0
    )
    base = client(inference_server).chat.completions.create(
        model="tiny-llama", messages=question, max_tokens=12, temperature=0
    )
    assert answer.model == model_id and answer.choices[0].message.content != base.choices[0].message.content
    with pytest.raises(openai.NotFoundError):  # another project's model is not found, never forbidden
        client(inference_server, project="beta").chat.completions.create(model=model_id, messages=question)

    # A job that has not succeeded yet: its model id is known but not ready.
    from tests.helpers import chat_jsonl, job_body, upload

    training = upload(http, chat_jsonl())
    job = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"]) | {"suffix": "pending"}).json()
    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    pending_id = f"ft:tiny-llama:pending:{job['id']}"
    with pytest.raises(openai.ConflictError, match="not ready"):
        client(inference_server).chat.completions.create(model=pending_id, messages=question)


# --- the shared secret, and what OpenAI's spec allows and refuses ------------------------------------------


def test_only_callers_with_the_shared_secret_are_answered(
    inference_server: str, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": tiny_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert httpx.get(f"{inference_server}/healthz").status_code == 200  # the API's /readyz probe
    refused = [
        post(inference_server, "/v1/chat/completions", body, secret=None),
        post(inference_server, "/v1/chat/completions", body, secret="wrong-" + SECRET),
        post(inference_server, "/v1/chat/completions", body, secret=SECRET[:-1]),
        httpx.post(f"{inference_server}/v1/completions", json=body, headers={"Authorization": SECRET}),
        httpx.get(f"{inference_server}/internal/merged/{tiny_model}"),
        httpx.get(f"{inference_server}/docs"),
        httpx.get(f"{inference_server}/no/such/path"),
    ]
    for response in refused:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.json()["error"]["code"] == "invalid_inference_secret"
    assert post(inference_server, "/v1/chat/completions", body).status_code == 200

    # No secret, no server: neither the app nor `run_server` starts without one (or with a placeholder).
    with pytest.raises(ValueError, match="TUNEFORGE_INFERENCE_SECRET"):
        create_app(secret="")
    with pytest.raises(ValueError, match="shorter than 16"):
        create_app(secret="changeme")
    monkeypatch.delenv("TUNEFORGE_INFERENCE_SECRET", raising=False)
    with pytest.raises(SystemExit, match="set the same TUNEFORGE_INFERENCE_SECRET"):
        run_server(port=free_port())


def test_spec_nulls_and_top_p_zero_are_accepted(inference_server: str, tiny_model: str) -> None:
    question = [{"role": "user", "content": "Tell me a joke."}]
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None}
    answer = post(
        inference_server,
        "/v1/chat/completions",
        {"model": tiny_model, "messages": question, "max_tokens": 8} | nulls,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    sdk = client(inference_server)
    greedy = sdk.chat.completions.create(model=tiny_model, messages=question, max_tokens=12, temperature=0)
    nucleus_of_one = sdk.chat.completions.create(
        model=tiny_model, messages=question, max_tokens=12, temperature=1.5, top_p=0
    )
    assert nucleus_of_one.choices[0].message.content == greedy.choices[0].message.content


def test_completions_take_token_ids_and_several_prompts(inference_server: str, tiny_model: str) -> None:
    from transformers import AutoTokenizer

    from app.config import get_settings

    sdk = client(inference_server)
    default = sdk.completions.create(model=tiny_model, prompt="The quick brown", temperature=0)
    assert default.usage is not None and default.usage.completion_tokens <= 16  # OpenAI's default max_tokens
    assert (default.choices[0].finish_reason == "length") == (default.usage.completion_tokens == 16)

    prompts = ["The quick brown", "What is the capital of France?"]
    alone = [sdk.completions.create(model=tiny_model, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    together = sdk.completions.create(model=tiny_model, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage is not None and together.usage.total_tokens == sum(
        a.usage.total_tokens for a in alone if a.usage
    )

    tokenizer = AutoTokenizer.from_pretrained(get_settings().resolved_model_dir / tiny_model)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    one = sdk.completions.create(model=tiny_model, prompt=ids[0], max_tokens=6, temperature=0)
    both = sdk.completions.create(model=tiny_model, prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == alone[0].choices[0].text
    assert [c.text for c in both.choices] == [c.text for c in together.choices]

    stream = sdk.completions.create(
        model=tiny_model,
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, chunks = ["", ""], [None, None], list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.text for c in together.choices] and None not in finishes
    assert chunks[-1].usage == together.usage


CHAT = [{"role": "user", "content": "Hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "maximum": 9},
                    "b": {"type": "integer", "maximum": 9},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
REFUSED = [  # (endpoint, extra body fields, the param the 400 names)
    ("chat", {"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),  # no tools to call
    (
        "chat",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("chat", {"tool_choice": "sometimes"}, "tool_choice"),
    ("chat", {"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id"),
    ("chat", {"messages": [{"role": "function", "content": "42", "name": "f"}]}, "messages.0.role"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        "chat",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logit_bias": {"the": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"1000000": 1}}, "logit_bias"),  # not in the vocabulary
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ("chat", {"no_such_field": 1}, "no_such_field"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 129}, "n"),
    ("chat", {"temperature": 2.5}, "temperature"),
    ("chat", {"temperature": -0.1}, "temperature"),
    ("chat", {"top_p": 1.01}, "top_p"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": -1}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"max_tokens": 513}, "max_tokens"),  # more than tiny-llama's whole context
    ("chat", {"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("chat", {"seed": 2**63}, "seed"),
    ("chat", {"seed": -(2**63) - 1}, "seed"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, -2]}, "prompt"),
    ("completions", {"prompt": [[1, 2], [10**6]]}, "prompt"),  # not in the vocabulary
    ("completions", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), REFUSED)
def test_unimplemented_fields_and_out_of_range_values_are_400_naming_them(
    inference_server: str, tiny_model: str, endpoint: str, fields: dict, param: str
) -> None:
    body = {"model": tiny_model, "max_tokens": 4}
    body |= {"messages": CHAT} if endpoint == "chat" else {"prompt": "Hi"}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    response = post(inference_server, path, body | fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


STRICT_TEMPLATE = (  # as Llama 2 and Gemma templates do: roles must alternate, and no system role
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_chat_the_template_refuses_is_400(inference_server: str, database: str) -> None:
    from app.config import get_settings
    from app.models.local import register_folder

    folder = get_settings().resolved_model_dir / "strict-llama"
    if not (folder / "config.json").exists():
        make_tiny_llama(folder, seed=1)
    (folder / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    register_folder("strict-llama", folder)
    sdk = client(inference_server)
    for messages in (
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hi"}],
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model="strict-llama", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        assert refused.value.param == "messages" and refused.value.code == "invalid_messages"
        assert "refuses these messages" in refused.value.message
    alternating = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "?"},
    ]
    answer = sdk.chat.completions.create(model="strict-llama", messages=alternating, max_tokens=2)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_n_choices_logprobs_and_interleaved_streams(inference_server: str, tiny_model: str) -> None:
    sdk = client(inference_server)
    question = [{"role": "user", "content": "Tell me a joke."}]
    sampled = {"model": tiny_model, "messages": question, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    three = sdk.chat.completions.create(n=3, **sampled)  # type: ignore[call-overload]
    again = sdk.chat.completions.create(n=3, **sampled)  # type: ignore[call-overload]
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3  # each sampled alone
    assert texts == [c.message.content for c in again.choices]  # and reproducible from the one seed
    one = sdk.chat.completions.create(model=tiny_model, messages=question, max_tokens=10, temperature=0)
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once

    with_logprobs = sdk.chat.completions.create(
        model=tiny_model, messages=question, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = with_logprobs.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content == one.choices[0].message.content
    for token in content:
        alternatives = token.top_logprobs
        assert len(alternatives) == 3 and alternatives[0].token == token.token  # greedy: the likeliest
        assert alternatives[0].logprob == token.logprob <= 0
        assert [a.logprob for a in alternatives] == sorted((a.logprob for a in alternatives), reverse=True)
        assert bytes(token.bytes or []).decode() == token.token
    assert one.choices[0].logprobs is None  # not asked for, not sent

    text = sdk.completions.create(
        model=tiny_model, prompt="The quick", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == text.choices[0].text and len(logprobs.top_logprobs or []) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]

    stream = sdk.chat.completions.create(n=3, stream=True, **sampled)  # type: ignore[call-overload]
    streamed, finished, order = ["", "", ""], [None, None, None], []
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            finished[c.index] = c.finish_reason or finished[c.index]
            order.append(c.index)
    assert streamed == texts and None not in finished
    assert order != sorted(order)  # the choices interleave as they are generated, not one after another


def metric(base_url: str, name: str) -> float:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {SECRET}"}) as client:
        return metric_sample(scrape(client), name)


def test_a_client_that_leaves_stops_its_generation_within_a_step(
    inference_server: str, tiny_model: str, api_key: str
) -> None:
    """Streaming or not, straight or through the API, when the client goes its rows leave the batch: the
    server's token count stops moving, far short of what was asked."""
    body = {
        "model": tiny_model,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 480,
        "n": 4,
        "logit_bias": {"0": -100, "1": -100, "2": -100},  # no special tokens, so no end: 480 unless stopped
    }
    generated = "tuneforge_inference_generated_tokens_total"

    async def leave_early(url: str, headers: dict[str, str], stream: bool) -> None:
        started = metric(inference_server, generated)
        async with httpx.AsyncClient(timeout=60) as http:
            task = asyncio.ensure_future(
                http.post(f"{url}/v1/chat/completions", json=body | {"stream": stream}, headers=headers)
            )
            while metric(inference_server, generated) < started + 8:
                await asyncio.sleep(0.01)
            task.cancel()  # the connection closes: the client has gone
        await asyncio.gather(task, return_exceptions=True)

    def check(url: str, headers: dict[str, str], stream: bool) -> None:
        cancelled = metric(inference_server, "tuneforge_inference_cancelled_rows_total")
        before = metric(inference_server, generated)
        asyncio.run(leave_early(url, headers, stream))
        deadline = time.monotonic() + 10
        while metric(inference_server, "tuneforge_inference_cancelled_rows_total") < cancelled + 4:
            assert time.monotonic() < deadline, f"the rows were not cancelled (stream={stream}, {url})"
            time.sleep(0.02)
        after = metric(inference_server, generated)
        time.sleep(0.3)
        assert metric(inference_server, generated) == after
        assert after - before < 4 * 480 / 2, (stream, after - before)

    direct = {"Authorization": f"Bearer {SECRET}", "X-Tuneforge-Project": "alpha"}
    for stream in (False, True):
        check(inference_server, direct, stream)
    env = os.environ | {"TUNEFORGE_INFERENCE_URL": inference_server, "TUNEFORGE_INFERENCE_SECRET": SECRET}
    with api_process(env, "api-disconnect.log") as (api, _):
        for stream in (False, True):
            check(api, {"Authorization": f"Bearer {api_key}"}, stream)


class Weather(pydantic.BaseModel):
    city: Literal["Paris", "London", "Tokyo"]
    temperature: int = pydantic.Field(ge=-50, le=50)
    sunny: bool


def test_structured_outputs_parse_into_objects(inference_server: str, finished_job: dict) -> None:
    """The SDK's `parse()` sends the pydantic model as a strict JSON schema and gets that object back from a
    fine-tuned model; `json_object` gives a JSON object, streamed or not."""
    sdk = client(inference_server)
    model = finished_job["fine_tuned_model"]
    question = [{"role": "user", "content": "What is the weather like?"}]
    for temperature in (0.0, 1.0):
        answer = sdk.chat.completions.parse(
            model=model,
            messages=question,
            response_format=Weather,
            max_tokens=100,
            temperature=temperature,
            n=2,
        )
        for choice in answer.choices:
            assert isinstance(choice.message.parsed, Weather) and choice.finish_reason == "stop"
    whole = sdk.chat.completions.create(
        model=model, messages=question, response_format={"type": "json_object"}, max_tokens=100, temperature=0
    )
    content = whole.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict) and whole.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(
        model=model,
        messages=question,
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content


def test_tool_calls_forced_parsed_streamed_and_answered(inference_server: str, tiny_model: str) -> None:
    """tool_choice 'required' or a named function gets a well-formed call even from an untaught model;
    the call comes back parsed (whole, or as deltas), and a history with the call and its result is taken."""
    sdk = client(inference_server)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    asks = {"model": tiny_model, "messages": question, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    for tool_choice, names in (
        ({"type": "function", "function": {"name": "add"}}, {"add"}),
        ("required", {"add", "get_weather"}),
    ):
        whole = sdk.chat.completions.create(tool_choice=tool_choice, parallel_tool_calls=False, **asks)  # type: ignore[call-overload]
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, (tool_choice, choice)
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        if call.function.name == "add":
            assert set(arguments) == {"a", "b"} and all(
                isinstance(v, int) and v <= 9 for v in arguments.values()
            )

        chunks = list(
            sdk.chat.completions.create(
                tool_choice=tool_choice, parallel_tool_calls=False, stream=True, **asks
            )  # type: ignore[call-overload]
        )
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [  # type: ignore[union-attr]
            (0, call.function.name, call.function.arguments)
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""

    history = question + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    answer = sdk.chat.completions.create(model=tiny_model, messages=history, tools=TOOLS[:1], max_tokens=8)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = sdk.chat.completions.create(tool_choice="none", **asks)  # type: ignore[call-overload]
    assert none.choices[0].message.tool_calls is None


def test_tool_calls_are_parsed_out_of_text_as_it_streams() -> None:
    from worker.serving.tools import ToolCallParser

    text = (
        'Let me check.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "nope"}</tool_call>'
    )
    for size in (1, 3, 7, len(text)):  # however the text is cut into deltas
        parser = ToolCallParser({"add"})
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        fed = [parser.feed(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
        content = "".join(c for c, _ in fed)
        calls = [call for _, cs in fed for call in cs]
        assert (
            content == 'Let me check.\n<tool_call>{"name": "nope"}</tool_call>'
        )  # an unknown function is text
        assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "add", {"a": 1, "b": 2})]
        assert all(not c.endswith("<tool") for c, _ in fed[:-1])  # a tag's start is held back


NATIVE_TOOLS_TEMPLATE = (  # as Qwen's and Llama 3's templates do: tools and calls rendered by the template
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}CALL {{ c['function']['name'] }} "
    "{{ c['function']['arguments']['city'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_history_reaches_the_prompt_with_and_without_a_template_for_tools(
    base_folder: Path, tmp_path: Path
) -> None:
    import shutil

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    engine = Engine()

    def prompt(t: Target) -> str:
        prepared = engine.prepare(
            GenerationRequest(target=t, messages=messages, tools=TOOLS[:1], max_tokens=1)
        )
        return engine.base(t.base_id, t.base_path).tokenizer.decode(prepared.row.prompt_ids)

    plain = prompt(target(base_folder))  # tiny-llama's ChatML knows no tools: Tuneforge writes them out
    assert '{"name":"get_weather","description":"The weather in a city now."' in plain.split("<|im_end|>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in plain
    assert "<|im_start|>user\n<tool_response>\nSunny, 21 C\n</tool_response>" in plain

    native = tmp_path / "native"
    shutil.copytree(base_folder, native)
    (native / "chat_template.jinja").write_text(NATIVE_TOOLS_TEMPLATE)
    rendered = prompt(Target(model_id="native", base_id="native", base_path=native))
    assert rendered.startswith("<|im_start|>system\nTOOLS: get_weather<|im_end|>")
    assert "CALL get_weather Paris" in rendered and "<|im_start|>tool\nSunny, 21 C" in rendered


def test_langchain_chat_openai_as_a_client(inference_server: str, tiny_model: str) -> None:
    """LangChain's ChatOpenAI: plain and streamed answers, forced tool calls, and structured output."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=tiny_model,
        base_url=f"{inference_server}/v1",
        api_key=SECRET,  # type: ignore[arg-type]
        default_headers={"X-Tuneforge-Project": "alpha"},
        temperature=0,
        max_tokens=12,  # type: ignore[call-arg]
        max_retries=0,
    )
    answer = llm.invoke("Tell me a joke.")
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in llm.stream("Tell me a joke."))
    assert streamed == answer.content

    caller = llm.bind_tools(TOOLS[1:], tool_choice="add").bind(max_tokens=60)
    called = caller.invoke("What is 2 plus 3?")
    assert isinstance(called, AIMessage) and [c["name"] for c in called.tool_calls] == ["add"]
    assert set(called.tool_calls[0]["args"]) == {"a", "b"}
    chunks = list(caller.stream("What is 2 plus 3?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [c["args"] for c in merged.tool_calls] == [called.tool_calls[0]["args"]]  # type: ignore[attr-defined]
    result = ToolMessage(content="5", tool_call_id=called.tool_calls[0]["id"])
    follow_up = llm.bind_tools(TOOLS[1:]).invoke(["What is 2 plus 3?", called, result])
    assert isinstance(follow_up, AIMessage)

    roomier = llm.model_copy(update={"max_tokens": 100})
    structured = roomier.with_structured_output(Weather, method="json_schema")
    assert isinstance(structured.invoke("What is the weather like?"), Weather)
