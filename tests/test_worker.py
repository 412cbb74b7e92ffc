"""The worker against real Redis and Postgres: duplicate delivery, cancel, and crashes."""

import shutil
import time

import httpx

from app import queue
from app.db.session import session_scope
from app.db.tables import Checkpoint, Job, Model
from tests.helpers import TEST_HOME, chat_jsonl, job_body, upload, wait_for_status


def events_of(http: httpx.Client, job_id: str) -> list[dict]:
    return list(
        reversed(http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"])
    )


def test_duplicate_message_runs_the_job_once(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(16))
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]
    queue.send_run_job(job_id)  # a redelivery of the same message
    queue.send_run_job(job_id)
    assert wait_for_status(http, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    time.sleep(3)  # let the duplicates reach the worker and be turned away
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempt == 1
        assert session.query(Model).filter_by(job_id=job_id).count() == 1
    started = [e for e in events_of(http, job_id) if e["message"].startswith("Fine-tuning job started")]
    assert len(started) == 1


def wait_for_metrics(http: httpx.Client, job_id: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(e["type"] == "metrics" for e in events_of(http, job_id)) < count:
        assert time.monotonic() < deadline, f"job {job_id} logged fewer than {count} steps"
        time.sleep(0.3)


def test_cancel_running_and_queued_jobs(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], n_epochs=50, batch_size=1)  # 2000 steps: it only ends by cancel
    running_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait_for_metrics(http, running_id, 3)
    with session_scope() as session:
        first_lease = session.get(Job, running_id).lease_expires_at  # type: ignore[union-attr]
    time.sleep(2.5)  # the tests' heartbeat is 1 s
    with session_scope() as session:
        assert session.get(Job, running_id).lease_expires_at > first_lease, "the worker renews its lease"  # type: ignore[union-attr]
    queued_id = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()["id"]

    queued = http.post(f"/v1/fine_tuning/jobs/{queued_id}/cancel").json()
    assert queued["status"] == "cancelled" and queued["finished_at"]
    assert http.post(f"/v1/fine_tuning/jobs/{running_id}/cancel").json()["status"] == "cancelled"

    deadline, stop = time.monotonic() + 60, None
    while time.monotonic() < deadline and stop is None:
        stop = next(
            (e for e in events_of(http, running_id) if e["message"].startswith("Training stopped")), None
        )
        time.sleep(0.3)
    assert stop is not None, "the worker never stopped the training"
    last_logged = max(e["data"]["step"] for e in events_of(http, running_id) if e["type"] == "metrics")
    # Metrics stop being recorded the moment the cancel commits; the step then in flight may finish, no more.
    assert stop["data"]["step"] <= last_logged + 2, (stop, last_logged)
    job = http.get(f"/v1/fine_tuning/jobs/{running_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None

    # The worker is free again: the next job runs to the end, and the cancelled queued one never started.
    follow_up = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"])).json()
    done = wait_for_status(http, follow_up["id"], {"succeeded", "failed"}, timeout=90)
    assert done["status"] == "succeeded"
    with session_scope() as session:
        row = session.get(Job, queued_id)
        assert row is not None and row.attempt == 0 and row.status == "cancelled"


def test_cancel_finished_job_is_a_no_op(http: httpx.Client, finished_job: dict) -> None:
    response = http.post(f"/v1/fine_tuning/jobs/{finished_job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["fine_tuned_model"] == finished_job["fine_tuned_model"]


def test_training_crash_becomes_failed_with_a_readable_error(http: httpx.Client) -> None:
    from app.cli import register_folder

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


def test_alpaca_and_text_files_train_with_packing_and_inputs(http: httpx.Client) -> None:
    alpaca = b"".join(
        b'{"instruction": "Add the numbers.", "input": "%d and %d", "output": "%d"}\n' % (i, i, 2 * i)
        for i in range(16)
    )
    text = b"".join(b'{"text": "Once upon a time there were %d cats."}\n' % i for i in range(16))
    for data, extra in ((alpaca, {"train_on_inputs": True}), (text, {"packing": True, "max_seq_length": 64})):
        body = job_body(upload(http, data)["id"], **extra)
        job = wait_for_status(
            http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
        )
        assert job["status"] == "succeeded", job
        assert (
            job["method"]["supervised"]["hyperparameters"] | extra
            == job["method"]["supervised"]["hyperparameters"]
        )
    # Packing puts the 16 short texts into fewer rows, so the one epoch takes fewer steps than 16 / 8 = 2.
    steps = [e["data"]["step"] for e in events_of(http, job["id"]) if e["type"] == "metrics"]
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
