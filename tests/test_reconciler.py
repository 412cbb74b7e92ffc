"""The reconciler process: lost messages are re-sent, dead workers' jobs re-queued, poison jobs stopped."""

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from app.config import get_settings
from app.db import migrate
from app.db.session import get_engine, session_scope
from app.db.tables import Job, Model, utcnow
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from app.storage import get_store
from tests.helpers import (
    chat_file_row,
    chat_jsonl,
    fresh_database,
    job_body,
    job_messages,
    upload,
    wait_for_status,
)


def create_unsent_job(http: httpx.Client, **state: object) -> str:
    """A job committed to the database whose message never reached the broker (the API died in between)."""
    training = upload(http, chat_jsonl(8))
    with session_scope() as session:
        job = job_service.create_job(session, project="alpha", spec=JobCreate(**job_body(training["id"])))
        for name, value in state.items():
            setattr(job, name, value)
        return job.id


def messages(http: httpx.Client, job_id: str) -> list[str]:
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [e["message"] for e in events]


def test_crash_between_commit_and_send_is_recovered(http: httpx.Client) -> None:
    job_id = create_unsent_job(http)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 1


def test_expired_lease_is_requeued_and_run_by_a_live_worker(http: httpx.Client) -> None:
    # As if a worker had claimed attempt 1 and then died: its lease ran out and nobody renews it.
    expired = utcnow() - timedelta(seconds=5)
    job_id = create_unsent_job(
        http, status="running", attempt=1, lease_owner="dead:1", lease_expires_at=expired
    )
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert any("stopped renewing its lease" in m for m in messages(http, job_id))
    with session_scope() as session:
        assert session.query(Model).filter_by(job_id=job_id).count() == 1


def test_job_out_of_attempts_fails_and_stops(http: httpx.Client) -> None:
    last = get_settings().max_attempts  # what every job here gets
    expired = utcnow() - timedelta(seconds=5)
    job_id = create_unsent_job(
        http, status="running", attempt=last, lease_owner=f"dead:{last}", lease_expires_at=expired
    )
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "max_attempts_exceeded"
    assert f"{last} attempts" in job["error"]["message"]
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.attempt == last, "a job out of attempts is never claimed again"


def test_a_superseded_attempts_publish_never_replaces_the_served_adapter(
    http: httpx.Client, tmp_path: Path
) -> None:
    """Attempt 1 lost its lease and attempt 2 published; attempt 1 then finishes and publishes too."""
    from worker.train_job import publish
    from worker.training.sft import RunResult

    expired = utcnow() - timedelta(seconds=5)
    job_id = create_unsent_job(
        http, status="running", attempt=1, lease_owner="slow:1", lease_expires_at=expired
    )
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    served = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter")
    assert served.status_code == 200

    stale = tmp_path / "attempt-1-output"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"weights of the superseded attempt")
    result = RunResult(output_dir=stale, trained_tokens=1, metrics={}, cancelled=False)
    assert publish(job_id, 1, result) is None

    again = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter")
    assert hashlib.sha256(again.content).hexdigest() == hashlib.sha256(served.content).hexdigest()
    leftovers = [p.name for p in get_store().root.rglob("*") if job_id in str(p) and "attempt-1" in p.name]
    assert leftovers == [], f"the superseded attempt's archive stayed in the store: {leftovers}"


RECONCILE_ONCE = """
import time
from app.reconciler import reconcile_once
print(time.time())
reconcile_once()
"""


def test_a_reconciler_whose_clock_is_ahead_never_requeues_a_live_job(http: httpx.Client) -> None:
    """Leases are judged by the database's clock: a host 10 minutes ahead (libfaketime) sees a live lease."""
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], n_epochs=50, batch_size=1)  # runs until cancelled
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    try:
        deadline = time.monotonic() + 120
        while not any(m.startswith("Step ") for m in messages(http, job_id)):
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.3)
        ahead = subprocess.run(
            ["faketime", "-f", "+10m", sys.executable, "-c", RECONCILE_ONCE],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert float(ahead.stdout.split()[0]) > time.time() + 540, "the reconciler's clock was not ahead"
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "running" and job["attempt"] == 1, job
        assert not any("stopped renewing its lease" in m for m in messages(http, job_id))
    finally:
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


@pytest.fixture
def unwatched_database(database: str, tiny_model: str) -> Iterator[str]:
    """A database of its own at head, with tiny-llama registered, that no reconciler or worker watches."""
    with fresh_database(database, "unwatched") as unwatched:
        migrate.upgrade(unwatched)
        with session_scope() as source, sessionmaker(get_engine(unwatched))() as target, target.begin():
            base = source.get(Model, tiny_model)
            assert base is not None
            source.expunge(base)
            target.merge(base)
        yield unwatched


SETTLE_SECONDS = 10  # how long a job's message may take to reach the broker's queue (app/reconciler.py)
RECONCILE_ONCE_AND_SAY = """
import json
from app.reconciler import reconcile_once
print(json.dumps(reconcile_once()))
"""


def test_a_message_waiting_past_resend_after_seconds_is_sent_again(unwatched_database: str) -> None:
    """Messages still wait in the queue (so it was not flushed): only their age decides a re-send, and
    each job goes to the queue it was created for, whatever the reconciler's own queue is.

    A database and queue of its own: the tests' reconciler would otherwise send these jobs itself.
    TUNEFORGE_RESEND_AFTER_SECONDS is an hour here, against the default's five minutes: a message half an
    hour old is re-sent only by a reconciler that ignores the setting.
    """
    queue, resend_after = f"resend-{uuid.uuid4().hex[:8]}", 3600
    other_queue = f"{queue}-other"  # where a second API (another worker pool) sends its jobs
    env = os.environ | {
        "TUNEFORGE_DATABASE_URL": unwatched_database,
        "TUNEFORGE_QUEUE": queue,
        "TUNEFORGE_RESEND_AFTER_SECONDS": str(resend_after),
    }

    def reconcile_once() -> list[str]:
        """One pass of the reconciler in a process of its own; the ids whose message it sent."""
        command = [sys.executable, "-c", RECONCILE_ONCE_AND_SAY]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=120)
        return json.loads(done.stdout.splitlines()[-1])

    sessions = sessionmaker(get_engine(unwatched_database))
    with sessions() as session, session.begin():
        file = chat_file_row("file-unwatched", "alpha", storage_key="files/file-unwatched.jsonl")
        session.add(file)
        spec = JobCreate(**job_body(file.id))
        late, recent, elsewhere = (job_service.create_job(session, project="alpha", spec=spec) for _ in "abc")
        late.queue, recent.queue, elsewhere.queue = queue, queue, other_queue
        late, recent, elsewhere = late.id, recent.id, elsewhere.id
    with sessions() as session, session.begin():  # as if the API had died between commit and send
        session.execute(update(Job).values(sent_at=Job.sent_at - timedelta(seconds=SETTLE_SECONDS + 1)))
    # The queues are empty: the first pass sends all three, each to the queue it was created for (a job
    # sent to this reconciler's own queue would run on the wrong pool of workers).
    assert sorted(reconcile_once()) == sorted([late, recent, elsewhere])
    assert sorted(job_messages(queue)) == sorted([late, recent])
    assert job_messages(other_queue) == [elsewhere]

    with sessions() as session, session.begin():  # as if the messages had gone out that long ago
        for job_id, age in ((late, resend_after + 1), (recent, resend_after / 2)):
            aged = Job.sent_at - timedelta(seconds=age)
            session.execute(update(Job).where(Job.id == job_id).values(sent_at=aged))
    assert reconcile_once() == [late]
    assert Counter(job_messages(queue)) == {late: 2, recent: 1}
    redis.Redis.from_url(os.environ["TUNEFORGE_BROKER_URL"]).delete(queue, other_queue)
