"""The internal inference HTTP server: OpenAI's chat and text completions, streaming or not.

It also answers classifications (`classifier`) and merged model exports (`merge`), for the API to relay.

The API server forwards to it; it trusts its caller (no API keys). The caller names the model by id and
the project asking in the ``X-Tuneforge-Project`` header; this server resolves the id itself (database and
artifact store, see `resolve`), so 404 and 409 are decided in one place. Errors use OpenAI's envelope.

Run it with ``python -m worker.serving --host 127.0.0.1 --port 8001`` or `run_server`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from app.errors import ApiError, envelope, install_error_handlers
from worker.serving import classifier, merge
from worker.serving.batcher import Batcher, Handle
from worker.serving.engine import Engine, GenerationRequest, PromptTooLong, Target, UnsupportedModel
from worker.serving.resolve import resolve
from worker.serving.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from worker.serving.settings import serving_settings

Resolver = Callable[..., Target]
# FastAPI reads a `x_tuneforge_project` parameter from the X-Tuneforge-Project header (any case).
ProjectHeader = Annotated[str | None, Header()]


def create_app(engine: Engine | None = None, resolver: Resolver = resolve) -> FastAPI:
    """The app; `engine` defaults to one built from the serving settings."""
    settings = serving_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(
            engine
            or Engine(
                max_active_adapters=settings.max_active_adapters,
                merge_single_adapter=settings.merge_single_adapter,
            ),
            window_s=settings.batch_window_ms / 1000,
            max_batch_size=settings.max_batch_size,
        )
        batcher.start()
        app.state.batcher = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="Tuneforge inference", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, x_tuneforge_project: ProjectHeader = None) -> Any:
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        try:
            messages = body.plain_messages()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from None
        request = _generation(body, target, messages=messages, max_tokens=body.max_completion_tokens)
        return await _respond(app.state.batcher, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, x_tuneforge_project: ProjectHeader = None) -> Any:
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        request = _generation(body, target, prompt=body.text())
        return await _respond(app.state.batcher, body, request, chat=False)

    @app.post("/v1/classifications")
    async def classifications(
        body: classifier.ClassificationRequest, x_tuneforge_project: ProjectHeader = None
    ) -> Any:
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        return await run_in_threadpool(classifier.classify, target, body.texts())

    @app.get("/internal/merged/{model_id:path}", response_class=FileResponse)
    async def merged(model_id: str, x_tuneforge_project: ProjectHeader = None) -> FileResponse:
        target = await run_in_threadpool(resolver, model_id, project=x_tuneforge_project)
        archive = await run_in_threadpool(merge.merged_archive, target)
        filename = model_id.replace(":", "_").replace("/", "_") + "-merged.tar.gz"
        return FileResponse(archive, media_type="application/gzip", filename=filename)

    return app


def _generation(
    body: _Sampling, target: Target, max_tokens: int | None = None, **prompt: Any
) -> GenerationRequest:
    return GenerationRequest(
        target=target,
        max_tokens=max_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        **prompt,
    )


async def _respond(batcher: Batcher, body: _Sampling, request: GenerationRequest, *, chat: bool) -> Any:
    handle = batcher.submit(request)
    try:
        prompt_tokens = await handle.accepted()
    except PromptTooLong as exc:
        param = "messages" if chat else "prompt"
        raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
    except UnsupportedModel as exc:
        raise ApiError(400, str(exc), param="model", code="model_not_servable") from None
    shape = _Shape(body.model, chat, prompt_tokens)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(handle, shape, include_usage), media_type="text/event-stream")
    parts, finish, completion_tokens = [], "stop", 0
    async for step in handle.steps():
        parts.append(step.text)
        finish, completion_tokens = step.finish_reason or finish, step.completion_tokens
    return JSONResponse(shape.whole("".join(parts), finish, completion_tokens))


class _Shape:
    """Renders one request's answer as OpenAI's objects: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _object(
        self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int] | None
    ) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return body | ({"usage": usage} if usage is not None else {})

    def whole(self, text: str, finish: str, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            return self._object(
                "chat.completion", [choice | {"finish_reason": finish}], self.usage(completion_tokens)
            )
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._object("text_completion", [choice], self.usage(completion_tokens))

    def chunk(self, text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._object("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._object("text_completion", [choice], None)

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], self.usage(completion_tokens))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sse(handle: Handle, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: chunks as the text grows, one with the finish reason, optional usage, [DONE]."""
    completion_tokens = 0
    try:
        if shape.chat:
            yield _event(shape.chunk(None, None, first=True))
        async for step in handle.steps():
            completion_tokens = step.completion_tokens
            if step.text:
                yield _event(shape.chunk(step.text, None))
            if step.finish_reason is not None:
                yield _event(shape.chunk(None, step.finish_reason))
        if include_usage:
            yield _event(shape.usage_chunk(completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are gone: report in the stream, as OpenAI does
        yield _event(envelope(f"Generation failed: {exc}", "server_error", None, "generation_failed"))
    finally:
        handle.cancel()  # a client that left early frees its row in the batch


def run_server(host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until interrupted (uvicorn, one process: the engine keeps its models in this process)."""
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level="info")
