"""The inference engine and server (worker/serving): mixed-adapter batches, LRU residency, sampling, HTTP.

Adapters are built without training: a LoRA PeftModel over tiny-llama whose lora_B weights are set to
seeded random values, so each adapter changes the model's answers in its own way.
"""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import TEST_HOME, free_port
from worker.serving.batcher import Batcher
from worker.serving.engine import Engine, GenerationRequest, PromptTooLong, Target, adapter_name
from worker.training.base_models import make_tiny_llama

BASE = "serving-tiny"
QUESTIONS = ["What is 2 plus 2?", "Tell me a joke.", "Who wrote Romeo and Juliet?", "How are you?", "Hi"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / BASE
    make_tiny_llama(folder, seed=0)
    return folder


def make_lora(base_folder: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) lora_B, saved as PEFT saves a trained one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
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
    run(engine, [chat(other, "Hi")])  # loads both adapters before any swap
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
    engine = Engine()
    targets = [target(base_folder)] + [target(base_folder, mid, path) for mid, path in adapters.items()]
    requests = [chat(t, q) for t, q in zip(targets, QUESTIONS, strict=True)]
    alone = [run(engine, [r])[0][0] for r in requests]

    async def serve_all() -> tuple[list[str], int]:
        batcher = Batcher(engine, window_s=0.05)
        batcher.start()
        try:

            async def one(request: GenerationRequest) -> str:
                handle = batcher.submit(request)
                await handle.accepted()
                return "".join([step.text async for step in handle.steps()])

            texts = await asyncio.gather(*(one(r) for r in requests))
            return list(texts), batcher.batches_run
        finally:
            await batcher.stop()

    texts, batches = asyncio.run(serve_all())
    assert texts == alone and batches == 1


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


# --- over HTTP, with models resolved from the database ---------------------------------------------------


@pytest.fixture(scope="module")
def inference_server(tiny_model: str) -> Iterator[str]:
    """The inference server as its own process, on the test database and artifact store."""
    port = free_port()
    log = open(TEST_HOME / "serving.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.serving", "--port", str(port)],
        env=os.environ | {"TUNEFORGE_BATCH_WINDOW_MS": "20"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (TEST_HOME / "serving.log").read_text()
            try:
                if httpx.get(f"{base_url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def client(base_url: str, project: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="unused", default_headers={"X-Tuneforge-Project": project}
    )


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
    raw = httpx.post(
        f"{inference_server}/v1/chat/completions", json={"model": tiny_model, "messages": [], "n": 2}
    )
    assert raw.status_code == 422 and "error" in raw.json()


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
