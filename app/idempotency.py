"""`Idempotency-Key` on POST /v1/fine_tuning/jobs and POST /v1/files: a retried create returns its object.

Keys belong to a project; another project's identical key is another key. The first request under a key
that succeeds records a digest of the request and the id of what it created, in the same transaction as
the object. A later request under that key
- with the same request returns that object as it is now (200), creates nothing and enqueues nothing;
- with a different request, or on the other endpoint, is refused with 400 `idempotency_key_reused`,
  naming the fields that differ.
A request that fails (a 400 for an invalid file, 413, a 400 spec) records nothing: fix it and retry with
the same key. "Same request" is, for a job, the JSON body as parsed (key order, spacing and spelled-out
defaults do not matter); for a file, its filename, purpose and content sha256. A key is remembered for
`IDEMPOTENCY_KEY_HOURS` (24 by default, as OpenAI and Stripe do); after that it is a new key, and the
reconciler deletes it (`purge_expired`).

Concurrent requests under one key may all miss the lookup and create an object each; each then inserts
the key row. Postgres holds every insert after the first on the (project, key) primary key until the
first transaction ends, then fails it: the losers roll back their object (and delete their stored
upload) and return the winner's object, so a race never surfaces as a 409.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, BinaryIO

from fastapi import Depends, Header
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.tables import IdempotencyKey, Job, TrainingFile, utcnow
from app.errors import ApiError
from app.files import service as file_service
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from app.storage import get_store

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
JOB, FILE = "fine_tuning.job", "file"
CHUNK = 1 << 20


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description="Up to 255 characters; a retry with the same key and request returns the first "
            "object instead of creating another.",
        ),
    ] = None,
) -> str | None:
    """The request's Idempotency-Key, or None; 400 for an empty or over-long one."""
    if key is not None and (not key.strip() or len(key) > MAX_LENGTH):
        raise ApiError(
            400,
            f"The {HEADER} header must be 1 to {MAX_LENGTH} characters, not blank; got {len(key)}.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _content_sha256(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Keyed:
    """A create request under an idempotency key: who sent it, the key, what it creates, its digests."""

    project: str
    key: str
    object_type: str
    fields: dict[str, str]


def _expired_before() -> datetime:
    return utcnow() - timedelta(hours=get_settings().idempotency_key_hours)


def purge_expired(session: Session) -> int:
    """Delete the keys older than `IDEMPOTENCY_KEY_HOURS`; returns how many."""
    done = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < _expired_before()))
    return done.rowcount or 0  # type: ignore[attr-defined]


def _earlier(session: Session, request: _Keyed) -> str | None:
    """The id of the object an earlier request under the key created, None if none; 400 if it differed."""
    row = session.get(IdempotencyKey, (request.project, request.key))
    if row is not None and row.created_at < _expired_before():
        session.delete(row)  # expired, not yet purged: the key is free again
        session.flush()
        row = None
    if row is None:
        return None
    if row.object_type != request.object_type:
        raise ApiError(
            400,
            f"{HEADER} '{request.key}' was already used to create {row.object_type} '{row.object_id}'; "
            "send a new key for a new request.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    if row.request_hash != _digest(request.fields):
        names = request.fields.keys() | row.request_fields.keys()
        differ = sorted(n for n in names if request.fields.get(n) != row.request_fields.get(n))
        raise ApiError(
            400,
            f"{HEADER} '{request.key}' was already used with a different request (it differs in "
            f"{', '.join(differ)}) that created {row.object_type} '{row.object_id}'; "
            "send a new key for a new request.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return row.object_id


def _claim(session: Session, request: _Keyed, object_id: str) -> bool:
    """Record the key for a new object; False, with the transaction rolled back, if another request won it."""
    session.add(
        IdempotencyKey(
            project=request.project,
            key=request.key,
            request_hash=_digest(request.fields),
            request_fields=request.fields,
            object_type=request.object_type,
            object_id=object_id,
        )
    )
    try:
        session.flush()  # waits here while a concurrent request with this key is uncommitted
    except IntegrityError:
        session.rollback()
        return False
    return True


def _winner(session: Session, request: _Keyed) -> str:
    """After losing the race for a key: the object the winning request created."""
    object_id = _earlier(session, request)
    if object_id is None:  # only if the winner's key expired in between: not within a request's time
        raise ApiError(409, f"{HEADER} '{request.key}' is in use by another request; retry.", param=HEADER)
    return object_id


def create_job(session: Session, *, project: str, key: str | None, spec: JobCreate) -> tuple[Job, bool]:
    """Create a job, or return the one created under `key`; True when it is new and must be sent."""
    if key is None:
        return job_service.create_job(session, project=project, spec=spec), True
    fields = {name: _digest(value) for name, value in spec.model_dump(mode="json").items()}
    request = _Keyed(project, key, JOB, fields)
    job_id = _earlier(session, request)
    if job_id is None:
        job = job_service.create_job(session, project=project, spec=spec)
        if _claim(session, request, job.id):
            return job, True
        job_id = _winner(session, request)
    return job_service.get_job(session, project=project, job_id=job_id), False


def create_file(
    session: Session,
    *,
    project: str,
    key: str | None,
    filename: str,
    purpose: str,
    stream: BinaryIO,
    limit_bytes: int,
) -> tuple[TrainingFile, bool]:
    """Upload a file, or return the one uploaded under `key`; True when it is new."""

    def upload() -> TrainingFile:
        return file_service.create_file(
            session,
            project=project,
            filename=filename,
            purpose=purpose,
            stream=stream,
            limit_bytes=limit_bytes,
        )

    if key is None:
        return upload(), True
    fields = {"filename": _digest(filename), "purpose": _digest(purpose), "content": _content_sha256(stream)}
    request = _Keyed(project, key, FILE, fields)
    file_id = _earlier(session, request)
    if file_id is None:
        row = upload()
        stored = row.storage_key
        if _claim(session, request, row.id):
            return row, True
        get_store().delete(stored)  # its row was rolled back; the winner's copy stays
        file_id = _winner(session, request)
    try:
        return file_service.get_file(session, project=project, file_id=file_id), False
    except ApiError as gone:
        raise ApiError(
            409,
            f"File '{file_id}', uploaded with {HEADER} '{key}', has been deleted; "
            "send a new key to upload it again.",
            param=HEADER,
            code="idempotency_object_deleted",
        ) from gone
