"""HTTP routes for /v1/files."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse

from app import idempotency
from app.config import get_settings
from app.deps import ProjectDep, SessionDep, page_limit
from app.files import service as file_service
from app.files.schemas import FileDeleted, FilePublic, FilesPublic
from app.idempotency import IdempotencyKeyDep
from app.storage import get_store

router = APIRouter(prefix="/v1/files", tags=["files"])
MAX = file_service.MAX_LIST_LIMIT  # OpenAI's default and maximum for GET /v1/files
Limit = Annotated[int, Depends(page_limit(default=MAX, maximum=MAX))]


def _with_file_id(operation_id: str) -> dict:
    """An OpenAPI link: the uploaded file's id is the `file_id` of `operation_id`."""
    return {"operationId": operation_id, "parameters": {"file_id": "$response.body#/id"}}


# OpenAPI links from an upload to what can be done with the file (operation ids as OpenAI names them).
# API explorers and schemathesis' stateful tests follow them with the real id (tests/test_schemathesis.py).
FILE_LINKS = {
    "retrieve": _with_file_id("retrieveFile"),
    "content": _with_file_id("downloadFile"),
    "delete": _with_file_id("deleteFile"),
    "trainOn": {"operationId": "createFineTuningJob", "requestBody": {"training_file": "$response.body#/id"}},
    "estimateOn": {
        "operationId": "estimateFineTuning",
        "requestBody": {"training_file": "$response.body#/id"},
    },
}


@router.post("", response_model=FilePublic, operation_id="createFile", responses={200: {"links": FILE_LINKS}})
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


@router.get("", response_model=FilesPublic, operation_id="listFiles")
def list_files(
    session: SessionDep,
    project: ProjectDep,
    limit: Limit,
    purpose: Annotated[str | None, Query(description="Only files with this purpose.")] = None,
    order: Annotated[
        Literal["asc", "desc"], Query(description="By `created_at`: `asc` oldest first, `desc` newest.")
    ] = "desc",
    after: Annotated[
        str | None, Query(description="The `last_id` of the previous page: list the files after it.")
    ] = None,
) -> FilesPublic:
    rows, has_more = file_service.list_files(
        session, project=project, purpose=purpose, after=after, limit=limit, order=order
    )
    return FilesPublic(
        data=[file_service.to_public(r) for r in rows],
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FilePublic, operation_id="retrieveFile")
def retrieve_file(file_id: str, session: SessionDep, project: ProjectDep) -> FilePublic:
    return file_service.to_public(file_service.get_file(session, project=project, file_id=file_id))


# The file's bytes: an uploaded file as it was uploaded, one JSON document a line; a job's results file
# (purpose `fine-tune-results`) as CSV. Documented as such, not as FastAPI's JSON default.
FILE_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes.",
        "content": {
            media: {"schema": {"type": "string"}}
            for media in (*file_service.MEDIA_TYPES.values(), file_service.ARCHIVE_MEDIA_TYPE)
        },
    }
}


@router.get(
    "/{file_id}/content", operation_id="downloadFile", response_class=FileResponse, responses=FILE_CONTENT
)
def file_content(file_id: str, session: SessionDep, project: ProjectDep) -> FileResponse:
    row = file_service.get_file(session, project=project, file_id=file_id)
    return FileResponse(
        get_store().local_path(row.storage_key),
        media_type=file_service.media_type(row),
        filename=row.filename,
    )


@router.delete("/{file_id}", response_model=FileDeleted, operation_id="deleteFile")
def delete_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileDeleted:
    file_service.delete_file(session, project=project, file_id=file_id)
    return FileDeleted(id=file_id)
