"""The internal inference HTTP server: OpenAI's chat and text completions, streaming or not.

It also answers classifications (`classifier`) and merged model exports (`merge`), for the API to relay.

Only the Tuneforge API may call it: every request but ``/healthz`` must carry
``Authorization: Bearer <TUNEFORGE_INFERENCE_SECRET>``, the secret the API and this server share (no
secret, no server: `run_server` refuses to start without one). The API names the model by id and the
project asking in the ``X-Tuneforge-Project`` header; this server resolves the id itself (database and
artifact store, see `resolve`), so 404 and 409 are decided in one place. Errors use OpenAI's envelope.

Run it with ``python -m worker.serving --host 127.0.0.1 --port 8001`` or `run_server`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app import logs
from app.errors import ApiError, envelope, install_error_handlers
from worker.serving import classifier, merge
from worker.serving.batcher import Batcher, Handle
from worker.serving.engine import Engine, GenerationRequest, Refused, Target, UnsupportedModel
from worker.serving.resolve import resolve
from worker.serving.schemas import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from worker.serving.settings import SECRET_VARIABLE, secret_problem, serving_settings
from worker.serving.telemetry import install_metrics

Resolver = Callable[..., Target]
# FastAPI reads a `x_tuneforge_project` parameter from the X-Tuneforge-Project header (any case).
ProjectHeader = Annotated[str | None, Header()]
OPEN_PATHS = {"/healthz"}  # the API's /readyz probes it without the secret; it tells nothing about models


def create_app(
    engine: Engine | None = None, resolver: Resolver = resolve, *, secret: str | None = None
) -> FastAPI:
    """The app; `engine` defaults to one built from the serving settings, `secret` to theirs (required)."""
    settings = serving_settings()
    secret = settings.inference_secret if secret is None else secret
    problem = secret_problem(secret)
    if problem is not None:
        raise ValueError(f"the inference server needs a shared secret: {problem}")

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
    install_metrics(app)
    app.add_middleware(RequireSecret, secret=secret)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, x_tuneforge_project: ProjectHeader = None) -> Any:
        body.check_supported()
        messages = body.plain_messages()
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        limit_param, limit = body.token_limit
        request = GenerationRequest(target=target, messages=messages, max_tokens=limit, **body.sampling)
        return await _respond(app.state.batcher, body, [request], chat=True, limit_param=limit_param)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, x_tuneforge_project: ProjectHeader = None) -> Any:
        body.check_supported()
        prompts = body.prompts()
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        requests = [
            GenerationRequest(
                target=target,
                max_tokens=body.max_tokens,
                default_max_tokens=DEFAULT_MAX_TOKENS,
                **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}),
                **body.sampling,
            )
            for p in prompts
        ]
        return await _respond(app.state.batcher, body, requests, chat=False)

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


class RequireSecret:
    """Refuses every request but OPEN_PATHS without `Authorization: Bearer <secret>`, in OpenAI's envelope.

    ASGI middleware rather than a route dependency, so unknown paths and /docs are covered too.
    """

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app, self.secret = app, secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        message = (
            "This is Tuneforge's internal inference server: it answers only the Tuneforge API, which sends "
            f"`Authorization: Bearer <secret>`. Give the API and this server the same {SECRET_VARIABLE}."
        )
        body = envelope(message, "invalid_request_error", None, "invalid_inference_secret")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        # compare_digest takes as long whatever prefix matches, so timing tells nothing about the secret
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.secret)


async def _respond(
    batcher: Batcher,
    body: ChatCompletionRequest | CompletionRequest,
    requests: list[GenerationRequest],
    *,
    chat: bool,
    limit_param: str = "max_tokens",
) -> Any:
    """Submit the requests (one per prompt) together; answer one choice each, whole or streamed."""
    handles = [batcher.submit(request) for request in requests]
    try:
        prompt_tokens = [await handle.accepted() for handle in handles]
    except Refused as exc:
        _cancel(handles)
        param = limit_param if exc.field == "max_tokens" else exc.field
        raise ApiError(400, str(exc), param=param, code=exc.code) from None
    except UnsupportedModel as exc:
        _cancel(handles)
        raise ApiError(400, str(exc), param="model", code="model_not_servable") from None
    except BaseException:
        _cancel(handles)
        raise
    shape = _Shape(body.model, chat, sum(prompt_tokens))
    if body.stream:
        return StreamingResponse(_sse(handles, shape, body.include_usage), media_type="text/event-stream")
    try:
        answers = [await _whole(handle) for handle in handles]
    finally:
        _cancel(handles)
    return JSONResponse(shape.whole(answers))


def _cancel(handles: list[Handle]) -> None:
    for handle in handles:
        handle.cancel()


async def _whole(handle: Handle) -> tuple[str, str, int]:
    """One request's whole text, finish reason and completion tokens."""
    parts, finish, completion_tokens = [], "stop", 0
    async for step in handle.steps():
        parts.append(step.text)
        finish, completion_tokens = step.finish_reason or finish, step.completion_tokens
    return "".join(parts), finish, completion_tokens


class _Shape:
    """Renders one request's answer as OpenAI's objects: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

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

    def whole(self, answers: list[tuple[str, str, int]]) -> dict[str, Any]:
        """The whole answer: one choice per (text, finish reason, completion tokens), usage summed."""
        choices = []
        for index, (text, finish, _tokens) in enumerate(answers):
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choices.append(choice)
        return self._object(self.kind, choices, self.usage(sum(tokens for *_, tokens in answers)))

    def chunk(
        self, index: int, text: str | None, finish: str | None, *, first: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._object("chat.completion.chunk", [choice], None)
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._object("text_completion", [choice], None)

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], self.usage(completion_tokens))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sse(handles: list[Handle], shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: chunks as the text grows, one with the finish reason, optional usage, [DONE].

    Several prompts stream one after another, each chunk naming its choice's `index`: they share a batch,
    so the later ones' steps wait in their queues meanwhile and nothing is slower than interleaving.
    """
    completion_tokens = 0
    try:
        for index, handle in enumerate(handles):
            if shape.chat:
                yield _event(shape.chunk(index, None, None, first=True))
            async for step in handle.steps():
                if step.text:
                    yield _event(shape.chunk(index, step.text, None))
                if step.finish_reason is not None:
                    completion_tokens += step.completion_tokens
                    yield _event(shape.chunk(index, None, step.finish_reason))
        if include_usage:
            yield _event(shape.usage_chunk(completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are gone: report in the stream, as OpenAI does
        yield _event(envelope(f"Generation failed: {exc}", "server_error", None, "generation_failed"))
    finally:
        _cancel(handles)  # a client that left early frees its rows in the batch


def run_server(host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until interrupted (uvicorn, one process: the engine keeps its models in this process)."""
    import uvicorn

    problem = secret_problem(serving_settings().inference_secret)
    if problem is not None:
        raise SystemExit(
            f"Refusing to start the inference server: {problem}. It answers only callers that send this "
            f"shared secret, so set the same {SECRET_VARIABLE} (16 or more characters, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) for it and for the API. "
            "`tuneforge up` generates one for both."
        )
    logs.configure()
    uvicorn.run(create_app(), host=host, port=port, log_config=None)
