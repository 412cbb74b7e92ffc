"""Request dependencies: a transaction per request; the caller's project from its API key, rate-limited."""

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Query, Request
from sqlalchemy import QueuePool
from sqlalchemy.orm import Session

from app import logs, ratelimit
from app.db.session import get_engine, session_scope
from app.errors import ApiError
from app.keys import service as key_service

_SESSION_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore | None] = (
    weakref.WeakKeyDictionary()
)


def _session_slots() -> asyncio.Semaphore | None:
    """This event loop's slots for request sessions: one fewer than the pool's connections (None: no cap).

    A request's session keeps its connection from its first query (the key check) until the request's
    transaction ends, and in between FastAPI hands the route, and then the check of its response, each to
    a worker thread. With more such requests in flight than the pool has connections, every worker thread
    could be waiting for a connection that a request waiting for a worker thread holds, and nothing would
    move until the pool's timeout failed them all. With at most one fewer such requests than connections,
    a thread that waits for a connection always gets one; the others wait here, holding neither.
    """
    loop = asyncio.get_running_loop()
    if loop not in _SESSION_SLOTS:
        pool, slots = get_engine().pool, None
        if isinstance(pool, QueuePool) and pool._max_overflow >= 0:  # else no connection is waited for
            slots = asyncio.Semaphore(max(1, pool.size() + pool._max_overflow - 1))
        _SESSION_SLOTS[loop] = slots
    return _SESSION_SLOTS[loop]


async def get_session() -> AsyncIterator[Session]:
    """The request's transaction: committed when the route has returned, rolled back if it raised.

    Async, so that opening the session (no I/O: it connects at its first query, in the worker thread that
    runs that query) costs no trip through the thread pool. Ending it does I/O, so it runs in a thread
    with a limit of its own, as FastAPI ends a sync dependency: a commit that would give a connection back
    never waits for a pool thread.
    """
    async with _session_slots() or contextlib.nullcontext():
        scope = session_scope()
        session = scope.__enter__()
        try:
            yield session
        except BaseException as exc:
            if not await _in_own_thread(scope.__exit__, type(exc), exc, exc.__traceback__):
                raise
        else:
            await _in_own_thread(scope.__exit__, None, None, None)


async def _in_own_thread(function: Callable[..., bool | None], *args: object) -> bool | None:
    return await anyio.to_thread.run_sync(function, *args, limiter=anyio.CapacityLimiter(1))


# scope="function": the transaction commits before the response is sent, so a client that acts on a
# response (create a job with the file it just uploaded) always finds what it was told exists.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_project(request: Request, session: SessionDep) -> str:
    """The project of the request's API key; 401 without a live key, 429 past the key's rate limit."""
    return _project_of(request, session)


def get_project_briefly(request: Request) -> str:
    """As `get_project`, in a session of its own that is closed (its connection back in the pool) on return.

    For routes that then wait on another service (the inference server): a session held across that
    wait would hold a database connection for as long as a generation takes.
    """
    with session_scope() as session:
        return _project_of(request, session)


T = TypeVar("T")


async def as_project(request: Request, work: Callable[[Session, str], T]) -> T:
    """`work(session, project)` for the request's API key, in a session that commits when it returns.

    For an async route that reads: the key check, the work and the commit make one trip through the
    thread pool, where a sync route with `SessionDep` and `ProjectDep` makes four (the key check, the
    route, FastAPI's check of its response, the commit), at about 66 us of CPU each (bench/api.py). The
    session's connection is taken and given back within that one trip, so no request holds a connection
    while it waits for a thread.
    """

    def authenticated() -> T:
        with session_scope() as session:
            return work(session, _project_of(request, session))

    return await anyio.to_thread.run_sync(authenticated)


def _project_of(request: Request, session: Session) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' (create one with `tuneforge keys create`).",
            type="invalid_request_error",
            code="missing_api_key",
        )
    project = key_service.project_for_token(session, token=token.strip())
    if project is None:
        raise ApiError(
            401, "Invalid or revoked API key.", type="invalid_request_error", code="invalid_api_key"
        )
    # Counted after authentication, so only live keys get a bucket and unknown tokens cannot grow the table.
    ratelimit.enforce(token.strip())
    logs.annotate(project=project)
    return project


def page_limit(*, default: int, maximum: int) -> Callable[[int], int]:
    """The dependency for a list's `limit`: at least 1; above `maximum`, read as `maximum` (as OpenAI)."""
    described = Query(ge=1, description=f"1 to {maximum}; more is read as {maximum}.")

    def limit(limit: Annotated[int, described] = default) -> int:
        return min(limit, maximum)

    return limit


ProjectDep = Annotated[str, Depends(get_project)]
# The project, with no database session left open for the rest of the request.
ProjectOnlyDep = Annotated[str, Depends(get_project_briefly)]
