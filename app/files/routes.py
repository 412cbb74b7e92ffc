"""HTTP routes for /v1/files."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import FileResponse

from app import idempotency
from app.config import get_settings
from app.deps import ProjectDep, SessionDep
from app.files import service as file_service
from app.files.schemas import FileDeleted, FilePublic, FilesPublic
from app.idempotency import IdempotencyKeyDep
from app.storage import get_store

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic)
def upload_file(
    session: SessionDep,
    project: ProjectDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    key: IdempotencyKeyDep,
    response: Response,
) -> FilePublic:
    limit = get_settings().max_upload_mb << 20
    row, created = idempotency.create_file(
        session,
        project=project,
        key=key,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        stream=file.file,
        limit_bytes=limit,
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return file_service.to_public(row)


@router.get("", response_model=FilesPublic)
def list_files(session: SessionDep, project: ProjectDep, purpose: str | None = None) -> FilesPublic:
    rows = file_service.list_files(session, project=project, purpose=purpose)
    return FilesPublic(data=[file_service.to_public(r) for r in rows])


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, session: SessionDep, project: ProjectDep) -> FilePublic:
    return file_service.to_public(file_service.get_file(session, project=project, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, project: ProjectDep) -> FileResponse:
    row = file_service.get_file(session, project=project, file_id=file_id)
    return FileResponse(
        get_store().local_path(row.storage_key), media_type="application/jsonl", filename=row.filename
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileDeleted:
    file_service.delete_file(session, project=project, file_id=file_id)
    return FileDeleted(id=file_id)
