"""Helpers shared by the tests: small training files, uploads, job bodies, polling."""

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from app.db.tables import TrainingFile  # reads no settings: safe before conftest sets them

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
    # Here, not at the top: conftest settles the environment before app loads.
    from app.services import api_command, free_port

    port = free_port()
    command = api_command(port)
    url = f"http://127.0.0.1:{port}"
    with serving_process(command, env, log_name, f"{url}/livez", "the API") as process:
        yield url, process


@contextmanager
def serving_process(
    command: list[str], env: dict[str, str], log_name: str, health_url: str, what: str, timeout: float = 60
) -> Iterator[subprocess.Popen]:
    """`command` run with its output in TUNEFORGE_HOME/`log_name`, once `health_url` answers 200; stopped
    (terminated, killed if it lingers) at the end."""
    with started_process(command, env, log_name) as process:
        wait_until_healthy(process, health_url, what, log_name, timeout)
        yield process


@contextmanager
def started_process(command: list[str], env: dict[str, str], log_name: str) -> Iterator[subprocess.Popen]:
    """`command` started (not waited for) with its output in TUNEFORGE_HOME/`log_name`; stopped at the end."""
    with (Path(env["TUNEFORGE_HOME"]) / log_name).open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_healthy(
    process: subprocess.Popen, health_url: str, what: str, log_name: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{what} exited; see {log_name}"
        assert time.monotonic() < deadline, f"{what} did not start in {timeout:.0f} s; see {log_name}"
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def all_events(http: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, oldest first."""
    events: list[dict] = []
    after = None
    while True:
        params: dict = {"limit": 100} | ({"after": after} if after else {})
        page = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return sorted(events, key=lambda e: (e["created_at"], int(e["id"].split("-")[1])))
        after = page["data"][-1]["id"]


def wait_for_event(http: httpx.Client, job_id: str, starts: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in all_events(http, job_id) if e["message"].startswith(starts)]
        if found:
            return found[-1]
        time.sleep(0.3)
    raise TimeoutError(f"no event '{starts}...' for job {job_id} in {timeout} s")


def is_training_step(event: dict) -> bool:
    """A training step's metrics; a validation pass writes `metrics` events too, without a train_loss."""
    return event["type"] == "metrics" and "train_loss" in (event["data"] or {})


def wait_for_step(http: httpx.Client, job_id: str, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [e["data"]["step"] for e in all_events(http, job_id) if is_training_step(e)]
        if steps and max(steps) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach step {step} in {timeout} s")


def checkpoint_steps(http: httpx.Client, job_id: str) -> list[int]:
    page = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()
    return sorted(c["step_number"] for c in page["data"])


def training_processes(job_id: str) -> list[int]:
    """Pids of the training processes of `job_id` on this machine (each names its job: worker/launcher.py)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(f"tuneforge train {job_id} ".encode()):
            pids.append(int(proc.name))
    return pids


def process_mb(pid: int, field: str) -> float:
    """A memory figure of process `pid` from /proc, in MB: `VmRSS` (resident now) or `VmHWM` (its peak)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1]) / 1024


def job_messages(queue: str) -> list[str]:
    """The job ids of the messages waiting in `queue` on the tests' broker, oldest first.

    kombu's Redis transport keeps a queue's messages in a list named after it, newest first.
    """
    broker = redis.Redis.from_url(os.environ["TUNEFORGE_BROKER_URL"])
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in broker.lrange(queue, 0, -1)]
    return [args[0] for args, _kwargs, _options in reversed(bodies)]


QUANTIZED_METHODS = ("qlora", "lora_8bit")


def quantization_expected(peft: str, base_dir: Path) -> dict | None:
    """The `quantization` a run of `peft` must record: every linear layer of the bare base model quantized.

    The bare model (no task head) holds the layers bitsandbytes converts; heads stay in full precision.
    """
    if peft not in QUANTIZED_METHODS:
        return None
    import torch  # here: conftest imports this module before the environment is settled
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import AutoModel

    bits, layer = {"qlora": (4, Linear4bit), "lora_8bit": (8, Linear8bitLt)}[peft]
    base = AutoModel.from_pretrained(base_dir)
    linear = sum(isinstance(module, torch.nn.Linear) for module in base.modules())
    return {"bits": bits, "quantized_modules": linear, "module_class": layer.__name__}


@contextmanager
def fresh_database(url: str, suffix: str) -> Iterator[str]:
    """An empty Postgres database next to `url`'s (`<name>_<suffix>`), created afresh (a leftover of an
    interrupted run goes first) and dropped afterwards, connections and all; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from app.db.session import get_engine

    base = make_url(url)
    name = f"{base.database}_{suffix}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield fresh
    finally:
        get_engine(fresh).dispose()  # code under test may have used the cached engine
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def chat_file_row(file_id: str, project: str, *, storage_key: str, examples: int = 8) -> TrainingFile:
    """A chat training file's row, for tests that write the database directly (the bytes are theirs)."""
    return TrainingFile(
        id=file_id,
        project=project,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=1,
        sha256="0" * 64,
        format="chat",
        example_count=examples,
        storage_key=storage_key,
    )


def scrape(client: httpx.Client, **kwargs: object) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, by name and labels."""
    response = client.get("/metrics", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    found = [value for (n, have), value in samples.items() if n == name and set(labels.items()) <= have]
    assert found, f"no {name}{labels} in /metrics"
    return sum(found)
