"""The worker against real Redis and Postgres: duplicate delivery, cancel, and crashes.

Two tests hold a job's row lock (`row_locked`) to line events up without relying on timing: workers'
claims of the job, and a training process writing a step's metrics, wait on it until the test lets go.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db.session import get_engine, session_scope
from app.db.tables import Checkpoint, Job, Model
from app.jobs import lifecycle
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from tests.conftest import POSTGRES_URL
from tests.helpers import (
    TEST_HOME,
    all_events,
    chat_jsonl,
    is_training_step,
    job_body,
    upload,
    wait_for_event,
    wait_for_status,
)


def events_of(http: httpx.Client, job_id: str) -> list[dict]:
    return list(
        reversed(http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"])
    )


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120) -> None:
    """Poll until `condition` holds; `timeout` only bounds a failure, it never decides a pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no sign of {what} after {timeout} s"
        time.sleep(0.2)


@contextmanager
def row_locked(job_id: str) -> Iterator[tuple[Session, Callable[[], list[tuple[str, str]]]]]:
    """Hold the job's row lock until the block ends; yields the holding session and `waiting()`.

    Whatever writes the row (a claim, a lease renewal) or inserts a row that refers to it (an event) waits
    until the block's transaction ends. `waiting()` lists the statements waiting on a lock in the tests'
    database now, as (application name, statement): the second of two writers of one row waits on the
    first, not on the holder, so this does not ask who blocks them.
    """
    blocked = text(
        "SELECT application_name, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"
    )

    def waiting() -> list[tuple[str, str]]:
        # A transaction of its own each time: pg_stat_activity is read once per transaction.
        with get_engine().connect() as connection:
            return [(row[0], row[1]) for row in connection.execute(blocked)]

    with Session(get_engine()) as holder, holder.begin():
        holder.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        yield holder, waiting


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def logged(self, line: str) -> bool:
        return line in self.log.read_text(errors="replace")


@contextmanager
def workers_on(queue: str, count: int) -> Iterator[list[Worker]]:
    """`count` workers (`tuneforge worker`) consuming `queue`; each names itself to Postgres by its name."""
    workers = []
    try:
        for index in range(count):
            name = f"{queue}-worker-{index}"
            database = make_url(POSTGRES_URL).update_query_dict({"application_name": name})
            env = os.environ | {
                "TUNEFORGE_QUEUE": queue,
                "TUNEFORGE_DATABASE_URL": database.render_as_string(hide_password=False),
                # Each run starts a fresh interpreter: a worker that never runs one never imports torch.
                "TUNEFORGE_PRELOAD_TRAINING": "false",
            }
            log = TEST_HOME / f"{name}.log"
            with log.open("ab") as output:
                command = [sys.executable, "-m", "app.cli", "worker"]
                process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
            workers.append(Worker(name, process, log))
        yield workers
    finally:
        for worker in workers:
            worker.process.terminate()
        for worker in workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


SEND_COPIES = """
import sys
from app.queue import send_run_job
print("ready", flush=True)
job_id = input()
for _ in range(int(sys.argv[2])):
    send_run_job(job_id, sys.argv[1])
"""


@contextmanager
def sender(queue: str, copies: int) -> Iterator[Callable[[str], None]]:
    """A process that sends `copies` of a job's message to `queue` by the app's own send, once given the
    job's id. It starts (imports, settings) ahead, so that sending takes milliseconds."""
    command = [sys.executable, "-c", SEND_COPIES, queue, str(copies)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(job_id: str) -> None:
        process.communicate(f"{job_id}\n", timeout=120)
        assert process.returncode == 0, "the sender failed"

    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n", "the sender failed"
        yield send
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_duplicate_message_runs_the_job_once(http: httpx.Client) -> None:
    """Two workers get the same job's message and claim it at the same moment: one runs it, one refuses.

    They have a queue of their own. The job's row lock holds both claims until both are waiting on it,
    then lets them go together, so the claim's own condition is what decides, every time.
    """
    queue = f"duplicates-{uuid.uuid4().hex[:8]}"
    training = upload(http, chat_jsonl(16))
    with workers_on(queue, 2) as workers, sender(queue, copies=2) as send:
        for worker in workers:
            wait_until(partial(worker.logged, " ready."), f"{worker.name} consuming its queue")
        with session_scope() as session:
            spec = JobCreate(**job_body(training["id"]))
            job = job_service.create_job(session, project="alpha", spec=spec)
            job.queue, job_id = queue, job.id  # as an API of this queue would create it
            # Recorded as sent, as the API does: the tests' reconciler leaves the job alone for a while.
            lifecycle.mark_sent(session, job_ids=[job_id])
        with row_locked(job_id) as (_, waiting):
            send(job_id)
            names = {worker.name for worker in workers}
            wait_until(lambda: names <= {name for name, _ in waiting()}, "both workers claiming the job")
        job = wait_for_status(http, job_id, {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        events = all_events(http, job_id)
        started = [e["message"] for e in events if e["message"].startswith("Fine-tuning job started")]
        assert len(started) == 1, started
        # Every worker that did not win turned its message away (the tests' reconciler may have sent a
        # third copy, to this queue too: the job still ran once).
        host = socket.gethostname()  # a run's owner is the host:pid of its worker
        losers = [w for w in workers if not started[0].endswith(f"{host}:{w.process.pid}).")]
        assert losers, started
        for loser in losers:
            refused = f"woken for job {job_id}: no queued job this worker can hold"
            wait_until(partial(loser.logged, refused), f"{loser.name} turning the duplicate away")
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.attempt == 1
        assert session.query(Model).filter_by(job_id=job_id).count() == 1


def wait_for_metrics(http: httpx.Client, job_id: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(is_training_step(e) for e in events_of(http, job_id)) < count:
        assert time.monotonic() < deadline, f"job {job_id} logged fewer than {count} steps"
        time.sleep(0.3)


def lease_of(job_id: str) -> datetime:
    with session_scope() as session:
        lease = session.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
    assert lease is not None, f"job {job_id} holds no lease"
    return lease


def test_cancel_running_and_queued_jobs(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], n_epochs=50, batch_size=1)  # 2000 steps: it only ends by cancel
    running_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait_for_metrics(http, running_id, 3)
    first_lease = lease_of(running_id)
    wait_until(lambda: lease_of(running_id) > first_lease, "the worker renewing its lease")
    queued_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]

    queued = http.post(f"/v1/fine_tuning/jobs/{queued_id}/cancel").json()
    assert queued["status"] == "cancelled" and queued["finished_at"]

    # The cancel commits while the run is held writing one step's metrics, so that step is the one in
    # flight (it is recorded: the run checked it still owned the job before it began to write). The lock can
    # catch the run at the step's event or just after it, at the progress it then writes on the job's row.
    writing_a_step = ("INSERT INTO job_events", "UPDATE jobs SET step=")
    with row_locked(running_id) as (holder, waiting):
        wait_until(
            lambda: any(query.startswith(writing_a_step) for _, query in waiting()),
            "the run writing a step's metrics",
        )
        assert job_service.cancel_job(holder, project="alpha", job_id=running_id).status == "cancelled"
    stop = wait_for_event(http, running_id, "Training stopped")
    in_flight = max(e["data"]["step"] for e in all_events(http, running_id) if is_training_step(e))
    # Metrics stop being recorded the moment the cancel commits; the run may take one more step, no more.
    assert stop["data"]["step"] <= in_flight + 1, (stop, in_flight)
    job = http.get(f"/v1/fine_tuning/jobs/{running_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None

    # The worker is free again: it takes the cancelled queued job's message, turns it away, then runs the
    # next job to the end.
    follow_up = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()
    done = wait_for_status(http, follow_up["id"], {"succeeded", "failed"}, timeout=90)
    assert done["status"] == "succeeded"
    assert f"woken for job {queued_id}" in (TEST_HOME / "worker.log").read_text()
    with session_scope() as session:
        row = session.get(Job, queued_id)
        assert row is not None and row.attempt == 0 and row.status == "cancelled"


def test_cancel_finished_job_is_a_no_op(http: httpx.Client, finished_job: dict) -> None:
    response = http.post(f"/v1/fine_tuning/jobs/{finished_job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["fine_tuned_model"] == finished_job["fine_tuned_model"]


def test_training_crash_becomes_failed_with_a_readable_error(http: httpx.Client) -> None:
    from app.models.local import register_folder

    broken = TEST_HOME / "models" / "broken-llama"
    shutil.copytree(TEST_HOME / "models" / "tiny-llama", broken, dirs_exist_ok=True)
    register_folder("broken-llama", broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    training = upload(http, chat_jsonl(8))
    job_id = http.post(
        "/v1/fine_tuning/jobs", json=job_body(training["id"]) | {"model": "broken-llama"}
    ).json()["id"]
    job = wait_for_status(http, job_id, {"succeeded", "failed"})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "training_error"
    assert "safetensors" in job["error"]["message"].lower() or "header" in job["error"]["message"].lower()
    assert any(e["level"] == "error" for e in events_of(http, job_id))
    with session_scope() as session:
        assert session.query(Model).filter_by(job_id=job_id).count() == 0
        assert session.query(Checkpoint).filter_by(job_id=job_id).count() == 0


def test_full_fine_tuning_ships_a_loadable_model(http: httpx.Client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    training = upload(http, b'{"prompt": "2+2=", "completion": " 4"}\n' * 16)
    body = job_body(training["id"], peft="full", learning_rate_multiplier=50)
    job = wait_for_status(
        http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
    )
    assert job["status"] == "succeeded", job
    archive = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path)
    base = load_file(TEST_HOME / "models" / "tiny-llama" / "model.safetensors")
    changed = [
        name for name, p in tuned.state_dict().items() if name in base and not torch.equal(p, base[name])
    ]
    assert len(changed) > len(base) // 2, "full fine-tuning updates (nearly) every weight"


def alpaca_line(value: int, terms: int) -> bytes:
    numbers = " and ".join([str(value)] * terms)
    example = {"instruction": "Add the numbers.", "input": numbers, "output": str(value * terms)}
    return json.dumps(example).encode() + b"\n"


def test_alpaca_and_text_files_train_with_packing_and_inputs(http: httpx.Client) -> None:
    # Every other example's input is so long that max_seq_length cuts off its whole output. Without
    # train_on_inputs such an example has no token left that carries loss and is dropped; with it, its
    # input carries loss, so all 16 train.
    alpaca = b"".join(alpaca_line(i, terms=40 if i % 2 else 2) for i in range(16))
    body = job_body(upload(http, alpaca)["id"], train_on_inputs=True, max_seq_length=64)
    job = wait_for_status(
        http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
    )
    assert job["status"] == "succeeded", job
    plan = wait_for_event(http, job["id"], "Training on")
    assert plan["data"]["examples"] == 16, plan
    assert "8 truncated, 0 without completion tokens dropped" in plan["message"], plan

    text = b"".join(b'{"text": "Once upon a time there were %d cats."}\n' % i for i in range(16))
    body = job_body(upload(http, text)["id"], packing=True, max_seq_length=64)
    job = wait_for_status(
        http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
    )
    assert job["status"] == "succeeded", job
    # Packing puts the 16 short texts into fewer rows, so the one epoch takes fewer steps than 16 / 8 = 2.
    steps = [e["data"]["step"] for e in events_of(http, job["id"]) if is_training_step(e)]
    assert steps == [1], steps


def test_validation_split_reports_valid_loss(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(16))
    both = job_body(training["id"], validation_split=0.25) | {"validation_file": training["id"]}
    error = http.post("/v1/fine_tuning/jobs", json=both)
    assert error.status_code == 400 and error.json()["error"]["param"].endswith("validation_split")

    body = job_body(training["id"], validation_split=0.25, checkpoint_every_steps=1)
    job = wait_for_status(
        http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
    )
    assert job["status"] == "succeeded", job
    assert any(e["message"].startswith("Training on 12 examples") for e in events_of(http, job["id"]))
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints and all("valid_loss" in c["metrics"] for c in checkpoints)


def test_the_running_worker_keeps_its_healthcheck_green(server: str) -> None:
    """The worker touches its heartbeat file from worker_init on; the container healthcheck reads it."""
    import subprocess
    import sys

    check = subprocess.run(
        [sys.executable, "-m", "worker.health", "--max-age", "30"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
