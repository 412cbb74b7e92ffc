"""Webhook endpoints, deliveries and attempts as the API shows them."""

from typing import Literal

from pydantic import BaseModel, Field

from app.webhooks.outbox import EVENT_TYPES, EventType

DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookEndpointCreate(BaseModel):
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="Where events are POSTed: an http or https URL on the public internet (private "
        "addresses only where the operator allows them).",
    )
    events: list[EventType] = Field(
        default_factory=lambda: list(EVENT_TYPES),
        min_length=1,
        description="The event types to send; default all of them.",
    )
    description: str | None = Field(None, max_length=512, description="A note for people.")


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[EventType]
    description: str | None
    created_at: int


class WebhookEndpointCreated(WebhookEndpointPublic):
    secret: str = Field(
        description="Standard Webhooks signing secret (`whsec_<base64>`). Shown only in this response: "
        "keep it to verify deliveries."
    )


class WebhookEndpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class DeliveryAttemptPublic(BaseModel):
    number: int = Field(description="1 for the first attempt.")
    created_at: float = Field(description="When it was sent (Unix seconds).")
    duration_ms: int
    status_code: int | None = Field(description="The receiver's HTTP status; null when it did not answer.")
    error: str | None = Field(description="Why the attempt failed without a status code, or the refusal.")


class DeliveryPublic(BaseModel):
    id: str = Field(description="The `webhook-id` header: the same on every attempt of this delivery.")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_id: str = Field(description="The `id` in the body: the same for every endpoint the event went to.")
    type: EventType
    job_id: str
    created_at: int = Field(description="When the event happened (Unix seconds).")
    status: DeliveryStatus = Field(
        description="`pending` while attempts go on, `delivered` once the receiver answered 2xx, `failed` "
        "once a day has passed without that."
    )
    next_attempt_at: int | None = Field(description="When the next attempt is due, while `pending`.")
    attempts: list[DeliveryAttemptPublic] = Field(description="Every attempt, oldest first.")


class DeliveriesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryPublic]
    first_id: str | None
    last_id: str | None = Field(description="The `after` of the next page; null when this one is empty.")
    has_more: bool
