"""Faults injected for real: workers SIGKILLed and SIGTERMed, training processes killed, the broker
flushed, the database taken away. Every job must still finish exactly once, resuming where it stopped.

These tests run a stack of their own (database, Redis database, queue and state folder: `Stack`), with
API and reconciler processes but workers started and killed by each test, so the faults never touch the
services the other tests share.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.helpers import (
    all_events,
    api_process,
    chat_jsonl,
    checkpoint_steps,
    job_body,
    training_processes,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)

LEASE_SECONDS = 8


def _chaos_redis_url() -> str:
    url = make_url(REDIS_URL.replace("redis://", "postgresql://"))  # only to parse the database number
    number = (int(url.database or 0) + 1) % 16  # the next Redis database: 15 -> 0 by default
    return f"redis://{url.host or '127.0.0.1'}:{url.port or 6379}/{number}"


@dataclass
class Stack:
    """An API and a reconciler on their own database, broker and folder; workers come and go per test."""

    url: str
    key: str
    env: dict[str, str]
    db: Engine
    broker: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, **env: str) -> subprocess.Popen:
        """`tuneforge worker`: one Celery worker, exactly as `tuneforge up` starts it."""
        log = (Path(self.env["TUNEFORGE_HOME"]) / "worker.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=self.env | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which a test may signal as a whole
        )
        self.workers.append(worker)
        return worker

    def sql(self, query: str, **params: object) -> list:
        with self.db.begin() as connection:
            return list(connection.execute(text(query), params))


def _run_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    url = make_url(POSTGRES_URL)
    name = f"{url.database}_chaos"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    chaos_url = url.set(database=name).render_as_string(hide_password=False)
    broker = _chaos_redis_url()
    redis.Redis.from_url(broker).flushdb()
    home = tempfile.mkdtemp(prefix="tuneforge-chaos-")
    env = os.environ | {
        "TUNEFORGE_DATABASE_URL": chaos_url,
        "TUNEFORGE_BROKER_URL": broker,
        "TUNEFORGE_HOME": home,
        "TUNEFORGE_QUEUE": f"chaos-{uuid.uuid4().hex[:8]}",
        "TUNEFORGE_LEASE_SECONDS": str(LEASE_SECONDS),
        "TUNEFORGE_HEARTBEAT_SECONDS": "1",
        "TUNEFORGE_RECONCILE_SECONDS": "1",
        "TUNEFORGE_RESEND_AFTER_SECONDS": "600",  # a lost message must be found by the empty-queue check
        "TUNEFORGE_SHUTDOWN_GRACE_SECONDS": "30",
        "TUNEFORGE_INFERENCE_URL": "http://127.0.0.1:9",  # no inference server: not needed here
    }
    _run_cli(env, "models", "make-tiny")
    key = _run_cli(env, "keys", "create", "--project", "chaos").strip().splitlines()[-1]
    with api_process(env, "api.log") as (url, _):
        reconciler = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "reconciler"],
            env=env,
            stdout=(Path(home) / "reconciler.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        db = create_engine(chaos_url, pool_pre_ping=True)  # its connections are cut in the outage test
        result = Stack(url, key, env, db, broker)
        try:
            yield result
        finally:
            for process in [reconciler, *result.workers]:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            db.dispose()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as c:
        yield c


@pytest.fixture(autouse=True)
def no_workers_left(stack: Stack) -> Iterator[None]:
    """Each test starts the workers it needs; none outlives it."""
    yield
    for worker in stack.workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    stack.workers.clear()


def losses(events: list[dict]) -> dict[int, float]:
    """Training loss per step; a step trained twice (before a crash and after resuming) keeps the last."""
    return {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}


# tiny-llama trains a step in about 20 ms, events included: 400 steps of batch 2 (4 to 8 s) leave time
# for a fault to land mid-run, and checkpoints every 20 steps give it something to resume from.
LONG_JOB = {"n_epochs": 20, "batch_size": 2, "checkpoint_every_steps": 20}


def test_a_job_waiting_for_a_starting_worker_keeps_its_lease(stack: Stack, http: httpx.Client) -> None:
    """A worker takes its first job while its template process is still importing torch and co. (about
    7 s): it claims the job only once a run can start, so the lease (4 s here) is not spent waiting."""
    training = upload(http, chat_jsonl(8))
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]
    stack.start_worker(TUNEFORGE_LEASE_SECONDS="4")
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1, [e["message"] for e in all_events(http, job_id)]


def test_sigkilled_worker_resumes_from_last_checkpoint_with_the_same_losses(
    stack: Stack, http: httpx.Client
) -> None:
    """Chaos 1, 2 and 6: SIGKILL the worker mid-run; the next worker resumes, and the losses match."""
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], **LONG_JOB | {"n_epochs": 10})  # 200 steps, run twice
    stack.start_worker()
    reference = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    assert wait_for_status(http, reference, {"succeeded", "failed"})["status"] == "succeeded"

    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while not [s for s in checkpoint_steps(http, job_id) if s >= 40]:
        assert time.monotonic() < deadline, "no checkpoint at step 40"
        time.sleep(0.2)
    stack.workers[0].send_signal(signal.SIGKILL)
    stack.workers[0].wait()
    time.sleep(0.5)
    assert training_processes(job_id) == [], "the training process died with its worker"
    last = max(checkpoint_steps(http, job_id))

    # A kill in the middle of writing the next checkpoint leaves, at worst, a temp file or an archive with
    # no database row (the row comes last). Plant both, torn, where that write would have put them.
    store = Path(stack.env["TUNEFORGE_HOME"]) / "artifacts" / "checkpoints" / job_id / "attempt-1"
    torn = store / f"step-{last + 20}.state.tar"
    torn.write_bytes(b"\x1f\x8b torn")
    (store / ".tmp-torn").write_bytes(b"\x1f\x8b torn")

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    resumed = [e for e in events if e["message"].startswith("Resuming from the checkpoint")]
    assert [e["data"]["resumed_from_step"] for e in resumed] == [last]
    after_resume = events[events.index(resumed[0]) :]
    first_step = min(e["data"]["step"] for e in after_resume if e["type"] == "metrics")
    assert first_step == last + 1, "the global step continues from the checkpoint"
    assert stack.sql("SELECT count(*) FROM models WHERE job_id = :j", j=job_id)[0][0] == 1

    # Same seed, same data: the resumed run trains exactly what the uninterrupted one did.
    expected, got = losses(all_events(http, reference)), losses(events)
    assert sorted(got) == sorted(expected) == list(range(1, 201))
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= 1e-4, f"resumed and uninterrupted losses differ by up to {worst}"


def test_sigkill_in_the_middle_of_a_checkpoint_write_resumes_from_the_last_complete_one(
    stack: Stack, http: httpx.Client
) -> None:
    """Chaos 6, caught live: the worker is SIGKILLed while a checkpoint is half written.

    A checkpoint's resume-state archive goes to the store first, then its model archive, then its row.
    A full fine-tune of a 14M-parameter model spends about 1.7 s packing each model archive, so the
    kill lands with the state archive stored, the model archive unwritten and no row.
    """
    _run_cli(
        stack.env, "models", "make-tiny", "--name", "mid-llama",
        "--hidden-size", "512", "--layers", "4", "--intermediate-size", "1408",
    )  # fmt: skip
    training = upload(http, chat_jsonl(16))
    body = job_body(training["id"], peft="full", n_epochs=2, batch_size=4, checkpoint_every_steps=2)
    worker = stack.start_worker()
    job_id = http.post("/v1/fine_tuning/jobs", json=body | {"model": "mid-llama"}).json()["id"]
    deadline = time.monotonic() + 120
    while 2 not in checkpoint_steps(http, job_id):
        assert time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.1)
    store = Path(stack.env["TUNEFORGE_HOME"]) / "artifacts" / "checkpoints" / job_id / "attempt-1"
    deadline = time.monotonic() + 60
    while not (store / "step-4.state.tar").exists():
        assert time.monotonic() < deadline, "attempt 1 never started its checkpoint at step 4"
        time.sleep(0.002)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not (store / "step-4.tar.gz").exists(), "the write finished before the kill: nothing was torn"
    assert checkpoint_steps(http, job_id) == [2]

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert wait_for_event(http, job_id, "Resuming from the checkpoint")["data"]["resumed_from_step"] == 2
    assert stack.sql("SELECT count(*) FROM models WHERE job_id = :j", j=job_id)[0][0] == 1


@pytest.mark.parametrize("to", ["worker", "process group"])
def test_sigterm_checkpoints_and_requeues_without_using_an_attempt(
    stack: Stack, http: httpx.Client, to: str
) -> None:
    """Chaos 9: a worker asked to stop saves a checkpoint, re-queues the job and exits; the next resumes.

    Docker and Kubernetes signal the worker alone, which passes it on to its run; systemd signals every
    process of the service at once, the run and the template it was forked from included."""
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], n_epochs=20, batch_size=2)  # 400 steps, a checkpoint each epoch (20)
    worker = stack.start_worker()
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait_for_step(http, job_id, 25)
    if to == "worker":
        worker.send_signal(signal.SIGTERM)
    else:
        os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, "the worker shut down cleanly"
    saved = wait_for_event(http, job_id, "The worker is shutting down")["data"]["step"]
    assert max(checkpoint_steps(http, job_id)) == saved
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued"
    assert stack.sql("SELECT max_attempts FROM jobs WHERE id = :j", j=job_id)[0][0] == 4

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    resumed = wait_for_event(http, job_id, "Resuming from the checkpoint")
    assert resumed["data"]["resumed_from_step"] == saved


def test_poison_job_fails_after_max_attempts_with_its_last_error(stack: Stack, http: httpx.Client) -> None:
    """Chaos 7: a training process killed on every attempt (as the OOM killer would) stops at 3."""
    training = upload(http, chat_jsonl(40))
    stack.start_worker()
    job_id = http.post(
        "/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=50, batch_size=1)
    ).json()["id"]
    for attempt in (1, 2, 3):
        wait_for_event(http, job_id, f"Fine-tuning job started (attempt {attempt}")
        deadline = time.monotonic() + 60
        while not (pids := training_processes(job_id)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "training_crashed"
    assert "killed by signal 9" in job["error"]["message"]
    assert "used all 3 attempts" in job["error"]["message"]
    time.sleep(3)  # the reconciler runs every second: nothing picks the job up again
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["attempt"] == 3
    assert stack.workers[0].poll() is None, "the worker survives its jobs' crashes"


def test_flushed_broker_loses_no_job(stack: Stack, http: httpx.Client) -> None:
    """Chaos 4: Redis loses every message while one job runs and two wait; all three finish."""
    training = upload(http, chat_jsonl(16))
    stack.start_worker()
    running = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=25, batch_size=1))
    waiting = [http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])) for _ in range(2)]
    wait_for_step(http, running.json()["id"], 2)
    redis.Redis.from_url(stack.broker).flushdb()
    for job_id in [running.json()["id"]] + [w.json()["id"] for w in waiting]:
        job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
        assert job["status"] == "succeeded" and job["attempt"] == 1, job


def test_database_outage_mid_run_finishes_without_overlap(stack: Stack, http: httpx.Client) -> None:
    """Chaos 10: every connection to the job database is cut and refused for 4 s while a job trains."""
    training = upload(http, chat_jsonl(40))
    stack.start_worker()
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], **LONG_JOB)).json()["id"]
    most_at_once, watching = [0], threading.Event()

    def watch() -> None:
        while not watching.is_set():
            most_at_once[0] = max(most_at_once[0], len(training_processes(job_id)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_for_step(http, job_id, 4)
        name = make_url(stack.env["TUNEFORGE_DATABASE_URL"]).database
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            time.sleep(4)
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    finally:
        watching.set()
        watcher.join()
    assert job["status"] == "succeeded", job
    assert most_at_once[0] == 1, "two attempts of the job trained at the same time"
    assert stack.sql("SELECT count(*) FROM models WHERE job_id = :j", j=job_id)[0][0] == 1


def test_pause_keeps_the_checkpoint_and_resume_continues_from_it(stack: Stack, http: httpx.Client) -> None:
    """Pause a running job through the openai SDK: it checkpoints and stops; resume picks up there."""
    training = upload(http, chat_jsonl(40))
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    stack.start_worker()
    job_id = http.post(
        "/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=20, batch_size=2)
    ).json()["id"]
    wait_for_step(http, job_id, 4)
    assert sdk.fine_tuning.jobs.pause(job_id).status == "paused"
    paused_at = wait_for_event(http, job_id, "Job paused at step")["data"]["step"]
    deadline = time.monotonic() + 60
    while max(checkpoint_steps(http, job_id), default=0) != paused_at:
        assert time.monotonic() < deadline, "the paused run saved no checkpoint"
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while training_processes(job_id):
        assert time.monotonic() < deadline, "the paused run's training process did not exit"
        time.sleep(0.3)
    time.sleep(2)  # the worker's next heartbeat and the reconciler's passes leave it alone
    assert sdk.fine_tuning.jobs.retrieve(job_id).status == "paused", "a paused job stays paused"

    assert sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded"
    assert (
        wait_for_event(http, job_id, "Resuming from the checkpoint")["data"]["resumed_from_step"] == paused_at
    )

    finished = http.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert finished.status_code == 400 and finished.json()["error"]["code"] == "job_not_pausable"


def test_out_of_memory_fails_the_job_with_a_hint_and_the_worker_runs_the_next(
    stack: Stack, http: httpx.Client
) -> None:
    """A run that needs more memory than the worker allows fails as out_of_memory; the worker goes on."""
    stack.start_worker(TUNEFORGE_TRAINING_MEMORY_LIMIT_MB="3000")
    story = " ".join(f"{i} plus {i} is {2 * i}." for i in range(200))  # past 512 tokens
    rows = [
        json.dumps(
            {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": story}]}
        )
    ]
    huge = upload(http, ("\n".join(rows * 256) + "\n").encode())
    # 256 rows of 512 tokens in one batch (OpenAI's largest batch, tiny-llama's whole context): the logits
    # alone (256 x 512 x 1024 vocabulary, fp32) and their softmax copies and gradients need more than the
    # 3000 MB address space the worker gives its training processes (a small job needs under 2500).
    body = job_body(huge["id"], batch_size=256, max_seq_length=512)
    oom = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    small = upload(http, chat_jsonl(16))
    after = http.post("/v1/fine_tuning/jobs", json=job_body(small["id"])).json()["id"]
    job = wait_for_status(http, oom, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory", job
    assert "smaller batch_size" in job["error"]["message"] and "qlora" in job["error"]["message"]
    assert wait_for_status(http, after, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    assert stack.workers[0].poll() is None


def test_up_replaces_a_worker_that_died(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tuneforge up` supervises its processes: a dead worker is replaced, any other death stops it."""
    from app.cli import supervise, worker_command

    # The replacement inherits this environment: point it at the chaos stack, not the shared one.
    for name in ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_BROKER_URL", "TUNEFORGE_HOME"):
        monkeypatch.setenv(name, stack.env[name])
    dead = subprocess.Popen(worker_command(), env=stack.env)
    dead.kill()
    dead.wait()
    processes = [dead]
    try:
        assert supervise(processes) is True
        replacement = processes[0]
        assert replacement is not dead and replacement.poll() is None
        assert replacement.args[:6] == worker_command()[:6]  # type: ignore[index]
    finally:
        processes[0].kill()
        processes[0].wait()
    api = subprocess.Popen([sys.executable, "-c", "pass"])
    api.wait()
    assert supervise([api]) is False


@pytest.mark.parametrize("preload", ["true", "false"])
def test_a_run_dies_with_its_worker_however_it_was_started(
    stack: Stack, http: httpx.Client, preload: str
) -> None:
    """Runs fork from the preloaded template (no GPU) or start a fresh interpreter (GPU machines); either
    way a SIGKILLed worker's run is gone at once, so no later attempt can overlap it."""
    training = upload(http, chat_jsonl(40))
    worker = stack.start_worker(TUNEFORGE_PRELOAD_TRAINING=preload)
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], **LONG_JOB)).json()["id"]
    try:
        wait_for_step(http, job_id, 2)
        [pid] = training_processes(job_id)
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert (parent == worker.pid) is (preload == "false"), "forked by the template, or by the worker"
        worker.kill()
        worker.wait()
        deadline = time.monotonic() + 2
        while training_processes(job_id):
            assert time.monotonic() < deadline, "the run outlived its worker"
            time.sleep(0.05)
    finally:  # no later test's worker should pick the job up again
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
