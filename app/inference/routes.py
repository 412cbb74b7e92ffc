"""HTTP routes for /v1/chat/completions and /v1/completions: authenticate, then forward."""

from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.deps import ProjectDep
from app.errors import ApiError
from app.inference import service as inference_service

router = APIRouter(prefix="/v1", tags=["inference"])

# For /docs only: the body is forwarded untouched, and the inference server validates its fields.
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "required": ["model"]}}},
    }
}


def get_client(request: Request) -> httpx.AsyncClient:
    client = getattr(request.app.state, "inference_client", None)
    if client is None:  # only an app used without its lifespan (a bare TestClient) gets here
        raise ApiError(503, "The API was started without its lifespan.", type="server_error")
    return client


ClientDep = Annotated[httpx.AsyncClient, Depends(get_client)]


@router.post("/chat/completions", openapi_extra=_BODY_DOC)
async def chat_completions(request: Request, project: ProjectDep, client: ClientDep) -> Response:
    """OpenAI's chat completions (`stream` gives server-sent events) for base and fine-tuned models."""
    body = await request.body()
    return await inference_service.forward(
        client, path="/v1/chat/completions", raw_body=body, project=project
    )


@router.post("/completions", openapi_extra=_BODY_DOC)
async def completions(request: Request, project: ProjectDep, client: ClientDep) -> Response:
    """OpenAI's text completions (`stream` gives server-sent events) for base and fine-tuned models."""
    body = await request.body()
    return await inference_service.forward(client, path="/v1/completions", raw_body=body, project=project)
