"""The webhook sender: sends committed outbox rows, signed, retrying with exponential backoff for a day.

It runs as a thread of the reconciler (`tuneforge reconciler`; `tuneforge up` starts one), so each
deployment has one sender, and a second is harmless: every attempt is claimed with a conditional UPDATE
on the delivery's attempt count, so two senders never send the same attempt. A claim holds a delivery
for CLAIM_SECONDS; a sender that dies mid-attempt leaves it to be sent again after that, with the same
`webhook-id`. Receivers therefore see each event at least once, and drop a repeat by its `webhook-id`.

Each attempt resolves the URL's host, refuses a non-public address unless the operator allows them
(app/webhooks/addresses.py), and connects to the very address it checked, so DNS cannot change between
the check and the request. Signing is the `standardwebhooks` package's, as receivers verify it.
"""

import logging
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from sqlalchemy import case, delete, null, select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.db.time import db_now, utcnow
from app.webhooks import addresses

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0  # per attempt: a receiver should answer at once and do its work later
CLAIM_SECONDS = 60.0  # how long a claimed attempt is held: well past TIMEOUT_SECONDS
GIVE_UP_AFTER_SECONDS = 24 * 3600.0  # no attempt is scheduled later than this after the event
MAX_WAIT_SECONDS = 3600.0  # the backoff's ceiling
POLL_SECONDS = 0.5
SENDERS = 8  # attempts in flight at once, so that one slow receiver does not hold up the others


@dataclass(frozen=True)
class Claimed:
    """One attempt this sender has claimed: what to send, where, and how to sign it."""

    id: str  # the `webhook-id`
    number: int
    url: str
    secret: str
    payload: str


@dataclass(frozen=True)
class Outcome:
    sent_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_wait(number: int) -> float:
    """Seconds before the attempt after attempt `number` (1, 2, ...): doubling from the configured base up
    to an hour, each spread by +-25% so that receivers coming back up are not hit by every retry at once."""
    base = get_settings().webhook_retry_base_seconds
    return min(MAX_WAIT_SECONDS, base * 2 ** (number - 1)) * random.uniform(0.75, 1.25)


def claim_due(session: Session, *, limit: int, hold_seconds: float = CLAIM_SECONDS) -> list[Claimed]:
    """Claim up to `limit` due attempts, each for `hold_seconds` (the caller commits); drops deliveries
    whose endpoint is gone."""
    delivery, endpoint = WebhookDelivery, WebhookEndpoint
    due = session.execute(
        select(delivery.id, delivery.attempts, delivery.payload, endpoint.url, endpoint.secret)
        .outerjoin(endpoint, endpoint.id == delivery.endpoint_id)
        .where(delivery.status == "pending", delivery.next_attempt_at <= db_now())
        .order_by(delivery.next_attempt_at)
        .limit(limit)
    ).all()
    claimed = []
    for row in due:
        if row.url is None:  # its endpoint was deleted while the event was being written
            session.execute(delete(delivery).where(delivery.id == row.id))
            continue
        took = session.execute(
            update(delivery)
            .where(
                delivery.id == row.id,
                delivery.status == "pending",
                delivery.attempts == row.attempts,
                delivery.next_attempt_at <= db_now(),
            )
            .values(attempts=row.attempts + 1, next_attempt_at=db_now(hold_seconds))
        )
        if took.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(Claimed(row.id, row.attempts + 1, row.url, row.secret, row.payload))
    return claimed


def send(client: httpx.Client, claimed: Claimed, *, allow_private: bool) -> Outcome:
    """Make one attempt: POST the signed payload to the endpoint's URL, at an address that may be called."""
    sent_at, started = utcnow(), time.monotonic()

    def outcome(*, status_code: int | None = None, error: str | None = None) -> Outcome:
        duration_ms = round((time.monotonic() - started) * 1000)
        return Outcome(sent_at, duration_ms, status_code=status_code, error=error)

    try:
        url = addresses.parse(claimed.url)
        found = addresses.resolve(url)
        if not allow_private:
            addresses.check(found, host=url.host)
    except (addresses.RefusedURL, LookupError) as refused:
        return outcome(error=str(refused))
    timestamp = datetime.now(UTC)
    headers = {
        "webhook-id": claimed.id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(claimed.secret).sign(claimed.id, timestamp, claimed.payload),
        "content-type": "application/json",
        "host": url.netloc.decode("ascii"),
    }
    # To the address just checked; TLS still verifies the certificate against the URL's host name.
    pinned = url.copy_with(host=str(found[0]))
    try:
        with client.stream(
            "POST",
            pinned,
            content=claimed.payload.encode(),
            headers=headers,
            extensions={"sni_hostname": url.raw_host.decode("ascii")},
        ) as response:  # the status is all that counts: the body is never read
            return outcome(status_code=response.status_code)
    except httpx.HTTPError as exc:
        return outcome(error=f"{exc.__class__.__name__}: {exc}"[:500])


def record(session: Session, claimed: Claimed, result: Outcome) -> bool:
    """Write the attempt, and what comes next: delivered, another attempt later, or, a day after the event,
    none (`failed`). False if the delivery is no longer this attempt's (its endpoint was deleted)."""
    delivery = WebhookDelivery
    values: dict[str, object]
    if result.delivered:
        values = {"status": "delivered", "delivered_at": db_now(), "next_attempt_at": None}
    else:
        wait_seconds = retry_wait(claimed.number)
        too_late = delivery.created_at < db_now(wait_seconds - GIVE_UP_AFTER_SECONDS)
        values = {
            "status": case((too_late, "failed"), else_="pending"),
            "next_attempt_at": case((too_late, null()), else_=db_now(wait_seconds)),
        }
    moved = session.execute(
        update(delivery)
        .where(delivery.id == claimed.id, delivery.attempts == claimed.number, delivery.status == "pending")
        .values(**values)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        WebhookAttempt(
            delivery_id=claimed.id,
            number=claimed.number,
            created_at=result.sent_at,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error,
        )
    )
    return True


def deliver(client: httpx.Client, claimed: Claimed, *, allow_private: bool) -> None:
    """Send one claimed attempt and record it; errors are logged (the claim expires, and it is retried)."""
    try:
        result = send(client, claimed, allow_private=allow_private)
        with session_scope() as session:
            record(session, claimed, result)
        if not result.delivered:
            why = result.error or result.status_code
            log.info("webhook %s attempt %d failed: %s", claimed.id, claimed.number, why)
    except Exception:
        log.exception("webhook %s attempt %d could not be made", claimed.id, claimed.number)


def run_sender(stop: threading.Event) -> None:
    """Send due deliveries, up to SENDERS at once, until `stop` is set."""
    allow_private = get_settings().webhooks_allow_private
    # No kept-alive connections: each request goes to an address of its own choosing (see `send`).
    limits = httpx.Limits(max_keepalive_connections=0)
    in_flight: set[Future[None]] = set()
    with (
        httpx.Client(timeout=TIMEOUT_SECONDS, limits=limits, trust_env=False) as client,
        ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook-sender") as pool,
    ):
        while not stop.is_set():
            free = SENDERS - len(in_flight)
            claimed: list[Claimed] = []
            if free:
                try:
                    with session_scope() as session:
                        claimed = claim_due(session, limit=free)
                except Exception:
                    log.exception("claiming due webhooks failed; retrying in %s s", POLL_SECONDS)
            for item in claimed:
                in_flight.add(pool.submit(deliver, client, item, allow_private=allow_private))
            if free and len(claimed) == free:
                continue  # more may be due already
            if in_flight:  # until a sender is free or the next poll, whichever comes first
                in_flight = wait(in_flight, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED).not_done
            else:
                stop.wait(POLL_SECONDS)


def start_sender() -> threading.Thread:
    """Run the sender in a daemon thread of this process (the reconciler's)."""
    thread = threading.Thread(target=run_sender, args=(threading.Event(),), name="webhooks", daemon=True)
    thread.start()
    return thread
