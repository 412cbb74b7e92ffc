"""Request dependencies: a transaction per request; the caller's project from its API key, rate-limited."""

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from app import logs, ratelimit
from app.db.session import session_scope
from app.errors import ApiError
from app.keys import service as key_service


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


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
