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

from fastapi import FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app import logs
from app.config import SECRET_VARIABLE, get_settings, secret_problem
from app.digest import HEADER as DIGEST_HEADER
from app.digest import archive_name, repr_digest
from app.disconnect import unless_disconnected
from app.errors import ApiError, envelope, install_error_handlers
from worker.serving import classifier, merge
from worker.serving.batcher import Batcher, Order
from worker.serving.decode import Step, TokenLogprob
from worker.serving.engine import Engine, GenerationRequest, Refused, Target, UnsupportedModel
from worker.serving.resolve import resolve
from worker.serving.schemas import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from worker.serving.telemetry import install_metrics
from worker.serving.tools import ToolCall, ToolCallParser

Resolver = Callable[..., Target]
# FastAPI reads a `x_tuneforge_project` parameter from the X-Tuneforge-Project header (any case).
ProjectHeader = Annotated[str | None, Header()]
OPEN_PATHS = {"/healthz"}  # the API's /readyz probes it without the secret; it tells nothing about models


def create_app(
    engine: Engine | None = None, resolver: Resolver = resolve, *, secret: str | None = None
) -> FastAPI:
    """The app; `engine` defaults to one built from the settings, `secret` to theirs (required)."""
    settings = get_settings()
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
            project_max_rows=settings.serving_project_max_rows,
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
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, x_tuneforge_project: ProjectHeader = None
    ) -> Any:
        body.check_supported()
        messages = body.plain_messages()
        grammar, grammar_field = body.tool_grammar(), "tool_choice"
        if grammar is None and body.response_format is not None:
            grammar, grammar_field = body.response_format.grammar(), "response_format"
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        limit_param, limit = body.token_limit
        requests = [
            GenerationRequest(
                target=target,
                messages=messages,
                max_tokens=limit,
                default_max_tokens=settings.chat_default_max_tokens,
                seed=body.seed_of(choice),
                logprobs=body.logprobs_asked,
                project=x_tuneforge_project or "",
                grammar=grammar,
                grammar_field=grammar_field,
                tools=body.tool_dicts,
                **body.sampling,
            )
            for choice in range(body.choices)
        ]
        tool_names = {tool["function"]["name"] for tool in body.tool_dicts or []}
        shape = _Shape(body.model, chat=True, choices_per_prompt=body.choices, tool_names=tool_names)
        return await _respond(app.state.batcher, request, body, requests, shape, limit_param=limit_param)

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest, request: Request, x_tuneforge_project: ProjectHeader = None
    ) -> Any:
        body.check_supported()
        prompts = body.prompts()
        target = await run_in_threadpool(resolver, body.model, project=x_tuneforge_project)
        requests = [
            GenerationRequest(
                target=target,
                max_tokens=body.max_tokens,
                default_max_tokens=DEFAULT_MAX_TOKENS,
                **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}),
                seed=body.seed_of(choice),
                logprobs=body.logprobs,
                project=x_tuneforge_project or "",
                **body.sampling,
            )
            for p in prompts
            for choice in range(body.choices)
        ]
        shape = _Shape(body.model, chat=False, choices_per_prompt=body.choices)
        return await _respond(app.state.batcher, request, body, requests, shape)

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
        digest = await run_in_threadpool(repr_digest, archive)  # hashing hundreds of MB takes a while
        return FileResponse(
            archive,
            media_type="application/gzip",
            filename=archive_name(model_id, merged=True),
            headers={DIGEST_HEADER: digest},
        )

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
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    generations: list[GenerationRequest],
    shape: _Shape,
    *,
    limit_param: str = "max_tokens",
) -> Any:
    """Submit the generations (one per prompt and choice) as one order; answer whole or streamed."""
    order = batcher.submit(generations)
    try:
        prompt_tokens = await order.accepted()
    except Refused as exc:
        order.cancel()
        param = limit_param if exc.field == "max_tokens" else exc.field
        raise ApiError(400, str(exc), param=param, code=exc.code) from None
    except UnsupportedModel as exc:
        order.cancel()
        raise ApiError(400, str(exc), param="model", code="model_not_servable") from None
    except BaseException:
        order.cancel()
        raise
    shape.prompt_tokens = sum(prompt_tokens[:: shape.choices_per_prompt])  # once per prompt, as OpenAI
    if body.stream:
        return StreamingResponse(_sse(order, shape, body.include_usage), media_type="text/event-stream")
    try:
        return await unless_disconnected(request, _whole(order, shape))
    finally:
        order.cancel()  # a client that left stops its rows at the next step


async def _whole(order: Order, shape: _Shape) -> JSONResponse:
    """Every generation's whole text, finish reason, completion tokens and logprobs, as one answer."""
    answers = [_Answer(request.logprobs is not None) for request in order.requests]
    async for index, step in order.steps():
        answers[index].add(step)
    return JSONResponse(shape.whole(answers))


class _Answer:
    """One choice as it grows."""

    def __init__(self, logprobs_asked: bool) -> None:
        self.logprobs_asked = logprobs_asked
        self.parts: list[str] = []
        self.finish = "stop"
        self.completion_tokens = 0
        self.logprobs: list[TokenLogprob] = []

    def add(self, step: Step) -> None:
        self.parts.append(step.text)
        self.finish, self.completion_tokens = step.finish_reason or self.finish, step.completion_tokens
        if step.logprob is not None:
            self.logprobs.append(step.logprob)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Shape:
    """Renders an order's answers as OpenAI's objects: whole, or as stream chunks."""

    def __init__(
        self, model: str, *, chat: bool, choices_per_prompt: int, tool_names: set[str] | None = None
    ) -> None:
        self.model, self.chat, self.choices_per_prompt = model, chat, choices_per_prompt
        self.tool_names = tool_names or set()
        self.parsers: dict[int, ToolCallParser] = {}  # choice -> its tool call parser, when tools are given
        self.prompt_tokens = 0
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        self.text_offsets: dict[int, int] = {}  # choice -> characters streamed so far (completion logprobs)

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

    def whole(self, answers: list[_Answer]) -> dict[str, Any]:
        """The whole answer: one choice per generation, usage summed."""
        choices = []
        for index, answer in enumerate(answers):
            choice: dict[str, Any] = {"index": index, "finish_reason": answer.finish}
            choice["logprobs"] = self.logprobs(index, answer.logprobs, asked=answer.logprobs_asked)
            if self.chat:
                content, calls, choice["finish_reason"] = self._split(index, answer.text, answer.finish)
                message = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    message |= {
                        "content": content.strip() or None,
                        "tool_calls": [c.as_openai() for c in calls],
                    }
                choice["message"] = message
            else:
                choice["text"] = answer.text
            choices.append(choice)
        completion_tokens = sum(answer.completion_tokens for answer in answers)
        return self._object(self.kind, choices, self.usage(completion_tokens))

    def logprobs(self, index: int, entries: list[TokenLogprob], *, asked: bool) -> dict[str, Any] | None:
        """OpenAI's logprobs object for `entries`: chat's list of tokens, or completions' parallel lists."""
        if not asked:
            return None
        if self.chat:
            content = [
                _token(entry.token, entry.logprob)
                | {"top_logprobs": [_token(text, logprob) for _, text, logprob in entry.top]}
                for entry in entries
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self.text_offsets.get(index, 0))
            self.text_offsets[index] = offsets[-1] + len(entry.token)
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{text: logprob for _, text, logprob in entry.top} for entry in entries],
            "text_offset": offsets,
        }

    def chunk(self, index: int, step: Step | None, *, asked: bool, first: bool = False) -> dict[str, Any]:
        """A stream chunk: the role (first), or what `step` added to choice `index`."""
        text = step.text if step is not None else ""
        finish = step.finish_reason if step is not None else None
        entries = [step.logprob] if step is not None and step.logprob is not None else []
        logprobs = self.logprobs(index, entries, asked=asked) if entries else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            text, calls, finish = self._split(index, text, finish)
            calling = index in self.parsers and (self.parsers[index].calls or self.parsers[index].inside)
            if text and not (calling and not text.strip()):  # no blank lines between calls
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": call.index} | call.as_openai() for call in calls]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return self._object("chat.completion.chunk", [choice], None)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._object("text_completion", [choice], None)

    def _split(self, index: int, text: str, finish: str | None) -> tuple[str, list[ToolCall], str | None]:
        """Choice `index`'s new text as content and tool calls, and its finish reason ("tool_calls" when it
        ended having called); text alone when the request has no tools."""
        if not self.tool_names:
            return text, [], finish
        parser = self.parsers.setdefault(index, ToolCallParser(self.tool_names))
        content, calls = parser.feed(text, final=finish is not None)
        if finish == "stop" and parser.calls:
            finish = "tool_calls"
        return content, calls, finish

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], self.usage(completion_tokens))


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _sse(order: Order, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: chunks as the texts grow (choices interleaved, each naming its `index`), one with
    each choice's finish reason, optional usage, then [DONE]."""
    completion_tokens = 0
    asked = [request.logprobs is not None for request in order.requests]
    try:
        if shape.chat:
            for index in range(len(order.requests)):
                yield _event(shape.chunk(index, None, asked=False, first=True))
        async for index, step in order.steps():
            if step.text or step.finish_reason is not None or step.logprob is not None:
                yield _event(shape.chunk(index, step, asked=asked[index]))
            if step.finish_reason is not None:
                completion_tokens += step.completion_tokens
        if include_usage:
            yield _event(shape.usage_chunk(completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # headers are gone: report in the stream, as OpenAI does
        yield _event(envelope(f"Generation failed: {exc}", "server_error", None, "generation_failed"))
    finally:
        order.cancel()  # a client that left early frees its rows in the batch


def run_server(host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until interrupted (uvicorn, one process: the engine keeps its models in this process)."""
    import uvicorn

    get_settings.cache_clear()  # a server takes its environment as it is when it starts
    problem = secret_problem(get_settings().inference_secret)
    if problem is not None:
        raise SystemExit(
            f"Refusing to start the inference server: {problem}. It answers only callers that send this "
            f"shared secret, so set the same {SECRET_VARIABLE} (16 or more characters, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) for it and for the API. "
            "`tuneforge up` generates one for both."
        )
    logs.configure()
    uvicorn.run(create_app(), host=host, port=port, log_config=None)
