"""Helpers shared by the tests: small training files, uploads, job bodies, polling."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TEST_HOME = Path(os.environ["TUNEFORGE_HOME"])


def wait_for_status(http: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
    """Poll a job until it reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout} s")


def chat_jsonl(count: int = 40, offset: int = 0) -> bytes:
    """A small chat training file the tiny model can fit."""
    lines = [
        f'{{"messages": [{{"role": "user", "content": "What is {i} plus {i}?"}}, '
        f'{{"role": "assistant", "content": "{i} plus {i} is {2 * i}."}}]}}'
        for i in range(offset, offset + count)
    ]
    return ("\n".join(lines) + "\n").encode()


def upload(http: httpx.Client, data: bytes, filename: str = "train.jsonl") -> dict:
    response = http.post("/v1/files", files={"file": (filename, data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def job_body(training_file: str, **hyperparameters: object) -> dict:
    hp = {"n_epochs": 1, "batch_size": 8} | hyperparameters
    return {
        "model": "tiny-llama",
        "training_file": training_file,
        "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


@contextmanager
def api_process(env: dict[str, str], log_name: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """An API server process of its own, with the settings in `env`; yields its URL once /livez answers."""
    from app.cli import free_port  # here, not at the top: conftest settles the environment before app loads

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"]
    with (Path(env["TUNEFORGE_HOME"]) / log_name).open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the API process exited; see {log_name}"
            assert time.monotonic() < deadline, f"the API did not start in 60 s; see {log_name}"
            try:
                if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
