"""Webhook endpoints and their deliveries, as a project manages and inspects them."""

import base64
import secrets
from collections import defaultdict
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.errors import ApiError, not_found
from app.webhooks import addresses
from app.webhooks.schemas import (
    DeliveryAttemptPublic,
    DeliveryPublic,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointPublic,
)


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def to_public(endpoint: WebhookEndpoint) -> WebhookEndpointPublic:
    return WebhookEndpointPublic(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        description=endpoint.description,
        created_at=int(endpoint.created_at.timestamp()),
    )


def to_created(endpoint: WebhookEndpoint) -> WebhookEndpointCreated:
    """The endpoint with its secret: only the create response shows it."""
    return WebhookEndpointCreated(**to_public(endpoint).model_dump(), secret=endpoint.secret)


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_endpoint(session: Session, *, project: str, spec: WebhookEndpointCreate) -> WebhookEndpoint:
    """Register an endpoint; 400 naming `url` for a scheme other than http(s) or a non-public address."""
    try:
        addresses.check_registration(spec.url, allow_private=get_settings().webhooks_allow_private)
    except addresses.RefusedURL as refused:
        raise ApiError(400, str(refused), param="url", code="invalid_url") from None
    endpoint = WebhookEndpoint(
        id="whep_" + secrets.token_hex(12),
        project=project,
        url=spec.url,
        events=list(dict.fromkeys(spec.events)),
        description=spec.description,
        secret=new_secret(),
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def list_endpoints(session: Session, *, project: str) -> list[WebhookEndpoint]:
    """Oldest first."""
    query = select(WebhookEndpoint).where(WebhookEndpoint.project == project)
    return list(session.scalars(query.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get_endpoint(session: Session, *, project: str, endpoint_id: str) -> WebhookEndpoint:
    """An endpoint of this project, else 404."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.project != project:
        raise not_found("webhook endpoint", endpoint_id, param="webhook_id")
    return endpoint


def delete_endpoint(session: Session, *, project: str, endpoint_id: str) -> None:
    """Remove an endpoint with its deliveries: nothing more is sent to it."""
    endpoint = get_endpoint(session, project=project, endpoint_id=endpoint_id)
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.flush()


def list_deliveries(
    session: Session, *, project: str, endpoint_id: str, after: str | None, limit: int
) -> tuple[list[DeliveryPublic], bool]:
    """An endpoint's deliveries, newest first, each with its attempts; `after` is the previous page's last."""
    get_endpoint(session, project=project, endpoint_id=endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if after:
        cursor = session.get(WebhookDelivery, after)
        if cursor is None or cursor.endpoint_id != endpoint_id:
            raise not_found("webhook delivery", after, param="after")
        query = query.where(
            or_(
                WebhookDelivery.created_at < cursor.created_at,
                and_(WebhookDelivery.created_at == cursor.created_at, WebhookDelivery.id < cursor.id),
            )
        )
    order = (WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    page = rows[:limit]
    attempts: dict[str, list[DeliveryAttemptPublic]] = defaultdict(list)
    found = select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_([row.id for row in page]))
    for attempt in session.scalars(found.order_by(WebhookAttempt.number, WebhookAttempt.id)):
        attempts[attempt.delivery_id].append(
            DeliveryAttemptPublic(
                number=attempt.number,
                created_at=attempt.created_at.timestamp(),
                duration_ms=attempt.duration_ms,
                status_code=attempt.status_code,
                error=attempt.error,
            )
        )
    deliveries = [
        DeliveryPublic(
            id=row.id,
            event_id=row.event_id,
            type=row.type,  # type: ignore[arg-type]  # written from EventType only
            job_id=row.job_id,
            created_at=int(row.created_at.timestamp()),
            status=row.status,  # type: ignore[arg-type]  # written from DeliveryStatus only
            next_attempt_at=_ts(row.next_attempt_at),
            attempts=attempts[row.id],
        )
        for row in page
    ]
    return deliveries, len(rows) > limit
