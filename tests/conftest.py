"""Test harness: real Postgres and Redis on this machine, a real API server and Celery worker process.

The settings are fixed here, before anything imports `app`, so the tests, the server and the worker
all use the same database, broker queue and state folder.
"""

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis


def _per_worker(database_url: str, broker_url: str, chaos_broker_url: str) -> tuple[str, str, str]:
    """`make test` runs the tests in two pytest-xdist workers (most of a test's time is spent waiting on
    other processes). Each worker has a database and Redis databases of its own: worker N > 0 appends
    `_gwN` to the database's name and takes the Redis databases 2N below the first worker's."""
    number = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    if number == 0:
        return database_url, broker_url, chaos_broker_url
    from sqlalchemy.engine import make_url

    database = make_url(database_url)
    database = database.set(database=f"{database.database}_gw{number}")

    def below(url: str) -> str:
        base, db = url.rsplit("/", 1)
        assert int(db) - 2 * number > 0, f"{url}: too few Redis databases below it for worker {number}"
        return f"{base}/{int(db) - 2 * number}"

    return database.render_as_string(hide_password=False), below(broker_url), below(chaos_broker_url)


POSTGRES_URL, REDIS_URL, CHAOS_REDIS_URL = _per_worker(
    os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/15"),
    os.environ.get("TEST_CHAOS_BROKER_URL", "redis://127.0.0.1:6379/14"),
)
TEST_HOME = Path(tempfile.mkdtemp(prefix="tuneforge-test-"))
QUEUE = f"tuneforge-test-{uuid.uuid4().hex[:8]}"
BIG_QUEUE = f"{QUEUE}-big"
# The "big" worker class the shared API knows (tests/test_routing.py, tests/test_multi_gpu.py), and the
# settings of a worker of that class.
BIG_WORKER = {"gpus": 2, "gpu_kind": "Sim", "memory_gb": 8.0}
BIG_WORKER_ENV = {
    "TUNEFORGE_QUEUE": BIG_QUEUE,
    "TUNEFORGE_WORKER_GPUS": str(BIG_WORKER["gpus"]),
    "TUNEFORGE_WORKER_GPU_KIND": str(BIG_WORKER["gpu_kind"]),
    "TUNEFORGE_WORKER_MEMORY_GB": str(BIG_WORKER["memory_gb"]),
}

os.environ.update(
    TUNEFORGE_DATABASE_URL=POSTGRES_URL,
    TUNEFORGE_BROKER_URL=REDIS_URL,
    TUNEFORGE_HOME=str(TEST_HOME),
    TUNEFORGE_QUEUE=QUEUE,  # stale messages of other runs never reach us
    TUNEFORGE_HEARTBEAT_SECONDS="1",
    TUNEFORGE_RECONCILE_SECONDS="1",
    TUNEFORGE_RATE_LIMIT_PER_MINUTE="0",  # tests poll hard; tests/test_rate_limit.py runs its own limited API
    TUNEFORGE_WEBHOOKS_ALLOW_PRIVATE="1",  # test receivers listen on 127.0.0.1; test_webhooks checks it off
    HF_HUB_OFFLINE="1",
    WANDB_MODE="offline",  # tests/test_tracking.py: W&B runs stay on disk, under WANDB_DIR
    WANDB_DIR=str(TEST_HOME),
    MLFLOW_TRACKING_URI=f"sqlite:///{TEST_HOME}/mlflow.db",  # the workers' MLflow store, as operators set it
    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",  # test_tracking's unreachable MLflow server fails at once
)

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from app.db import migrate  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.keys import service as key_service  # noqa: E402
from app.services import free_port  # noqa: E402
from tests.helpers import chat_jsonl, job_body, upload, wait_for_status  # noqa: E402


@pytest.fixture(scope="session")
def database() -> str:
    """A clean `test` database at the head migration. Unreachable Postgres fails the run, never skips."""
    name = make_url(POSTGRES_URL).database
    admin = create_engine(make_url(POSTGRES_URL).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:  # a second pytest-xdist worker's database, the first time
        if not connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    migrate.upgrade()
    redis.Redis.from_url(REDIS_URL).flushdb()  # the tests' own; unreachable Redis fails here too
    return POSTGRES_URL


@pytest.fixture(scope="session")
def tiny_model(database: str) -> str:
    """`tiny-llama`, built locally and registered as a base model."""
    from app.models.local import make_tiny

    make_tiny(name="tiny-llama", seed=0)
    return "tiny-llama"


@pytest.fixture(scope="session")
def server(database: str, tiny_model: str) -> Iterator[str]:
    """The API and one worker, as separate processes, on Postgres + Redis."""
    from app.services import start_services, stop_services, wait_ready

    port = free_port()
    # The shared worker's class, and one no test starts a worker for (tests/test_routing.py): set for these
    # processes only, since the stacks other tests start inherit this process's environment.
    os.environ["TUNEFORGE_WORKER_CLASSES"] = json.dumps(
        [{"queue": QUEUE, "gpus": 1}, {"queue": BIG_QUEUE} | BIG_WORKER]
    )
    try:
        processes = start_services(port, log_dir=TEST_HOME)
    finally:
        del os.environ["TUNEFORGE_WORKER_CLASSES"]
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, processes)
        yield base_url
    finally:
        stop_services(processes)


def make_key(project: str) -> str:
    with session_scope() as session:
        return key_service.create_key(session, project=project)[1]


@pytest.fixture(scope="session")
def api_key(database: str) -> str:
    return make_key("alpha")


@pytest.fixture(scope="session")
def other_key(database: str) -> str:
    return make_key("beta")


@pytest.fixture(scope="session")
def http(server: str, api_key: str) -> Iterator[httpx.Client]:
    """Plain HTTP as project `alpha`."""
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def other_http(server: str, other_key: str) -> Iterator[httpx.Client]:
    """Plain HTTP as project `beta`."""
    with httpx.Client(
        base_url=server, headers={"Authorization": f"Bearer {other_key}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="session")
def finished_job(http: httpx.Client) -> dict:
    """One LoRA job of project `alpha`, run to success."""
    training = upload(http, chat_jsonl())
    response = http.post(
        "/v1/fine_tuning/jobs",
        json=job_body(training["id"], checkpoint_every_steps=2) | {"suffix": "fixture"},
    )
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return job
