"""Training files: validated on upload, stored as artifacts, owned by one project."""

import hashlib
import re
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import Job, TrainingFile
from app.errors import ApiError, not_found
from app.files.schemas import FilePublic
from app.files.validation import validate_training_file
from app.storage import get_store

PURPOSES = ("fine-tune",)
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
        report = validate_training_file(tmp.read_bytes())
        if not report.ok:
            listed = "; ".join(e.message for e in report.errors[:5])
            more = f" ({report.error_count} errors in all)" if report.error_count > 5 else ""
            first = report.errors[0]
            raise ApiError(
                400, f"Invalid training file '{filename}': {listed}{more}", param="file", code=first.code
            )
        row = TrainingFile(
            id="file-" + secrets.token_hex(12),
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


def get_file(session: Session, *, project: str, file_id: str, param: str | None = None) -> TrainingFile:
    """A file of this project, or a 404 that names the id."""
    row = None if "\x00" in file_id else session.get(TrainingFile, file_id)  # Postgres refuses NUL
    if row is None or row.project != project:
        raise not_found("file", file_id, param=param)
    return row


def list_files(session: Session, *, project: str, purpose: str | None = None) -> list[TrainingFile]:
    query = (
        select(TrainingFile).where(TrainingFile.project == project).order_by(TrainingFile.created_at.desc())
    )
    if purpose:
        query = query.where(TrainingFile.purpose == purpose)
    return list(session.scalars(query))


def delete_file(session: Session, *, project: str, file_id: str) -> None:
    """Delete a file unless an unfinished job still needs it."""
    row = get_file(session, project=project, file_id=file_id)
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
    get_store().delete(row.storage_key)
    session.delete(row)
    session.flush()
