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
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import (
    all_events,
    chat_jsonl,
    checkpoint_steps,
    is_training_step,
    job_body,
    training_processes,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)
from tests.stack import (  # noqa: F401 (fixtures)
    LEASE_SECONDS,
    Stack,
    database_away,
    events_in_order,
    freeze_run,
    http,
    metric_steps,
    no_workers_left,
    run_cli,
    stack,
    template_of,
    wait_until,
)

# 40 steps with a checkpoint every 10, for tests that freeze the run (SIGSTOP) where a fault must find it
# mid-run: its length then never depends on how fast the machine trains, so it can be short.
SHORT_JOB = {"n_epochs": 1, "batch_size": 1, "checkpoint_every_steps": 10}
# What the reconciler writes when it takes a job from a worker that stopped renewing its lease: from then
# on every write of that attempt is fenced off (app/jobs/lifecycle.py).
FENCED = "The worker of attempt 1 stopped renewing its lease; job re-queued."


def test_a_job_waiting_for_a_starting_worker_keeps_its_lease(stack: Stack, http: httpx.Client) -> None:
    """A worker takes its first job while its template process is still importing torch and co. (about
    7 s): it claims the job only once a run can start, so the lease (4 s here) is not spent waiting. The
    template is frozen (SIGSTOP) from its start until twice the lease after the worker has received the
    job, so the wait outlasts the lease however fast this machine imports."""
    lease = 4
    training = upload(http, chat_jsonl(8))
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]
    log = Path(stack.env["TUNEFORGE_HOME"]) / "worker.log"

    def received() -> int:  # Celery logs "Task tuneforge.run_job[<id>] received" as a worker takes one
        return log.read_text(errors="replace").count("] received") if log.exists() else 0

    before = received()
    worker = stack.start_worker(TUNEFORGE_LEASE_SECONDS=str(lease))
    wait_until(lambda: template_of(worker), "the worker started its template process")
    template = template_of(worker)
    assert template is not None
    os.kill(template, signal.SIGSTOP)
    try:
        wait_until(lambda: received() > before, "the worker received the job")
        time.sleep(2 * lease)  # the fault itself: a template that takes this much longer to be ready
    finally:
        os.kill(template, signal.SIGCONT)
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
        wait_until(lambda: training_processes(job_id), f"attempt {attempt} started its run")
        os.kill(training_processes(job_id)[0], signal.SIGKILL)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "training_crashed"
    assert "killed by signal 9" in job["error"]["message"]
    assert "used all 3 attempts" in job["error"]["message"]
    # Nothing picks the failed job up again: the worker takes, and finishes, a job posted after the
    # failure, so every message for the poison job sent before it has been consumed by then.
    later = http.post("/v1/fine_tuning/jobs", json=job_body(upload(http, chat_jsonl(16))["id"])).json()["id"]
    assert wait_for_status(http, later, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["attempt"] == 3, job
    assert stack.workers[0].poll() is None, "the worker survives its jobs' crashes"


def test_flushed_broker_loses_no_job(stack: Stack, http: httpx.Client) -> None:
    """Chaos 4: Redis loses every message while one job runs and two wait; all three finish."""
    training = upload(http, chat_jsonl(16))
    stack.start_worker()
    running = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=2, batch_size=1))
    waiting = [http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])) for _ in range(2)]
    wait_for_step(http, running.json()["id"], 2)
    run = freeze_run(running.json()["id"])  # still running when the messages go, however fast it trains
    redis.Redis.from_url(stack.broker).flushdb()
    os.kill(run, signal.SIGCONT)
    for job_id in [running.json()["id"]] + [w.json()["id"] for w in waiting]:
        job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
        assert job["status"] == "succeeded" and job["attempt"] == 1, job


def test_database_outage_mid_run_finishes_without_overlap(stack: Stack, http: httpx.Client) -> None:
    """Chaos 10: the job database cuts every connection and refuses new ones, for longer than the lease,
    while a job trains. The run trains on while its lease may still be valid; past 80% of the lease the
    worker stops it, since the reconciler may by then give the job to another worker. With the database
    back, the reconciler re-queues the job, which fences attempt 1 off, and attempt 2 resumes from the
    last checkpoint and finishes; attempt 1 writes nothing after the fence, and one model is published."""
    training = upload(http, chat_jsonl(40))
    stack.start_worker()
    # Twice SHORT_JOB: thawed without the database, the run trains on for a moment before it is frozen.
    body = job_body(training["id"], **SHORT_JOB | {"n_epochs": 2})
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait_until(lambda: checkpoint_steps(http, job_id), "attempt 1 recorded a checkpoint to resume from")
    run = freeze_run(job_id)  # mid-run when the database goes, however fast it trains
    train_log = Path(stack.env["TUNEFORGE_HOME"]) / "artifacts" / "logs" / job_id / "attempt-1.log"
    with database_away(stack):
        cut = time.monotonic()
        os.kill(run, signal.SIGCONT)
        wait_until(  # worker/training/callbacks.py logs this at each step it cannot read the job's status
            lambda: "training on" in train_log.read_text(errors="replace"),
            "the run went on training without the database",
        )
        os.kill(run, signal.SIGSTOP)  # a step as long as the outage: the run cannot end on its own first
        wait_until(
            lambda: not training_processes(job_id),
            "the worker stopped the run before the lease it could not renew ran out",
        )
        time.sleep(max(0.0, cut + LEASE_SECONDS - time.monotonic()))  # the outage outlasts the lease
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job

    events = events_in_order(http, job_id)
    messages = [e["message"] for e in events]
    assert FENCED in messages, "the reconciler re-queued the job when the database came back"
    fenced = messages.index(FENCED)
    assert messages[fenced + 1].startswith("Fine-tuning job started (attempt 2"), (
        f"attempt 1 wrote after it was fenced off: {messages[fenced + 1 : fenced + 4]}"
    )
    saved = [e["data"]["step"] for e in events[:fenced] if e["message"].startswith("Checkpoint created")]
    resumed = [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming")]
    assert resumed == [max(saved)], "attempt 2 resumed from attempt 1's last recorded checkpoint"
    steps = [e["data"]["step"] for e in events[fenced:] if is_training_step(e)]
    assert steps == list(range(max(saved) + 1, 81)), "only attempt 2 trained after the fence, once"
    assert stack.sql("SELECT count(*) FROM models WHERE job_id = :j", j=job_id)[0][0] == 1


def test_a_frozen_workers_attempt_writes_nothing_once_fenced_off(stack: Stack, http: httpx.Client) -> None:
    """A worker that stops answering (its machine frozen: SIGSTOP to the worker, its template and its run)
    loses the job when its lease runs out, and another worker runs attempt 2. Woken up, attempt 1 can no
    longer be killed in time: what keeps it apart is the fence. It finds, at the end of its step, that it
    was superseded, and stops without writing an event, a metric or a checkpoint after the fence."""
    training = upload(http, chat_jsonl(40))
    workers = [stack.start_worker(), stack.start_worker()]
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], **SHORT_JOB)).json()["id"]
    wait_until(lambda: checkpoint_steps(http, job_id), "attempt 1 recorded a checkpoint to resume from")
    [[owner]] = stack.sql("SELECT lease_owner FROM jobs WHERE id = :j", j=job_id)
    [frozen] = [w for w in workers if owner.endswith(f":{w.pid}")]
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        wait_for_event(http, job_id, "Fine-tuning job started (attempt 2")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    wait_until(lambda: not training_processes(job_id), "attempt 1 stopped once awake")

    events = events_in_order(http, job_id)
    messages = [e["message"] for e in events]
    fenced = messages.index(FENCED)
    saved = [e["data"]["step"] for e in events[:fenced] if e["message"].startswith("Checkpoint created")]
    after = events[fenced + 1 :]
    stopped = [e["message"] for e in after if e["message"].startswith("Training stopped")]
    assert stopped == [], "attempt 1 wrote after it was fenced off"
    steps = [e["data"]["step"] for e in after if is_training_step(e)]
    assert steps == list(range(max(saved) + 1, 41)), "only attempt 2 trained after the fence, once"
    checkpoints = [e["data"]["step"] for e in after if e["message"].startswith("Checkpoint created")]
    assert checkpoints == list(range(max(saved) + 10, 41, 10)), "only attempt 2 saved after the fence"
    [[key]] = stack.sql("SELECT storage_key FROM models WHERE job_id = :j", j=job_id)
    assert key == f"adapters/{job_id}/attempt-2.tar.gz"


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


def test_a_stopping_worker_kills_a_run_that_outlasts_its_shutdown_grace(
    stack: Stack, http: httpx.Client
) -> None:
    """A worker asked to stop (SIGTERM) gives its run SHUTDOWN_GRACE_SECONDS to save a checkpoint, then
    kills it. The run here is frozen in its step (SIGSTOP), so it cannot save, and only a SIGKILL ends a
    stopped process. The job is re-queued without using an attempt and resumes from its last checkpoint."""
    training = upload(http, chat_jsonl(40))
    worker = stack.start_worker(TUNEFORGE_SHUTDOWN_GRACE_SECONDS="1")
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], **SHORT_JOB)).json()["id"]
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint to resume from")
    freeze_run(job_id)
    saved = max(checkpoint_steps(http, job_id))  # frozen: it records no other
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: worker.poll() is not None, "the worker killed its frozen run and exited")
    assert worker.returncode == 0, "the worker shut down cleanly"
    assert training_processes(job_id) == [], "the frozen run was killed"
    messages = [e["message"] for e in all_events(http, job_id)]
    assert not [m for m in messages if m.startswith("The worker is shutting down: saving")], "it never saved"
    assert messages[-1].startswith("The worker shut down; the job is re-queued"), messages[-3:]
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    assert stack.sql("SELECT max_attempts FROM jobs WHERE id = :j", j=job_id)[0][0] == 4, "not counted"

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert wait_for_event(http, job_id, "Resuming from the checkpoint")["data"]["resumed_from_step"] == saved


def test_a_run_past_the_job_timeout_fails_and_the_worker_runs_the_next(
    stack: Stack, http: httpx.Client
) -> None:
    """A run still going TUNEFORGE_JOB_TIMEOUT_SECONDS after it started is killed and its job fails with
    `timeout`; the worker goes on to the next job. Each run is frozen in its step (SIGSTOP) as soon as it
    starts, so it outlasts the timeout however fast this machine trains: the next job ends the same way,
    which shows the worker took it and watched it as it did the first."""
    training = upload(http, chat_jsonl(16))
    stack.start_worker(TUNEFORGE_JOB_TIMEOUT_SECONDS="5")
    jobs = [http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"] for _ in range(2)]
    for job_id in jobs:
        freeze_run(job_id)
        job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=120)
        assert job["status"] == "failed" and job["attempt"] == 1, job
        assert job["error"] == {
            "code": "timeout",
            "message": "Training ran longer than 5 s and was stopped.",
            "param": None,
        }
        assert training_processes(job_id) == [], "the frozen run was killed"
    assert stack.workers[0].poll() is None


def test_up_replaces_a_worker_that_died(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tuneforge up` supervises its processes: a dead worker is replaced, any other death stops it."""
    from app.services import supervise, worker_command

    # The replacement inherits this environment: point it at the chaos stack, not the shared one.
    for name in ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_BROKER_URL", "TUNEFORGE_HOME"):
        monkeypatch.setenv(name, stack.env[name])
    dead = subprocess.Popen(worker_command(), env=stack.env)
    dead.kill()
    dead.wait()
    processes = [dead]
    try:
        assert supervise(processes) is None
        replacement = processes[0]
        assert replacement is not dead and replacement.poll() is None
        assert replacement.args[:6] == worker_command()[:6]  # type: ignore[index]
    finally:
        processes[0].kill()
        processes[0].wait()
    api = subprocess.Popen([sys.executable, "-c", "pass"])
    api.wait()
    stopping = supervise([api])
    assert stopping is not None and stopping.startswith("the ") and "exited with code 0" in stopping


@pytest.mark.parametrize("preload", ["true", "false"])
def test_a_run_dies_with_its_worker_however_it_was_started(
    stack: Stack, http: httpx.Client, preload: str
) -> None:
    """Runs fork from the preloaded template (no GPU) or start a fresh interpreter (GPU machines); either
    way a SIGKILLed worker's run dies with it, so no later attempt can overlap it. A later attempt can
    start once the reconciler has re-queued the job (its lease ran out): by then the run must be gone."""
    training = upload(http, chat_jsonl(40))
    worker = stack.start_worker(TUNEFORGE_PRELOAD_TRAINING=preload)
    # 2000 steps: a run left behind would still be training when the lease runs out, whatever the machine.
    body = job_body(training["id"], n_epochs=50, batch_size=1)
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    try:
        wait_for_step(http, job_id, 2)
        [pid] = training_processes(job_id)
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert (parent == worker.pid) is (preload == "false"), "forked by the template, or by the worker"
        worker.kill()
        worker.wait()
        in_flight = max(metric_steps(http, job_id)) + 1  # the step the run was in as its worker died
        wait_until(
            lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != "running",
            "the reconciler re-queued the job of the dead worker",
        )
        assert training_processes(job_id) == [], "the run outlived its worker into the next attempt's time"
        # A run left behind would have recorded the steps it trained until the job was taken from it.
        assert max(metric_steps(http, job_id)) <= in_flight, "the run trained on after its worker died"
        messages = [e["message"] for e in events_in_order(http, job_id)]
        assert FENCED in messages, messages[-3:]
        after = messages[messages.index(FENCED) + 1 :]
        assert after == [], f"the run wrote after its job was taken from it: {after}"
    finally:  # no later test's worker should pick the job up again
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
