"""Files: training files, validated on upload, and the results files of jobs; stored as artifacts, owned by
one project."""

import hashlib
import re
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.session import after_commit, lock_rows
from app.db.tables import Job, TrainingFile
from app.errors import ApiError, not_found
from app.files.schemas import FilePublic
from app.files.validation import validate_training_file
from app.storage import get_store

PURPOSES = ("fine-tune",)  # what an upload may be
# A file Tuneforge writes itself: a succeeded job's step metrics (CSV), and TensorBoard's event files when
# the job reports to TensorBoard. Never uploaded, never trained on.
RESULTS_PURPOSE = "fine-tune-results"
MEDIA_TYPES = {"fine-tune": "application/jsonl", RESULTS_PURPOSE: "text/csv"}
# A results file that is an archive (TensorBoard's event files) rather than the step metrics' CSV.
ARCHIVE_SUFFIX, ARCHIVE_MEDIA_TYPE = ".tar.gz", "application/gzip"
MAX_LIST_LIMIT = 10_000  # OpenAI's maximum and default for GET /v1/files
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def to_public(row: TrainingFile) -> FilePublic:
    return FilePublic(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
    )


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def media_type(row: TrainingFile) -> str:
    """The content type a file's bytes are served with."""
    if row.purpose == RESULTS_PURPOSE and row.filename.endswith(ARCHIVE_SUFFIX):
        return ARCHIVE_MEDIA_TYPE
    return MEDIA_TYPES.get(row.purpose, "application/octet-stream")


def _spool(stream: BinaryIO, limit_bytes: int) -> tuple[Path, int, str]:
    """Copy the upload to a temp file, stopping as soon as it passes the size limit."""
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(delete=False, prefix="tuneforge-upload-") as out:
        tmp = Path(out.name)
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit_bytes:
                out.close()
                tmp.unlink(missing_ok=True)
                raise ApiError(
                    413,
                    f"File is larger than the {limit_bytes // (1 << 20)} MB upload limit.",
                    param="file",
                    code="file_too_large",
                )
            digest.update(chunk)
            out.write(chunk)
    return tmp, size, digest.hexdigest()


def create_file(
    session: Session, *, project: str, filename: str, purpose: str, stream: BinaryIO, limit_bytes: int
) -> TrainingFile:
    """Validate and store an uploaded training file; a file with errors is rejected whole."""
    if purpose not in PURPOSES:
        raise ApiError(400, f"Unsupported purpose '{purpose}': use one of {list(PURPOSES)}.", param="purpose")
    filename = _CONTROL.sub("", filename)[-255:] or "upload.jsonl"  # it is echoed back and stored in Postgres
    tmp, size, sha256 = _spool(stream, limit_bytes)
    try:
        with tmp.open("rb") as spooled:  # read line by line: memory stays at about one line
            report = validate_training_file(spooled, max_line_bytes=get_settings().max_line_kb << 10)
        if not report.ok:
            listed = "; ".join(e.message for e in report.errors[:5])
            more = f" ({report.error_count} errors in all)" if report.error_count > 5 else ""
            first = report.errors[0]
            raise ApiError(
                400, f"Invalid training file '{filename}': {listed}{more}", param="file", code=first.code
            )
        row = TrainingFile(
            id=new_file_id(),
            project=project,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            format=report.format,
            example_count=report.example_count,
            storage_key="",
        )
        row.storage_key = f"files/{row.id}.jsonl"
        get_store().put_file(row.storage_key, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    session.add(row)
    session.flush()
    return row


def add_results_file(
    session: Session, *, project: str, file_id: str, filename: str, content: bytes
) -> TrainingFile:
    """Store a job's results file (purpose `fine-tune-results`) for its project, and add the file's row.

    The bytes are in the store before the row can commit; should the transaction roll back, they stay
    behind unnamed by any row.
    """
    row = TrainingFile(
        id=file_id,
        project=project,
        filename=filename,
        purpose=RESULTS_PURPOSE,
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        format=None,
        storage_key=f"files/{file_id}{ARCHIVE_SUFFIX if filename.endswith(ARCHIVE_SUFFIX) else '.csv'}",
    )
    with tempfile.NamedTemporaryFile(prefix="tuneforge-results-") as spooled:
        spooled.write(content)
        spooled.flush()
        get_store().put_file(row.storage_key, Path(spooled.name))
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, project: str, file_id: str, param: str | None = None) -> TrainingFile:
    """A file of this project, or a 404 that names the id."""
    row = None if "\x00" in file_id else session.get(TrainingFile, file_id)  # Postgres refuses NUL
    if row is None or row.project != project:
        raise not_found("file", file_id, param=param)
    return row


def list_files(
    session: Session,
    *,
    project: str,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = MAX_LIST_LIMIT,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[list[TrainingFile], bool]:
    """A page of this project's files in creation order, and whether more follow.

    `after` is the id of the last file of the previous page; an id that is not one of this project's
    files is a 404, as for any other reference to a file (another project's id reads as unknown).
    """
    query = select(TrainingFile).where(TrainingFile.project == project)
    if purpose:
        query = query.where(TrainingFile.purpose == purpose)
    # Sorted by (created_at, id): the id breaks ties within a microsecond, so pages never overlap or skip.
    key = tuple_(TrainingFile.created_at, TrainingFile.id)
    if after:
        cursor = get_file(session, project=project, file_id=after, param="after")
        position = (cursor.created_at, cursor.id)
        query = query.where(key > position if order == "asc" else key < position)
    columns = (TrainingFile.created_at, TrainingFile.id)
    sort = [column.asc() if order == "asc" else column.desc() for column in columns]
    rows = list(session.scalars(query.order_by(*sort).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, *, project: str, file_id: str) -> None:
    """Delete a file unless an unfinished job still needs it; its bytes go once the deletion commits.

    The file row is locked before the check: a job being created with this file (which locks it too)
    either committed first, and is found here, or waits and then finds the file gone.
    """
    row = get_file(session, project=project, file_id=file_id)
    lock_rows(session, TrainingFile.id, [file_id])
    in_use = session.scalar(
        select(Job.id).where(
            (Job.training_file == file_id) | (Job.validation_file == file_id),
            Job.status.in_(("validating_files", "queued", "running", "paused")),
        )
    )
    if in_use:
        raise ApiError(
            409,
            f"File '{file_id}' is used by unfinished job '{in_use}'.",
            param="file_id",
            code="file_in_use",
        )
    session.delete(row)
    session.flush()
    after_commit(session, lambda: get_store().delete(row.storage_key))
