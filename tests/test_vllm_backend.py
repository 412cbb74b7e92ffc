"""The vLLM backend against an HTTP double of vLLM's documented endpoints (tests/test_vllm_server.py runs
it against a real vLLM; the double makes failures, restarts and stalls that vLLM cannot be made to).

The double implements what Tuneforge relies on: `POST /v1/load_lora_adapter` (checks the folder it is
given holds an adapter; 400 "has already been loaded" for a name it holds), `POST /v1/unload_lora_adapter`,
`GET /v1/models`, and chat/text completions that echo the model they were asked for, streamed a word a
chunk when asked. A real API process, started with TUNEFORGE_INFERENCE_BACKEND=vllm, sits between the openai
SDK and the double.
"""

import asyncio
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from app.errors import ApiError
from app.inference import vllm as vllm_backend
from tests.conftest import TEST_HOME, free_port
from tests.helpers import api_process, chat_jsonl, job_body, upload

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
SERVED_BASE = (
    "tiny-llama-on-vllm"  # the base's --served-model-name, mapped by TUNEFORGE_VLLM_SERVED_MODEL_NAMES
)
# How long a stream waits for the client to take its previous chunk before it gives up and records a stall.
# Only a failing relay ever waits this long: a passing one answers as soon as the chunk is through.
STALL_TIMEOUT_S = 30


def vllm_error(message: str, type: str, status: int) -> JSONResponse:
    """vLLM's error shape (newer versions nest it under "error", with the HTTP status as the code)."""
    body = {"error": {"message": message, "type": type, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class VllmDouble:
    """A stand-in for `vllm serve <base> --enable-lora`, recording every request it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.loras: dict[str, str] = {}
        self.fail_loads = False
        # A stream sends chunk k+1 only once its client has taken chunk k (`took_chunk.release()`); each
        # wait that timed out instead is recorded in `stalls` as the index of the chunk that waited.
        self.took_chunk = threading.Semaphore(0)
        self.stalls: list[int] = []
        self.app = FastAPI()
        self.app.post("/v1/load_lora_adapter")(self.load)
        self.app.post("/v1/unload_lora_adapter")(self.unload)
        self.app.get("/v1/models")(self.models)
        self.app.get("/health")(lambda: {})  # vLLM answers 200 with an empty body when it is up
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/completions")(self.chat)

    def seen(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.requests if p == path]

    async def load(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(("/v1/load_lora_adapter", body))
        if self.fail_loads:
            return vllm_error("CUDA out of memory while loading the adapter", "InternalServerError", 500)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return vllm_error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name in self.loras:
            return vllm_error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
        folder = Path(path)
        if not all((folder / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors")):
            return vllm_error(
                f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404
            )
        self.loras[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(("/v1/unload_lora_adapter", body))
        if self.loras.pop(body.get("lora_name"), None) is None:
            return vllm_error(
                f"The lora adapter '{body.get('lora_name')}' cannot be found.", "NotFoundError", 404
            )
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    async def models(self) -> dict:
        cards = [{"id": SERVED_BASE, "object": "model", "parent": None}]
        cards += [
            {"id": n, "object": "model", "root": p, "parent": SERVED_BASE} for n, p in self.loras.items()
        ]
        return {"object": "list", "data": cards}

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append((request.url.path, body))
        model = body["model"]
        if model != SERVED_BASE and model not in self.loras:
            return vllm_error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        answer = f"echo from {model}"
        if body.get("stream"):
            return StreamingResponse(self.chunks(model, answer), media_type="text/event-stream")
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        if request.url.path == "/v1/completions":
            choice: dict = {"index": 0, "text": answer, "finish_reason": "stop"}
            return JSONResponse(
                {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": model}
                | {"choices": [choice], "usage": usage}
            )
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        return JSONResponse(
            {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model}
            | {"choices": [choice], "usage": usage}
        )

    async def chunks(self, model: str, answer: str) -> AsyncIterator[bytes]:
        self.took_chunk = threading.Semaphore(0)  # a fresh count for each stream
        for i, word in enumerate(answer.split(" ")):
            if i and not await asyncio.to_thread(self.took_chunk.acquire, timeout=STALL_TIMEOUT_S):
                self.stalls.append(i)
            delta = {"role": "assistant", "content": word if i == 0 else f" {word}"}
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model}
            chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def double() -> Iterator[tuple[VllmDouble, str]]:
    """The vLLM double, served by uvicorn in a thread of the test process."""
    fake, port = VllmDouble(), free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the vLLM double did not start"
        time.sleep(0.05)
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def vllm_api(double: tuple[VllmDouble, str], finished_job: dict) -> Iterator[str]:
    """An API process with the vLLM backend; vLLM sees the adapters through a 'shared volume' (a symlink)."""
    volume = TEST_HOME / "vllm-volume"
    volume.symlink_to(TEST_HOME / "vllm" / "adapters", target_is_directory=True)
    env = os.environ | {
        "TUNEFORGE_INFERENCE_BACKEND": "vllm",
        "TUNEFORGE_VLLM_URL": double[1],
        "TUNEFORGE_VLLM_ADAPTER_DIR": str(volume),
        "TUNEFORGE_VLLM_SERVED_MODEL_NAMES": json.dumps({"tiny-llama": SERVED_BASE}),
        # Base requests go to the served model itself here; through a zero adapter in test_vllm_server.py.
        "TUNEFORGE_VLLM_BASE_ADAPTER": "false",
    }
    with api_process(env, "api-vllm.log") as (base_url, _):
        ready = httpx.get(f"{base_url}/readyz", timeout=5)
        assert ready.json()["checks"]["vllm"] == "ok", ready.text  # /readyz reports the vLLM server
        yield base_url


def sdk(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def test_fine_tuned_model_is_registered_once_then_served(
    double: tuple[VllmDouble, str], vllm_api: str, api_key: str, finished_job: dict
) -> None:
    fake, client, ft_id = double[0], sdk(vllm_api, api_key), finished_job["fine_tuned_model"]

    # vLLM refusing the adapter is the API's 502, in the OpenAI envelope, with vLLM's reason.
    fake.fail_loads = True
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=ft_id, messages=QUESTION)
    assert failed.value.status_code == 502 and failed.value.code == "adapter_load_failed"
    assert "CUDA out of memory" in failed.value.message
    assert fake.seen("/v1/chat/completions") == []
    fake.fail_loads = False
    fake.requests.clear()

    answer = client.chat.completions.create(model=ft_id, messages=QUESTION, max_tokens=8)
    assert answer.choices[0].message.content == f"echo from {ft_id}"
    (load,) = fake.seen("/v1/load_lora_adapter")
    assert load["lora_name"] == ft_id
    assert Path(load["lora_path"]).parent == TEST_HOME / "vllm-volume"  # the path as vLLM sees it
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in Path(load["lora_path"]).iterdir()
    }
    (chat,) = fake.seen("/v1/chat/completions")
    assert chat["model"] == ft_id and chat["messages"] == QUESTION and chat["max_tokens"] == 8

    client.chat.completions.create(model=ft_id, messages=QUESTION)
    assert len(fake.seen("/v1/load_lora_adapter")) == 1  # registered once per API process
    assert len(fake.seen("/v1/chat/completions")) == 2

    # vLLM restarted (it forgot the adapter): its 404 passes through, and the next request registers again.
    httpx.post(f"{double[1]}/v1/unload_lora_adapter", json={"lora_name": ft_id})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=ft_id, messages=QUESTION)
    client.chat.completions.create(model=ft_id, messages=QUESTION)
    assert len(fake.seen("/v1/load_lora_adapter")) == 2


def test_stream_passes_through_chunk_by_chunk(
    double: tuple[VllmDouble, str], vllm_api: str, api_key: str, finished_job: dict
) -> None:
    """The double sends each chunk only once the client has taken the one before: a relay that held chunks
    back (buffered the stream, or waited for its end) would leave the double waiting, and stall."""
    fake, ft_id = double[0], finished_job["fine_tuned_model"]
    fake.stalls.clear()
    words = []
    for chunk in sdk(vllm_api, api_key).chat.completions.create(model=ft_id, messages=QUESTION, stream=True):
        words.append(chunk.choices[0].delta.content or "")
        fake.took_chunk.release()
    assert words == ["echo", " from", f" {ft_id}"]
    assert fake.stalls == [], f"chunks {fake.stalls} waited for a client that never got the one before"


def test_base_model_is_rewritten_to_its_served_name(
    double: tuple[VllmDouble, str], vllm_api: str, api_key: str
) -> None:
    fake, client = double[0], sdk(vllm_api, api_key)
    answer = client.chat.completions.create(model="tiny-llama", messages=QUESTION)
    assert answer.model == SERVED_BASE
    assert fake.seen("/v1/chat/completions")[-1]["model"] == SERVED_BASE
    text = client.completions.create(model="tiny-llama", prompt="3 plus 3 is", max_tokens=4)
    assert text.choices[0].text == f"echo from {SERVED_BASE}"
    assert fake.seen("/v1/completions")[-1] == {
        "model": SERVED_BASE,
        "prompt": "3 plus 3 is",
        "max_tokens": 4,
    }


def test_unknown_foreign_and_unready_models_never_reach_vllm(
    double: tuple[VllmDouble, str],
    vllm_api: str,
    api_key: str,
    other_key: str,
    finished_job: dict,
    http: httpx.Client,
) -> None:
    fake, client = double[0], sdk(vllm_api, api_key)
    before = len(fake.requests)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # another project's model is not found, never forbidden
        sdk(vllm_api, other_key).chat.completions.create(
            model=finished_job["fine_tuned_model"], messages=QUESTION
        )

    training = upload(http, chat_jsonl())
    job = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()
    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model=f"ft:tiny-llama::{job['id']}", messages=QUESTION)
    assert conflict.value.code == "model_not_ready"
    assert len(fake.requests) == before


def test_only_plain_lora_adapters_are_servable(tmp_path: Path) -> None:
    """Full and freeze fine-tunes (no adapter_config.json), other PEFT types and DoRA are 400s."""
    configs = {
        "full": None,
        "prefix": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"},
        "dora": {"peft_type": "LORA", "use_dora": True, "task_type": "CAUSAL_LM"},
        "classifier": {"peft_type": "LORA", "task_type": "SEQ_CLS"},
    }
    for name, config in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        if config is None:
            (folder / "config.json").write_text("{}")
        else:
            (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ApiError) as refused:
            vllm_backend.check_lora(f"ft:tiny-llama::{name}", folder)
        assert refused.value.status == 400 and refused.value.code == "model_not_servable"
        assert "LoRA adapters only" in refused.value.message
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    vllm_backend.check_lora("ft:tiny-llama::lora", lora)


def test_adapter_archive_with_unsafe_paths_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"{}"
        member = tarfile.TarInfo("../escaped.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ApiError) as refused:
        vllm_backend.unpacked("ft:tiny-llama::evil", archive)
    assert "unsafe path" in refused.value.message
    folder = vllm_backend.adapter_folder("ft:tiny-llama::evil")
    assert not folder.exists() and not (folder.parent.parent / "escaped.json").exists()
    assert not any(p.name.startswith(f".{folder.name}.tmp-") for p in folder.parent.iterdir())


def test_only_documented_fields_reach_vllm(
    double: tuple[VllmDouble, str], vllm_api: str, api_key: str
) -> None:
    """vLLM's own extensions in a tenant's body never reach it: the API refuses them, naming the field."""
    fake = double[0]
    headers = {"Authorization": f"Bearer {api_key}"}
    before = len(fake.seen("/v1/chat/completions"))
    for extra in ({"guided_json": {"type": "object"}}, {"min_p": 0.1}, {"top_k": 5}):
        body = {"model": "tiny-llama", "messages": QUESTION} | extra
        refused = httpx.post(f"{vllm_api}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == next(iter(extra))
    assert len(fake.seen("/v1/chat/completions")) == before
    body = {"model": "tiny-llama", "messages": QUESTION, "temperature": None, "max_tokens": 4, "user": "u1"}
    assert (
        httpx.post(f"{vllm_api}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code
        == 200
    )
    assert fake.seen("/v1/chat/completions")[-1] == {
        "model": SERVED_BASE,
        "messages": QUESTION,
        "max_tokens": 4,
        "user": "u1",
    }
