"""Faults injected for real: workers SIGKILLed and SIGTERMed, training processes killed, the broker
flushed, the database taken away. Every job must still finish exactly once, resuming where it stopped.

These tests run on a stack of their own (`tests/stack.py`). Resuming with the same losses is in
`tests/test_resume.py`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL
from tests.helpers import (
    all_events,
    chat_jsonl,
    checkpoint_steps,
    job_body,
    training_processes,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)
from tests.stack import LONG_JOB, Stack, http, no_workers_left, run_cli, stack  # noqa: F401 (fixtures)


def test_a_job_waiting_for_a_starting_worker_keeps_its_lease(stack: Stack, http: httpx.Client) -> None:
    """A worker takes its first job while its template process is still importing torch and co. (about
    7 s): it claims the job only once a run can start, so the lease (4 s here) is not spent waiting."""
    training = upload(http, chat_jsonl(8))
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]
    stack.start_worker(TUNEFORGE_LEASE_SECONDS="4")
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1, [e["message"] for e in all_events(http, job_id)]


def test_sigkill_in_the_middle_of_a_checkpoint_write_resumes_from_the_last_complete_one(
    stack: Stack, http: httpx.Client
) -> None:
    """Chaos 6, caught live: the worker is SIGKILLed while a checkpoint is half written.

    A checkpoint's resume-state archive goes to the store first, then its model archive, then its row.
    A full fine-tune of a 14M-parameter model spends about 1.7 s packing each model archive, so the
    kill lands with the state archive stored, the model archive unwritten and no row.
    """
    run_cli(
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
