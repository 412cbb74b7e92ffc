"""Log lines of every process, as JSON objects or lines for people, carrying what they are about.

Each line carries `request_id`, `project`, `job_id` and `attempt` when the code that logs runs for a
request or a job attempt. They live in one dict per request or attempt, held in a context variable:
FastAPI runs sync dependencies and routes in threads, each with a copy of the context, so a value set
in one (the project, found by the auth dependency) would not reach the others; the shared dict does.
"""

import contextvars
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import get_settings

FIELDS = ("request_id", "project", "job_id", "attempt")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "tuneforge_log", default=None
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("tuneforge.requests")


@contextmanager
def bound(**fields: Any) -> Iterator[dict[str, Any]]:
    """Lines logged inside carry `fields` (and whatever is added to the yielded dict later)."""
    context = dict(fields)
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the current request's or attempt's lines, wherever in it this runs."""
    context = _CONTEXT.get()
    if context is not None:
        context.update(fields)


class _WithContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _CONTEXT.get() or {}
        for name in FIELDS:
            setattr(record, name, context.get(name))
        return True


def configure(*, run_log: bool = False) -> None:
    """Send this process's log lines to stderr in the configured format (TUNEFORGE_LOG_FORMAT).

    `auto` is console on a terminal and JSON otherwise, except in a run's own log (`run_log`), which
    people read through GET .../logs: console unless JSON is asked for.
    """
    chosen = get_settings().log_format
    if chosen == "auto":
        chosen = "console" if run_log or sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WithContext())
    if chosen == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):  # one format for every line
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # httpx logs each request at INFO, URL and all: webhook URLs may hold a receiver's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # boto3 says where it found credentials at INFO, in every process that touches the object store.
    logging.getLogger("botocore").setLevel(logging.WARNING)


class RequestContext:
    """Give each request an id (the client's `X-Request-ID` if it is sane, else a new one), log it with
    every line logged while it is served, return it in `X-Request-ID`, and log one line when it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        started, status = time.monotonic(), [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with bound(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status[0],
                    extra={"status": status[0], "duration_ms": round((time.monotonic() - started) * 1000, 1)},
                )
