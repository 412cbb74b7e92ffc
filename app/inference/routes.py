"""HTTP routes served by the inference server: authenticate, then forward.

Authentication uses a session of its own that is closed before forwarding (`ProjectOnlyDep`): a
generation can take minutes, and no database connection may wait on it. A client that leaves before a
whole answer is ready closes the upstream request, so the inference server stops generating for it.

Chat and text completions, classifications, and merged model exports. `app.main` includes this router
before the models router, whose catch-all `/v1/models/{id}` would otherwise take `/v1/models/{id}/merged`.
"""

from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.deps import ProjectOnlyDep
from app.disconnect import unless_disconnected
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
async def chat_completions(request: Request, project: ProjectOnlyDep, client: ClientDep) -> Response:
    """OpenAI's chat completions (`stream` gives server-sent events) for base and fine-tuned models."""
    body = await request.body()
    answer = inference_service.forward(client, path="/v1/chat/completions", raw_body=body, project=project)
    return await unless_disconnected(request, answer)


@router.post("/completions", openapi_extra=_BODY_DOC)
async def completions(request: Request, project: ProjectOnlyDep, client: ClientDep) -> Response:
    """OpenAI's text completions (`stream` gives server-sent events) for base and fine-tuned models."""
    body = await request.body()
    answer = inference_service.forward(client, path="/v1/completions", raw_body=body, project=project)
    return await unless_disconnected(request, answer)


@router.post("/classifications", openapi_extra=_BODY_DOC)
async def classifications(request: Request, project: ProjectOnlyDep, client: ClientDep) -> Response:
    """Labels and their probabilities for `input` (a text or a list of texts) from a classification model."""
    body = await request.body()
    return await inference_service.classify(client, raw_body=body, project=project)


@router.get("/models/{model_id:path}/merged", response_class=Response)
async def download_merged(model_id: str, project: ProjectOnlyDep, client: ClientDep) -> Response:
    """The fine-tuned model merged into its base: full safetensors weights (.tar.gz) to deploy elsewhere."""
    return await inference_service.download_merged(client, model_id=model_id, project=project)
