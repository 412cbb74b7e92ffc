"""Webhooks on the real stack: endpoints registered over HTTP, deliveries sent by the reconciler's sender.

A receiver on 127.0.0.1 (the tests' API allows private addresses: tests/conftest.py) verifies every
delivery with the `standardwebhooks` package and answers the first two attempts at each `webhook-id`
with 500, so every event is seen after two retries, with the same id, and then never again.
"""

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook

from app.config import get_settings, gpu_present
from app.db.session import session_scope
from app.db.tables import WebhookDelivery
from app.db.time import db_now
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from app.webhooks import delivery
from tests.helpers import api_process, chat_jsonl, job_body, upload, wait_for_status

FAILURES = 2  # the receiver answers 500 this many times per webhook-id, then 200


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """An HTTP server in a thread that records every request and verifies its signature."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}  # path -> the secret of the endpoint registered at it
        self.failures: dict[str, int] = defaultdict(lambda: FAILURES)  # webhook-id -> 500s before a 200
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver.answer(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        try:
            Webhook(self.secrets[path]).verify(body, headers)
            verified = True
        except Exception:
            verified = False
        with self.lock:
            webhook_id = headers.get("webhook-id", "")
            earlier = sum(r.webhook_id == webhook_id for r in self.received)
            status = 500 if earlier < self.failures[webhook_id] else 200
            self.received.append(Received(path, headers, body, verified, status))
        return status

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, wanted: set[tuple[str, str]], timeout: float = 60) -> list[Received]:
        """The requests at `path` once each (job id, event type) in `wanted` has been answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            requests = self.at(path)
            accepted = {(r.event["data"]["id"], r.event["type"]) for r in requests if r.answered == 200}
            if wanted <= accepted:
                return requests
            time.sleep(0.2)
        raise TimeoutError(f"{path} did not accept {wanted - accepted} in {timeout} s")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def register(http: httpx.Client, receiver: Receiver, path: str) -> Iterator[dict]:
    response = http.post("/v1/webhooks", json={"url": receiver.url + path, "description": "tests"})
    assert response.status_code == 200, response.text
    endpoint = response.json()
    receiver.secrets[path] = endpoint["secret"]
    yield endpoint
    http.delete(f"/v1/webhooks/{endpoint['id']}")  # later modules' jobs send nothing here


@pytest.fixture(scope="module")
def endpoint(http: httpx.Client, receiver: Receiver) -> Iterator[dict]:
    """Project alpha's endpoint, taking every event type."""
    yield from register(http, receiver, "/alpha")


@pytest.fixture(scope="module")
def other_endpoint(other_http: httpx.Client, receiver: Receiver) -> Iterator[dict]:
    """Project beta's endpoint, on the same receiver."""
    yield from register(other_http, receiver, "/beta")


def create_job(http: httpx.Client) -> str:
    training = upload(http, chat_jsonl())
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"]))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def deliveries(http: httpx.Client, endpoint_id: str) -> dict[str, dict]:
    """The endpoint's deliveries by id."""
    page = http.get(f"/v1/webhooks/{endpoint_id}/deliveries", params={"limit": 100})
    assert page.status_code == 200, page.text
    return {d["id"]: d for d in page.json()["data"]}


def delivery_of(http: httpx.Client, endpoint_id: str, job_id: str) -> dict:
    """The endpoint's one delivery about `job_id`."""
    (found,) = [d for d in deliveries(http, endpoint_id).values() if d["job_id"] == job_id]
    return found


def test_status_changes_arrive_signed_and_once_each_after_two_failures(
    http: httpx.Client,
    other_http: httpx.Client,
    server: str,
    receiver: Receiver,
    endpoint: dict,
    other_endpoint: dict,
) -> None:
    assert endpoint["secret"].startswith("whsec_") and set(endpoint["events"]) == {
        "fine_tuning.job.running",
        "fine_tuning.job.paused",
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
    }
    trained = create_job(http)
    wait_for_status(http, trained, {"running", "succeeded", "failed"})
    # While it trains (the one worker is busy, so these stay queued): one cancelled, one paused then
    # cancelled, and one of project beta's, cancelled.
    cancelled, paused = create_job(http), create_job(http)
    assert http.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
    assert http.post(f"/v1/fine_tuning/jobs/{paused}/pause").json()["status"] == "paused"
    assert http.post(f"/v1/fine_tuning/jobs/{paused}/cancel").json()["status"] == "cancelled"
    others = create_job(other_http)
    assert other_http.post(f"/v1/fine_tuning/jobs/{others}/cancel").json()["status"] == "cancelled"
    assert wait_for_status(http, trained, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"

    expected = {
        (trained, "fine_tuning.job.running"),
        (trained, "fine_tuning.job.succeeded"),
        (cancelled, "fine_tuning.job.cancelled"),
        (paused, "fine_tuning.job.paused"),
        (paused, "fine_tuning.job.cancelled"),
    }
    mine = {trained, cancelled, paused}
    receiver.wait_for("/beta", {(others, "fine_tuning.job.cancelled")})
    requests = [r for r in receiver.wait_for("/alpha", expected) if r.event["data"]["id"] in mine]
    assert not [r for r in receiver.at("/alpha") if r.event["data"]["id"] == others], (
        "beta's job reached alpha"
    )

    assert all(r.verified for r in receiver.received), "a delivery whose signature does not verify"
    by_id: dict[str, list[Received]] = defaultdict(list)
    for request in requests:
        by_id[request.webhook_id].append(request)
    assert {(r[0].event["data"]["id"], r[0].event["type"]) for r in by_id.values()} == expected
    listed = deliveries(http, endpoint["id"])
    for webhook_id, attempts in by_id.items():
        # the same event, byte for byte, on each attempt; accepted on the third, then never sent again
        assert [r.answered for r in attempts] == [500, 500, 200], webhook_id
        assert len({r.body for r in attempts}) == 1
        event = attempts[0].event
        assert event == {
            "id": event["id"],
            "object": "event",
            "type": event["type"],
            "created_at": event["created_at"],
            "data": {"id": event["data"]["id"]},
        }
        assert event["id"].startswith("evt_") and abs(event["created_at"] - time.time()) < 300
        assert listed[webhook_id]["status"] == "delivered" and listed[webhook_id]["next_attempt_at"] is None
        assert [a["status_code"] for a in listed[webhook_id]["attempts"]] == [500, 500, 200]
        assert [a["number"] for a in listed[webhook_id]["attempts"]] == [1, 2, 3]
        # never sent before it was due: each wait at least the doubled base less its 25% jitter
        sent_at = [a["created_at"] for a in listed[webhook_id]["attempts"]]
        base = get_settings().webhook_retry_base_seconds
        assert sent_at[1] - sent_at[0] >= 0.75 * base and sent_at[2] - sent_at[1] >= 1.5 * base, sent_at
    events = {(r.event["data"]["id"], r.event["type"]): r.event for r in requests}
    running, succeeded = (
        events[trained, "fine_tuning.job.running"],
        events[trained, "fine_tuning.job.succeeded"],
    )
    assert running["created_at"] <= succeeded["created_at"]

    # OpenAI's own SDK reads the succeeded event as the one OpenAI would send.
    accepted = next(r for r in requests if r.event == succeeded and r.answered == 200)
    sdk = openai.OpenAI(api_key="unused", base_url=f"{server}/v1")
    unwrapped = sdk.webhooks.unwrap(accepted.body, accepted.headers, secret=endpoint["secret"])
    assert unwrapped.type == "fine_tuning.job.succeeded" and unwrapped.data.id == trained


@pytest.mark.skipif(gpu_present(), reason="it fails by asking a worker without a GPU for Liger kernels")
def test_a_job_that_fails_is_delivered_as_failed(
    http: httpx.Client, receiver: Receiver, endpoint: dict
) -> None:
    training = upload(http, chat_jsonl(8))
    # An API that believes its workers have GPUs queues a job the CPU worker then fails.
    with api_process(os.environ | {"TUNEFORGE_WORKER_DEVICE": "cuda"}, "api-webhooks-cuda.log") as (url, _):
        response = httpx.post(
            f"{url}/v1/fine_tuning/jobs",
            json=job_body(training["id"], liger_kernels=True),
            headers={"Authorization": http.headers["Authorization"]},
        )
    job_id = response.json()["id"]
    assert wait_for_status(http, job_id, {"succeeded", "failed"})["status"] == "failed"
    wanted = {(job_id, "fine_tuning.job.running"), (job_id, "fine_tuning.job.failed")}
    requests = [r for r in receiver.wait_for("/alpha", wanted, timeout=60) if r.event["data"]["id"] == job_id]
    accepted = sorted(r.event["type"] for r in requests if r.answered == 200)
    assert accepted == ["fine_tuning.job.failed", "fine_tuning.job.running"], accepted


def test_retry_waits_double_from_the_base_up_to_an_hour() -> None:
    base = get_settings().webhook_retry_base_seconds
    for number in range(1, 8):
        waits = [delivery.retry_wait(number) for _ in range(50)]
        due = base * 2 ** (number - 1)
        assert due * 0.75 <= min(waits) and max(waits) <= due * 1.25, (number, waits)
    assert max(delivery.retry_wait(40) for _ in range(50)) <= 3600 * 1.25


def test_endpoints_are_validated_and_private_to_their_project(
    http: httpx.Client, other_http: httpx.Client, endpoint: dict, other_endpoint: dict
) -> None:
    bad = {
        "ftp": ({"url": "ftp://example.com/hook"}, "url"),
        "no host": ({"url": "https:///hook"}, "url"),
        "missing url": ({"events": ["fine_tuning.job.failed"]}, "url"),
        "unknown event": ({"url": "https://example.com/", "events": ["fine_tuning.job.created"]}, "events.0"),
        "no events": ({"url": "https://example.com/", "events": []}, "events"),
    }
    for case, (body, param) in bad.items():
        response = http.post("/v1/webhooks", json=body)
        assert response.status_code == 400, (case, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (case, error)

    assert "secret" not in http.get(f"/v1/webhooks/{endpoint['id']}").json()
    assert endpoint["id"] in {e["id"] for e in http.get("/v1/webhooks").json()["data"]}
    assert endpoint["id"] not in {e["id"] for e in other_http.get("/v1/webhooks").json()["data"]}
    for method, path in [
        ("GET", f"/v1/webhooks/{endpoint['id']}"),
        ("GET", f"/v1/webhooks/{endpoint['id']}/deliveries"),
        ("DELETE", f"/v1/webhooks/{endpoint['id']}"),
    ]:
        response = other_http.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "webhook_endpoint_not_found"
    assert http.get(f"/v1/webhooks/{endpoint['id']}").status_code == 200, "beta's DELETE removed it"


def test_private_addresses_are_refused_without_the_operator_setting(http: httpx.Client) -> None:
    env = os.environ | {"TUNEFORGE_WEBHOOKS_ALLOW_PRIVATE": "0"}
    with api_process(env, "api-webhooks-public-only.log") as (url, _):
        client = httpx.Client(base_url=url, headers={"Authorization": http.headers["Authorization"]})
        for private in [
            "http://127.0.0.1:8000/hook",
            "http://localhost/hook",
            "https://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/hook",
            "http://[::ffff:192.168.0.1]/hook",
            "http://0.0.0.0/hook",
        ]:
            response = client.post("/v1/webhooks", json={"url": private})
            assert response.status_code == 400, (private, response.text)
            assert response.json()["error"]["param"] == "url", private
        public = client.post("/v1/webhooks", json={"url": "https://93.184.215.14/hook"})
        assert public.status_code == 200, public.text
        assert client.delete(f"/v1/webhooks/{public.json()['id']}").status_code == 200


def test_each_attempt_checks_the_address_it_connects_to(receiver: Receiver, endpoint: dict) -> None:
    """An endpoint registered while private addresses were allowed is refused once they are not: the
    sender checks the address at every attempt, and sends nothing there."""
    receiver.secrets["/direct"] = endpoint["secret"]
    claimed = delivery.Claimed("wh_test_refused", 1, receiver.url + "/direct", endpoint["secret"], "{}")
    with httpx.Client(timeout=5) as client:
        refused = delivery.send(client, claimed, allow_private=False)
        assert refused.status_code is None and "public internet" in (refused.error or "")
        assert receiver.at("/direct") == []
        allowed = delivery.send(client, claimed, allow_private=True)
    assert allowed.status_code == 500  # the receiver's answer to a first attempt
    assert [r.verified for r in receiver.at("/direct")] == [True]


def test_an_event_outlives_a_sender_that_died_and_a_rolled_back_change(
    http: httpx.Client, receiver: Receiver, endpoint: dict
) -> None:
    training = upload(http, chat_jsonl(8))
    with session_scope() as session:
        job = job_service.create_job(session, project="alpha", spec=JobCreate(**job_body(training["id"])))
        job_service.pause_job(session, project="alpha", job_id=job.id)  # never queued for a worker to see
        mine = (WebhookDelivery.job_id == job.id, WebhookDelivery.endpoint_id == endpoint["id"])
        paused_id = session.execute(select(WebhookDelivery.id).where(*mine)).scalar_one()
        # A sender claims attempt 1 (holding it for a second) and dies before sending it.
        assert paused_id in {c.id for c in delivery.claim_due(session, limit=100, hold_seconds=1)}
    receiver.failures[paused_id] = 0
    with pytest.raises(RuntimeError), session_scope() as session:
        job_service.cancel_job(session, project="alpha", job_id=job.id)
        raise RuntimeError("the process dies before the cancel commits")

    requests = receiver.wait_for("/alpha", {(job.id, "fine_tuning.job.paused")}, timeout=30)
    sent = [(r.webhook_id, r.answered) for r in requests if r.event["data"]["id"] == job.id]
    assert sent == [(paused_id, 200)]
    listed = deliveries(http, endpoint["id"])
    # attempt 2, once the dead sender's claim of attempt 1 expired; that attempt left no record
    assert [a["number"] for a in listed[paused_id]["attempts"]] == [2]
    assert [d["type"] for d in listed.values() if d["job_id"] == job.id] == ["fine_tuning.job.paused"]
    http.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")


def test_a_delivery_still_failing_a_day_after_its_event_is_given_up(
    http: httpx.Client, receiver: Receiver, endpoint: dict
) -> None:
    training = upload(http, chat_jsonl(8))
    with session_scope() as session:
        job = job_service.create_job(session, project="alpha", spec=JobCreate(**job_body(training["id"])))
        job_service.cancel_job(session, project="alpha", job_id=job.id)
        mine = (WebhookDelivery.job_id == job.id, WebhookDelivery.endpoint_id == endpoint["id"])
        # written a day ago, less half a second: the first attempt's retry would come too late
        session.execute(update(WebhookDelivery).where(*mine).values(created_at=db_now(-24 * 3600 + 0.5)))
    deadline = time.monotonic() + 30
    while (given_up := delivery_of(http, endpoint["id"], job.id))["status"] == "pending":
        assert time.monotonic() < deadline, given_up
        time.sleep(0.2)
    assert given_up["status"] == "failed" and given_up["next_attempt_at"] is None, given_up
    assert [a["status_code"] for a in given_up["attempts"]] == [500]  # its first and last attempt
    # Positive evidence that senders ran on past the moment its retry would have come: a later event, which
    # the receiver fails first, is retried after the same base delay and accepted; the given-up one is
    # still at its one request.
    with session_scope() as session:
        later = job_service.create_job(session, project="alpha", spec=JobCreate(**job_body(training["id"])))
        job_service.cancel_job(session, project="alpha", job_id=later.id)
    receiver.wait_for("/alpha", {(later.id, "fine_tuning.job.cancelled")}, timeout=30)
    later_tries = [r for r in receiver.at("/alpha") if r.event["data"]["id"] == later.id]
    assert [r.answered for r in later_tries][0] == 500, "the later event must have been retried"
    assert len([r for r in receiver.at("/alpha") if r.event["data"]["id"] == job.id]) == 1
