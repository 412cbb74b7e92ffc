"""Webhooks: endpoints a project registers, and signed deliveries of its jobs' status changes.

`enqueue` is what a status change calls, in its own transaction; app/webhooks/delivery.py sends.
"""

from app.webhooks.outbox import EVENT_TYPES, EventType, enqueue

__all__ = ["EVENT_TYPES", "EventType", "enqueue"]
