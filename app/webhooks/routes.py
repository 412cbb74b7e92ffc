"""HTTP routes for /v1/webhooks: a project's endpoints, and each endpoint's deliveries."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.deps import ProjectDep, SessionDep, page_limit
from app.webhooks import service as webhook_service
from app.webhooks.schemas import (
    DeliveriesPublic,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointDeleted,
    WebhookEndpointPublic,
    WebhookEndpointsPublic,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Limit = Annotated[int, Depends(page_limit(default=20, maximum=100))]


@router.post("", response_model=WebhookEndpointCreated, operation_id="createWebhookEndpoint")
def create_endpoint(
    spec: WebhookEndpointCreate, session: SessionDep, project: ProjectDep
) -> WebhookEndpointCreated:
    endpoint = webhook_service.create_endpoint(session, project=project, spec=spec)
    return webhook_service.to_created(endpoint)


@router.get("", response_model=WebhookEndpointsPublic, operation_id="listWebhookEndpoints")
def list_endpoints(session: SessionDep, project: ProjectDep) -> WebhookEndpointsPublic:
    endpoints = webhook_service.list_endpoints(session, project=project)
    return WebhookEndpointsPublic(data=[webhook_service.to_public(e) for e in endpoints])


@router.get("/{webhook_id}", response_model=WebhookEndpointPublic, operation_id="retrieveWebhookEndpoint")
def retrieve_endpoint(webhook_id: str, session: SessionDep, project: ProjectDep) -> WebhookEndpointPublic:
    endpoint = webhook_service.get_endpoint(session, project=project, endpoint_id=webhook_id)
    return webhook_service.to_public(endpoint)


@router.delete("/{webhook_id}", response_model=WebhookEndpointDeleted, operation_id="deleteWebhookEndpoint")
def delete_endpoint(webhook_id: str, session: SessionDep, project: ProjectDep) -> WebhookEndpointDeleted:
    webhook_service.delete_endpoint(session, project=project, endpoint_id=webhook_id)
    return WebhookEndpointDeleted(id=webhook_id)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic, operation_id="listWebhookDeliveries")
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    project: ProjectDep,
    limit: Limit,
    after: Annotated[
        str | None, Query(description="The `last_id` of the previous page: list the deliveries after it.")
    ] = None,
) -> DeliveriesPublic:
    deliveries, has_more = webhook_service.list_deliveries(
        session, project=project, endpoint_id=webhook_id, after=after, limit=limit
    )
    return DeliveriesPublic(
        data=deliveries,
        first_id=deliveries[0].id if deliveries else None,
        last_id=deliveries[-1].id if deliveries else None,
        has_more=has_more,
    )
