"""HTTP routes for /v1/models."""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import ProjectDep, SessionDep
from app.digest import HEADER, archive_name, repr_digest
from app.models import service as model_service
from app.models.schemas import ModelDeleted, ModelPublic, ModelsPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, project: ProjectDep) -> ModelsPublic:
    return ModelsPublic(
        data=[model_service.to_public(m) for m in model_service.list_models(session, project=project)]
    )


# Registered before the plain retrieve route: model ids may contain '/' and ':'.
@router.get("/{model_id:path}/adapter", response_class=FileResponse)
def download_adapter(model_id: str, session: SessionDep, project: ProjectDep) -> FileResponse:
    path = model_service.adapter_path(session, project=project, model_id=model_id)
    return FileResponse(
        path,
        media_type="application/gzip",
        filename=archive_name(model_id),
        headers={HEADER: repr_digest(path)},
    )


@router.get("/{model_id:path}", response_model=ModelPublic)
def retrieve_model(model_id: str, session: SessionDep, project: ProjectDep) -> ModelPublic:
    return model_service.to_public(model_service.get_model(session, project=project, model_id=model_id))


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, session: SessionDep, project: ProjectDep) -> ModelDeleted:
    model_service.delete_model(session, project=project, model_id=model_id)
    return ModelDeleted(id=model_id)
