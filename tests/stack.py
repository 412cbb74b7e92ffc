"""A stack of its own for the tests that inject faults, or that must not feed the shared worker (the
stateful schemathesis run): an API and a reconciler on their own database, Redis database, queue and
state folder, with workers started and killed by each test, so the faults never touch the services the
other tests share. Modules use it with `from tests.stack import ...` of the
fixtures and fault helpers they need; each module gets a fresh stack.
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

# The tests' own Redis databases are 15 (shared services) and 14 (this stack) by default (see conftest for
# pytest-xdist's second worker); 0, the README's, is never touched. Concurrent runs on one machine set both
# through the environment.
from tests.conftest import CHAOS_REDIS_URL, POSTGRES_URL, REDIS_URL
from tests.helpers import all_events, api_process, fresh_database, is_training_step, training_processes

LEASE_SECONDS = 8


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


def run_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fresh_database(POSTGRES_URL, "chaos") as chaos_url:
        yield from _stack(chaos_url)


def _stack(chaos_url: str, **settings: str) -> Iterator[Stack]:
    """An API, a reconciler and (as tests start them) workers of their own, on the database at `chaos_url`;
    `settings` (environment variables) add to or replace the stack's own."""
    broker = CHAOS_REDIS_URL
    flushed = redis.Redis.from_url(broker)  # this stack's own database, emptied now and by tests
    shared = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("db", 0)
    assert flushed.connection_pool.connection_kwargs.get("db", 0) not in (0, shared), (
        f"TEST_CHAOS_BROKER_URL={broker} must name a Redis database of its own: not 0, not {shared}"
    )
    flushed.flushdb()
    home = tempfile.mkdtemp(prefix="tuneforge-chaos-")
    env = (
        os.environ
        | {
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
        | settings
    )
    run_cli(env, "models", "make-tiny")
    key = run_cli(env, "keys", "create", "--project", "chaos").strip().splitlines()[-1]
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
    """Each test starts the workers it needs; none outlives it, nor its template or runs (a run a test
    froze cannot act on its worker's death until it is killed too)."""
    yield
    for worker in stack.workers:
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    stack.workers.clear()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120) -> None:
    """Poll until `condition()` holds. The timeout only keeps a broken run from hanging: it is generous,
    and never what a test decides on."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def freeze_run(job_id: str) -> int:
    """SIGSTOP the job's training process once it has one, and return its pid. From here the run is in a
    step that lasts as long as the test wants, however fast this machine trains."""
    wait_until(lambda: training_processes(job_id), f"the run of {job_id} started")
    [run] = training_processes(job_id)
    os.kill(run, signal.SIGSTOP)
    return run


def events_in_order(http: httpx.Client, job_id: str) -> list[dict]:
    """A job's events in the order the database numbered them (their times come from several clocks)."""
    return sorted(all_events(http, job_id), key=lambda e: int(e["id"].split("-")[1]))


def metric_steps(http: httpx.Client, job_id: str) -> list[int]:
    """The steps the job's runs have recorded training metrics for."""
    return [e["data"]["step"] for e in all_events(http, job_id) if is_training_step(e)]


def template_of(worker: subprocess.Popen) -> int | None:
    """The pid of the worker's template process (multiprocessing's forkserver), once it has one."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == worker.pid and b"forkserver" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


@contextlib.contextmanager
def database_away(stack: Stack) -> Iterator[None]:
    """Cut every connection to the stack's database and refuse new ones until the block ends."""
    name = make_url(stack.env["TUNEFORGE_DATABASE_URL"]).database
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")  # the tests' own database stays up
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            try:
                yield
            finally:
                connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


def losses(events: list[dict]) -> dict[int, float]:
    """Training loss per step; a step trained twice (before a crash and after resuming) keeps the last."""
    return {e["data"]["step"]: e["data"]["train_loss"] for e in events if is_training_step(e)}


# tiny-llama trains a step in about 20 ms, events included: 400 steps of batch 2 (4 to 8 s) leave time
# for a fault to land mid-run, and checkpoints every 20 steps give it something to resume from.
LONG_JOB = {"n_epochs": 20, "batch_size": 2, "checkpoint_every_steps": 20}
