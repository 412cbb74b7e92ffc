"""One job on several devices: torchrun's launcher (torch.distributed.elastic) starts the ranks, DDP trains
them on gloo (on a CPU worker each "device" is a process), and rank 0 reports, checkpoints and publishes
(worker/launcher.py, worker/training/distributed.py).

The jobs go to the shared stack's "big" worker class (tests/conftest.py: two devices of kind Sim), whose
workers the tests start here with TUNEFORGE_WORKER_GPUS=2.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import safetensors.torch

from app.db.session import session_scope
from app.db.tables import Job
from tests.conftest import BIG_WORKER_ENV, TEST_HOME
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
from tests.stack import LONG_JOB, wait_until

# Two ranks of batch 2 against one process of batch 4: the same examples in each step, the loss averaged
# over all ranks' tokens. Without dropout (whose masks each rank draws itself) only the order of float
# sums differs: measured at most 1e-6 over 8 steps.
TOLERANCE = 1e-5
TWO_DEVICES = {"resources": {"gpus": 2}}
# 100 steps of 2 ranks x 2 examples (40 examples, 10 epochs), a checkpoint every 20.
SHORTER_JOB = LONG_JOB | {"n_epochs": 10}


class Workers:
    """Workers of the big class, each with two devices, shared by the module's tests (each start costs
    seconds of imports); a test that kills one leaves the others, and `live` starts more as needed."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.env = (
            os.environ
            | BIG_WORKER_ENV
            | {
                "TUNEFORGE_LEASE_SECONDS": "8",  # a killed worker's job is re-queued 8 s on, not 60
            }
        )

    def live(self, count: int = 1) -> list[subprocess.Popen]:
        """At least `count` running workers."""
        while len(running := [w for w in self.started if w.poll() is None]) < count:
            with (TEST_HOME / "two-device-worker.log").open("ab") as log:
                command = [sys.executable, "-m", "app.cli", "worker"]
                self.started.append(
                    subprocess.Popen(command, env=self.env, stdout=log, stderr=log, start_new_session=True)
                )
        return running

    def owner_of(self, job_id: str) -> subprocess.Popen:
        """The worker running `job_id` (its lease names the worker's host:pid)."""
        with session_scope() as session:
            owner = session.get(Job, job_id).lease_owner  # type: ignore[union-attr]
        return next(w for w in self.started if owner == f"{socket.gethostname()}:{w.pid}")

    def stop(self) -> None:
        for worker in self.started:  # stopped, not killed: a stopping worker removes its row from `workers`
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()


@pytest.fixture(scope="module")
def workers(server: str) -> Iterator[Workers]:
    pool = Workers()
    yield pool
    pool.stop()


def losses(http: httpx.Client, job_id: str) -> dict[int, float]:
    events = all_events(http, job_id)
    return {e["data"]["step"]: e["data"]["train_loss"] for e in events if is_training_step(e)}


def create(http: httpx.Client, body: dict) -> str:
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_two_ranks_train_as_one_process_with_twice_the_batch(http: httpx.Client, workers: Workers) -> None:
    training = upload(http, chat_jsonl(32))["id"]
    ranks = create(http, job_body(training, batch_size=2, lora_dropout=0.0) | TWO_DEVICES)
    single = create(
        http, job_body(training, batch_size=4, lora_dropout=0.0) | {"resources": {"gpu_kind": "sim"}}
    )
    workers.live()
    for job_id in (ranks, single):
        job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=300)
        assert job["status"] == "succeeded", job
    got, expected = losses(http, ranks), losses(http, single)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    worst = max(abs(got[step] - expected[step]) for step in expected)
    assert worst <= TOLERANCE, f"two ranks and one process differ by up to {worst}"

    # One account of the job (the leader's) and one adapter; each rank held the whole model (DDP).
    messages = [e["message"] for e in all_events(http, ranks)]
    assert sum(m.startswith("Training on 32 examples") for m in messages) == 1
    assert (finished(http, ranks)["ranks"], finished(http, ranks)["sharded"]) == (2, False)
    model = http.get(f"/v1/fine_tuning/jobs/{ranks}").json()["fine_tuned_model"]
    adapter = http.get(f"/v1/models/{model}/adapter")
    with tarfile.open(fileobj=io.BytesIO(adapter.content), mode="r:gz") as archive:
        assert "adapter_model.safetensors" in archive.getnames()


def test_a_two_rank_full_fine_tune_resumes_after_its_worker_is_killed(
    http: httpx.Client, workers: Workers
) -> None:
    """SIGKILL the job's worker after the first checkpoint: both ranks die with it, and the other
    worker's ranks resume from that checkpoint (each rank's RNG state included) and finish."""
    training = upload(http, chat_jsonl(40))["id"]
    # 60 steps of 2 ranks x 2 examples, a checkpoint every 10: the kill lands with most of the run ahead.
    body = job_body(training, peft="full", n_epochs=6, batch_size=2, checkpoint_every_steps=10)
    job_id = create(http, body | TWO_DEVICES)
    workers.live(2)
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint", 300)
    assert len(training_processes(job_id)) == 3, "the launcher and its two ranks"
    worker = workers.owner_of(job_id)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_until(lambda: not training_processes(job_id), "every rank died with its worker", 30)
    last = max(checkpoint_steps(http, job_id))
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    assert [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming from")] == [
        last
    ]
    resumed = next(i for i, e in enumerate(events) if e["message"].startswith("Resuming from"))
    after = [e["data"]["step"] for e in events[resumed:] if is_training_step(e)]
    assert after[0] == last + 1 and after[-1] == job["progress"]["total_steps"]
    # accelerate runs FSDP on GPUs only: CPU ranks keep whole copies (DDP), and the run says so.
    assert (finished(http, job_id)["ranks"], finished(http, job_id)["sharded"]) == (2, False)
    # The model is downloaded whole, as ordinary safetensors named like the base model's.
    archive = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as packed:
        weights = packed.extractfile("model.safetensors")
        assert weights is not None
        trained = safetensors.torch.load(weights.read())
    base = safetensors.torch.load_file(Path(base_folder(http)) / "model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}


def test_pause_stops_every_rank_at_one_step_and_resume_continues(
    server: str, api_key: str, http: httpx.Client, workers: Workers
) -> None:
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    training = upload(http, chat_jsonl(40))["id"]
    job_id = create(http, job_body(training, **SHORTER_JOB) | TWO_DEVICES)
    workers.live()
    wait_for_step(http, job_id, 3, timeout=300)
    assert sdk.fine_tuning.jobs.pause(job_id).status == "paused"
    paused_at = wait_for_event(http, job_id, "Job paused at step")["data"]["step"]
    wait_until(lambda: checkpoint_steps(http, job_id)[-1:] == [paused_at], "the paused run's checkpoint")
    wait_until(lambda: not training_processes(job_id), "every rank stopped")
    assert sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", job
    steps = losses(http, job_id)
    assert sorted(steps) == list(range(1, job["progress"]["total_steps"] + 1)), "every step, once"


def test_a_stop_signal_that_reaches_one_rank_first_stops_both_at_one_step(
    http: httpx.Client, workers: Workers
) -> None:
    """SIGTERM (save a checkpoint, stop, be re-queued) delivered to rank 1 alone, as a signal that lands
    on one rank a step before the other would: the ranks agree on the step, save it together, and the
    job resumes from it (here on the same worker, which is not shutting down) and finishes."""
    training = upload(http, chat_jsonl(40))["id"]
    job_id = create(http, job_body(training, **SHORTER_JOB) | TWO_DEVICES)
    workers.live()
    wait_for_step(http, job_id, 3, timeout=300)
    [rank_1] = [pid for pid in training_processes(job_id) if rank_of(pid) == "1"]
    os.kill(rank_1, signal.SIGTERM)
    saved = wait_for_event(http, job_id, "The worker is shutting down")["data"]["step"]
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    assert [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming from")] == [
        saved
    ]
    assert saved in checkpoint_steps(http, job_id) or saved < max(checkpoint_steps(http, job_id))


def finished(http: httpx.Client, job_id: str) -> dict:
    """The data of the run's "Training finished" event (its last attempt's)."""
    return [e for e in all_events(http, job_id) if e["message"].startswith("Training finished")][-1]["data"]


def base_folder(http: httpx.Client) -> str:
    from app.db.session import session_scope
    from app.models import service as model_service

    with session_scope() as session:
        return model_service.get_base_model(session, model_id="tiny-llama").path or ""


def rank_of(pid: int) -> str | None:
    """The rank a training process of a multi-device job names in its title (worker/launcher.py)."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\x00")[0]
    return title.split(" rank ")[1].split()[0] if " rank " in title else None


def test_a_rank_that_dies_takes_the_attempt_down_and_the_job_resumes(
    http: httpx.Client, workers: Workers
) -> None:
    """SIGKILL rank 1 alone (as the out-of-memory killer would): the launcher stops the group, the
    attempt ends like any crashed one, and the next attempt resumes from the last checkpoint."""
    training = upload(http, chat_jsonl(40))["id"]
    job_id = create(http, job_body(training, **SHORTER_JOB) | TWO_DEVICES)
    workers.live()
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint", 300)
    [rank_1] = [pid for pid in training_processes(job_id) if rank_of(pid) == "1"]
    os.kill(rank_1, signal.SIGKILL)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    retried = [e["message"] for e in events if "Retrying (attempt 1 of" in e["message"]]
    assert len(retried) == 1, [e["message"] for e in events][-12:]
    resumed = [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming from")]
    assert len(resumed) == 1 and resumed[0] in checkpoint_steps(http, job_id) + [resumed[0]]


def test_cancel_stops_every_rank(http: httpx.Client, workers: Workers) -> None:
    training = upload(http, chat_jsonl(40))["id"]
    job_id = create(http, job_body(training, **SHORTER_JOB) | TWO_DEVICES)
    workers.live()
    wait_for_step(http, job_id, 3, timeout=300)
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    wait_until(lambda: not training_processes(job_id), "every rank stopped", 60)
    stopped = [e for e in all_events(http, job_id) if e["message"].startswith("Training stopped at step")]
    assert len(stopped) == 1, "the leader says where the group stopped, once"
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None, job
