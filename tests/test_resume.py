"""Resuming trains what an uninterrupted run trains: however a run stops (SIGKILL, SIGTERM, pause), the
resumed job's per-step losses equal those of the same job run straight through. Runs on a stack of its
own (`tests/stack.py`).
"""

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

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
from tests.stack import LONG_JOB, Stack, http, losses, no_workers_left, stack  # noqa: F401 (fixtures)


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
