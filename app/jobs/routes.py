"""HTTP routes for /v1/fine_tuning/jobs."""

import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse

from app import idempotency, queue
from app.config import get_settings
from app.deps import ProjectDep, SessionDep, as_project, page_limit
from app.errors import ApiError
from app.idempotency import IdempotencyKeyDep
from app.jobs import service as job_service
from app.jobs import streams
from app.jobs.schemas import CheckpointsPublic, EventsPublic, JobCreate, JobPublic, JobsPublic
from app.storage import get_store, log_key

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
log = logging.getLogger(__name__)

_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")
Limit = Annotated[int, Depends(page_limit(default=20, maximum=100))]


def metadata_filter(request: Request) -> dict[str, str]:
    """`?metadata[k]=v` pairs (as the openai SDK sends `metadata={"k": "v"}`): jobs must carry each one."""
    pairs = {}
    for name, value in request.query_params.multi_items():
        if match := _METADATA_KEY.match(name):
            pairs[match.group(1)] = value
    return pairs


MetadataFilter = Annotated[dict[str, str], Depends(metadata_filter)]


def _with_job_id(operation_id: str) -> dict:
    """An OpenAPI link: the job's id in this response is the `job_id` of `operation_id`."""
    return {"operationId": operation_id, "parameters": {"job_id": "$response.body#/id"}}


# OpenAPI links from a new job to what can be done with it (operation ids as OpenAI names them). API
# explorers and schemathesis' stateful tests follow them with the real id (tests/test_schemathesis.py).
JOB_LINKS = {
    "retrieve": _with_job_id("retrieveFineTuningJob"),
    "cancel": _with_job_id("cancelFineTuningJob"),
    "pause": _with_job_id("pauseFineTuningJob"),
    "resume": _with_job_id("resumeFineTuningJob"),
    "events": _with_job_id("listFineTuningEvents"),
    "logs": _with_job_id("retrieveFineTuningJobLogs"),
    "checkpoints": _with_job_id("listFineTuningJobCheckpoints"),
    "trainingFile": {
        "operationId": "retrieveFile",
        "parameters": {"file_id": "$response.body#/training_file"},
    },
}


@router.post(
    "",
    response_model=JobPublic,
    operation_id="createFineTuningJob",
    responses={200: {"links": JOB_LINKS}},
)
def create_job(
    body: JobCreate, session: SessionDep, project: ProjectDep, key: IdempotencyKeyDep, response: Response
) -> JobPublic:
    job, created = idempotency.create_job(session, project=project, key=key, spec=body)
    if created:
        session.commit()  # the message goes out only once the row is durable
        queue.send_jobs(session, [job.id])
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return job_service.to_public(job)


@router.get("", response_model=JobsPublic, operation_id="listPaginatedFineTuningJobs")
def list_jobs(
    session: SessionDep, project: ProjectDep, limit: Limit, metadata: MetadataFilter, after: str | None = None
) -> JobsPublic:
    """Newest first; `metadata[key]=value` (repeatable) keeps the jobs whose metadata has each pair."""
    jobs, has_more = job_service.list_jobs(
        session, project=project, after=after, limit=limit, metadata=metadata
    )
    return JobsPublic(data=[job_service.to_public(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic, operation_id="retrieveFineTuningJob")
async def retrieve_job(job_id: str, request: Request) -> JobPublic:
    """The status clients poll: async, so that it makes one trip through the thread pool (deps.as_project)."""

    def read(session: Session, project: str) -> JobPublic:
        return job_service.to_public(job_service.get_job(session, project=project, job_id=job_id))

    return await as_project(request, read)


@router.post("/{job_id}/cancel", response_model=JobPublic, operation_id="cancelFineTuningJob")
def cancel_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobPublic:
    return job_service.to_public(job_service.cancel_job(session, project=project, job_id=job_id))


STREAM_DESCRIPTION = (
    "With `stream=true`: Server-Sent Events, oldest first, each `data` one event as in the list and `id` "
    "its id; resume after a disconnect with `Last-Event-ID` (or `after`). Keep-alive comments while "
    "quiet; the stream ends after the job's final status event."
)


@router.get(
    "/{job_id}/events",
    response_model=EventsPublic,
    operation_id="listFineTuningEvents",
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def list_events(
    job_id: str,
    session: SessionDep,
    project: ProjectDep,
    limit: Limit,
    after: str | None = None,
    stream: Annotated[bool, Query(description=STREAM_DESCRIPTION)] = False,
    last_event_id: Annotated[str | None, Header(description="With `stream=true`: resume after it.")] = None,
) -> EventsPublic | EventSourceResponse:
    """Newest first, a page at a time (`after`: the last id of the previous page); or, with `stream=true`,
    every event from the first (or after `Last-Event-ID`/`after`) as it is written."""
    if not stream:
        events, has_more = job_service.list_events(
            session, project=project, job_id=job_id, after=after, limit=limit
        )
        return EventsPublic(data=[job_service.event_to_public(e) for e in events], has_more=has_more)
    job_service.get_job(session, project=project, job_id=job_id)
    cursor = last_event_id or after
    after_seq = (
        job_service.event_seq(cursor, param="Last-Event-ID" if last_event_id else "after") if cursor else 0
    )
    return EventSourceResponse(
        streams.event_stream(job_id, after_seq),
        ping=get_settings().stream_ping_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # proxies: pass it on unbuffered
    )


@router.get(
    "/{job_id}/logs",
    operation_id="retrieveFineTuningJobLogs",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def job_logs(
    job_id: str,
    session: SessionDep,
    project: ProjectDep,
    attempt: Annotated[int | None, Query(ge=1, description="Which attempt; the latest by default.")] = None,
    follow: Annotated[bool, Query(description="Keep streaming new lines until the attempt ends.")] = False,
) -> Response:
    """The run's own output (stdout and stderr: Tuneforge's lines, library warnings, tracebacks) for one
    attempt, as stored while it ran."""
    job = job_service.get_job(session, project=project, job_id=job_id)
    if attempt is not None and attempt > max(job.attempt, 1):
        raise ApiError(
            400,
            f"Job {job_id} has run {job.attempt} attempt(s); there is no attempt {attempt}.",
            param="attempt",
            code="invalid_value",
        )
    attempt = attempt or max(job.attempt, 1)
    key = log_key(job_id, attempt)
    if follow:
        return StreamingResponse(
            streams.follow_log(job_id, attempt, key),
            media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    return PlainTextResponse(get_store().read_from(key, 0))


@router.get(
    "/{job_id}/checkpoints", response_model=CheckpointsPublic, operation_id="listFineTuningJobCheckpoints"
)
def list_checkpoints(
    job_id: str, session: SessionDep, project: ProjectDep, limit: Limit, after: str | None = None
) -> CheckpointsPublic:
    job, rows, has_more = job_service.list_checkpoints(
        session, project=project, job_id=job_id, after=after, limit=limit
    )
    data = [job_service.checkpoint_to_public(c, job) for c in rows]
    return CheckpointsPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.post("/{job_id}/pause", response_model=JobPublic, operation_id="pauseFineTuningJob")
def pause_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobPublic:
    """A running job saves a checkpoint at the end of its step and stops; resume continues from it."""
    return job_service.to_public(job_service.pause_job(session, project=project, job_id=job_id))


@router.post("/{job_id}/resume", response_model=JobPublic, operation_id="resumeFineTuningJob")
def resume_job(job_id: str, session: SessionDep, project: ProjectDep) -> JobPublic:
    job, send = job_service.resume_job(session, project=project, job_id=job_id)
    if send:
        session.commit()  # the message goes out only once the row is durable
        queue.send_jobs(session, [job.id])
    return job_service.to_public(job)
