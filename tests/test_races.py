"""State changes that race: threads released together by a barrier, many rounds, on Postgres and SQLite.

Each round runs real service calls (the API's cancel, pause or file delete; the worker's claim or
publish; the reconciler's pass) at the same instant, each in its own session and transaction, then checks
the invariants: a job is claimed by one worker only; no terminal state is ever overwritten, and a job never
ends cancelled, paused, queued or failed with a published model; a job never points at a file that is gone.

On Postgres the tests' own reconciler and worker share the database: every job here is recorded as sent
when it is created, as the API's send does, so the reconciler leaves it alone for the round, and a round
cancels what it leaves unfinished, so no worker ever trains it.
"""

import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings
from app.db import migrate
from app.db.session import get_engine
from app.db.tables import Job, JobEvent, Model, TrainingFile, utcnow
from app.errors import ApiError
from app.files import service as file_service
from app.jobs import lifecycle
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from app.models import service as model_service
from app.storage import get_store
from tests.helpers import chat_file_row, chat_jsonl, job_body

ROUNDS = 25
PROJECT = "racer"
CLAIMERS = 4  # workers handed the same job's message at once


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def sessions(
    request: pytest.FixtureRequest, database: str, tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sessionmaker[Session]]:
    """Sessions on the tests' Postgres, or on a fresh SQLite file (the embedded default) at head."""
    if request.param == "postgres":
        url = database
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('races') / 'tuneforge.db'}"
        migrate.upgrade(url)
        with sessionmaker(bind=get_engine(database))() as source:
            base = source.get(Model, tiny_model)
            assert base is not None
            copy = Model(
                id=base.id,
                kind=base.kind,
                path=base.path,
                architecture=base.architecture,
                linear_modules=base.linear_modules,
                profile=base.profile,
            )
        with sessionmaker(bind=get_engine(url))() as target, target.begin():
            target.add(copy)
    yield sessionmaker(bind=get_engine(url), expire_on_commit=False)


def race(sessions: sessionmaker[Session], *calls: Callable[[Session], Any]) -> list[Any]:
    """Run each call in its own thread and transaction, all released at once; returns results or errors."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[Session], Any]) -> None:
        barrier.wait()
        try:
            with sessions() as session, session.begin():
                results[index] = call(session)
        except Exception as exc:  # an expected refusal (ApiError) or a bug: the test looks at which
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        # A call still running would leave None, which reads as a refusal: it is a hang.
        assert not thread.is_alive(), "a racing call did not finish in 60 s"
    return results


def new_file(sessions: sessionmaker[Session]) -> str:
    file_id = "file-" + secrets.token_hex(12)
    key = f"files/{file_id}.jsonl"
    source = Path(get_store().root) / f"{file_id}.source"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(chat_jsonl(4))
    get_store().put_file(key, source)
    source.unlink()
    with sessions() as session, session.begin():
        session.add(chat_file_row(file_id, PROJECT, storage_key=key, examples=4))
    return file_id


def queued_job(sessions: sessionmaker[Session]) -> str:
    """A job as the API leaves it: queued, its message just sent (see the module docstring)."""
    spec = JobCreate(**job_body(new_file(sessions)))
    with sessions() as session, session.begin():
        job_id = job_service.create_job(session, project=PROJECT, spec=spec).id
        lifecycle.mark_sent(session, job_ids=[job_id])
    return job_id


def running_job(sessions: sessionmaker[Session]) -> tuple[str, int]:
    """A job a worker has claimed (attempt 1), through the real create and claim."""
    job_id = queued_job(sessions)
    with sessions() as session, session.begin():
        attempt = lifecycle.claim(session, job_id=job_id, owner="racer:1", lease_seconds=60)
    assert attempt == 1
    return job_id, attempt


def end(sessions: sessionmaker[Session], job_id: str) -> None:
    """Cancel a job a round left queued or running (a finished one stays as it is)."""
    with sessions() as session, session.begin():
        job_service.cancel_job(session, project=PROJECT, job_id=job_id)


def publish(job_id: str, attempt: int) -> Callable[[Session], Any]:
    return lambda session: lifecycle.succeed(
        session,
        job_id=job_id,
        attempt=attempt,
        storage_key=f"adapters/{job_id}/attempt-{attempt}.tar.gz",
        trained_tokens=10,
        result_files=[],
    )


def final_state(sessions: sessionmaker[Session], job_id: str) -> tuple[str, int, list[str]]:
    """(status, models registered for the job, event messages)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        models = session.scalar(select(func.count()).select_from(Model).where(Model.job_id == job_id))
        events = list(
            session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        )
        return job.status, models or 0, events


def test_concurrent_claims_of_one_job_let_exactly_one_win(sessions: sessionmaker[Session]) -> None:
    """Workers handed the same message at once: one gets attempt 1, the others get nothing."""
    owners = [f"racer:{i}" for i in range(CLAIMERS)]
    for _ in range(ROUNDS):
        job_id = queued_job(sessions)
        claims = [partial(lifecycle.claim, job_id=job_id, owner=owner, lease_seconds=60) for owner in owners]
        results = race(sessions, *claims)
        assert results.count(1) == 1 and results.count(None) == CLAIMERS - 1, results
        winner = owners[results.index(1)]
        status, _, events = final_state(sessions, job_id)
        started = [m for m in events if m.startswith("Fine-tuning job started")]
        assert status == "running" and started == [f"Fine-tuning job started (attempt 1, {winner})."], events
        with sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.attempt == 1 and job.lease_owner == winner
        end(sessions, job_id)


def test_cancel_racing_success_never_leaves_a_cancelled_job_with_a_model(
    sessions: sessionmaker[Session],
) -> None:
    outcomes = set()
    for _ in range(ROUNDS):
        job_id, attempt = running_job(sessions)
        race(
            sessions,
            publish(job_id, attempt),
            partial(job_service.cancel_job, project=PROJECT, job_id=job_id),
        )
        status, models, events = final_state(sessions, job_id)
        assert (status, models) in {("succeeded", 1), ("cancelled", 0)}, (status, models, events)
        # The loser never wrote anything: the event log holds one ending only.
        assert ("Job cancelled by the user." in events) == (status == "cancelled"), events
        outcomes.add(status)
    print(f"outcomes over {ROUNDS} rounds: {sorted(outcomes)}")


def test_pause_racing_success_never_leaves_a_paused_job_with_a_model(
    sessions: sessionmaker[Session],
) -> None:
    for _ in range(ROUNDS):
        job_id, attempt = running_job(sessions)
        pause = partial(job_service.pause_job, project=PROJECT, job_id=job_id)
        results = race(sessions, publish(job_id, attempt), pause)
        status, models, events = final_state(sessions, job_id)
        assert (status, models) in {("succeeded", 1), ("paused", 0)}, (status, models, events)
        if status == "succeeded":  # the pause lost: it was refused, not applied to a finished job
            assert isinstance(results[1], ApiError) and results[1].code == "job_not_pausable", results
        with sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.max_attempts == get_settings().max_attempts + (status == "paused")


def test_reconciler_racing_success_never_requeues_a_finished_job(sessions: sessionmaker[Session]) -> None:
    for _ in range(ROUNDS):
        job_id, attempt = running_job(sessions)
        with sessions() as session, session.begin():  # the lease ran out just as the run finished
            expired = utcnow() - timedelta(seconds=1)
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=expired))
        reconcile = partial(lifecycle.reconcile, resend_after_seconds=300)
        race(sessions, publish(job_id, attempt), reconcile)
        status, models, events = final_state(sessions, job_id)
        assert (status, models) in {("succeeded", 1), ("queued", 0)}, (status, models, events)
        requeued = any("stopped renewing its lease" in message for message in events)
        assert requeued == (status == "queued"), events
        end(sessions, job_id)


def ending(message: str) -> str | None:
    """What an event says happened to the job's status, if it is a status change this test provokes."""
    if "stopped renewing its lease" in message:
        return "requeued"
    return {
        "Job cancelled by the user.": "cancelled",
        "The job has successfully completed.": "succeeded",
    }.get(message)


def test_cancel_racing_the_reconciler_and_success_ends_in_one_state(sessions: sessionmaker[Session]) -> None:
    """Three writers at once: whoever commits first decides, and the others change nothing."""
    for _ in range(ROUNDS):
        job_id, attempt = running_job(sessions)
        with sessions() as session, session.begin():
            expired = utcnow() - timedelta(seconds=1)
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=expired))
        race(
            sessions,
            publish(job_id, attempt),
            partial(job_service.cancel_job, project=PROJECT, job_id=job_id),
            partial(lifecycle.reconcile, resend_after_seconds=300),
        )
        status, models, events = final_state(sessions, job_id)
        assert (status, models) in {("succeeded", 1), ("cancelled", 0), ("queued", 0)}, (status, events)
        endings = [ending(m) for m in events if ending(m)]
        # A re-queue may be followed by a cancel (both legal moves); a finish is followed by nothing.
        assert endings in (["succeeded"], ["cancelled"], ["requeued"], ["requeued", "cancelled"]), events
        end(sessions, job_id)


def test_deleting_a_file_racing_a_job_that_uses_it(sessions: sessionmaker[Session]) -> None:
    """Either the job exists and so do its file and bytes, or the file is gone and the job was refused."""
    outcomes = set()
    for _ in range(ROUNDS):
        file_id = new_file(sessions)
        spec = JobCreate(**job_body(file_id))
        results = race(
            sessions,
            partial(job_service.create_job, project=PROJECT, spec=spec),
            partial(file_service.delete_file, project=PROJECT, file_id=file_id),
        )
        created, deleted = results
        with sessions() as session:
            file = session.get(TrainingFile, file_id)
            jobs = session.scalar(select(func.count()).select_from(Job).where(Job.training_file == file_id))
        stored = get_store().local_path(f"files/{file_id}.jsonl").is_file()
        if isinstance(created, Job):  # the job won: the delete was refused, nothing is gone
            assert isinstance(deleted, ApiError) and deleted.code == "file_in_use", deleted
            assert file is not None and stored and jobs == 1
            outcomes.add("job")
            end(sessions, created.id)
        else:  # the delete won: the job was refused, and file and bytes are gone
            assert isinstance(created, ApiError) and created.status == 404, created
            assert deleted is None and file is None and not stored and jobs == 0
            outcomes.add("delete")
    print(f"outcomes over {ROUNDS} rounds: {sorted(outcomes)}")


class _RolledBack(Exception):
    """Raised inside a transaction to roll it back, as a failing commit would."""


def test_stored_bytes_go_only_once_a_delete_commits(sessions: sessionmaker[Session]) -> None:
    """A file's or a model's delete that rolls back loses nothing; one that commits leaves no bytes."""
    file_id = new_file(sessions)
    job_id, attempt = running_job(sessions)
    archive_key = f"adapters/{job_id}/attempt-{attempt}.tar.gz"
    source = get_store().root / f"{job_id}.source"
    source.write_bytes(b"adapter")
    get_store().put_file(archive_key, source)
    source.unlink()
    with sessions() as session, session.begin():
        model_id = publish(job_id, attempt)(session)
    deletes = {
        f"files/{file_id}.jsonl": partial(file_service.delete_file, project=PROJECT, file_id=file_id),
        archive_key: partial(model_service.delete_model, project=PROJECT, model_id=model_id),
    }
    for key, delete in deletes.items():
        with pytest.raises(_RolledBack), sessions() as session, session.begin():
            delete(session)
            raise _RolledBack
        assert get_store().local_path(key).is_file(), f"a rolled-back delete removed {key}"
        with sessions() as session, session.begin():
            delete(session)
        assert not get_store().local_path(key).exists(), f"a committed delete left {key}"
