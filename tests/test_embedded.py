"""`tuneforge up` on the embedded default (SQLite, filesystem broker, local artifacts), driven over HTTP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.services import wait_ready
from tests.conftest import free_port
from tests.helpers import wait_for_status
from tests.streaming import check_watched, event_delays, percentiles, watch, watched_job

pytestmark = pytest.mark.e2e


def tuneforge(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout


def check_quiet_start(said: Path, base_url: str, logs: Path) -> None:
    """`up` says one line per service once it is ready, then where it listens; the services' own output
    (Celery's banner, library warnings) goes to their logs."""
    deadline = time.monotonic() + 60
    while "Tuneforge is up" not in said.read_text():
        assert time.monotonic() < deadline, said.read_text()
        time.sleep(0.2)
    lines = said.read_text().splitlines()
    assert len(lines) == 5, lines
    ready = {line.split()[0]: line.split("ready")[1].strip() for line in lines[:4]}
    assert ready.keys() == {"api", "worker", "reconciler", "inference"}, lines
    assert ready["api"] == base_url and ready["worker"] == "queue tuneforge", lines
    assert ready["inference"].startswith("http://127.0.0.1:"), lines
    assert lines[4] == f"Tuneforge is up on {base_url}; logs in {logs}. Ctrl-C stops it.", lines
    assert {p.name for p in logs.iterdir()} == {"api.log", "worker.log", "reconciler.log", "inference.log"}
    assert "celery" in (logs / "worker.log").read_text(), "Celery's own output is in the worker's log"


def test_up_runs_a_job_on_the_embedded_default(tmp_path: Path) -> None:
    """A job on SQLite and the filesystem broker, watched live: its event stream (re-read, as SQLite has
    no notifications) and its log, as on Postgres (tests/test_streams.py)."""
    env = os.environ | {
        "TUNEFORGE_HOME": str(tmp_path / "home"),
        "TUNEFORGE_DATABASE_URL": "",
        "TUNEFORGE_BROKER_URL": "",
        "TUNEFORGE_QUEUE": "tuneforge",
    }
    tuneforge("models", "make-tiny", env=env)
    key = tuneforge("keys", "create", "--project", "laptop", env=env).strip().splitlines()[-1]
    assert key.startswith("tf-")

    port = free_port()
    said = tmp_path / "up.out"
    with said.open("w") as output:
        up = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=output,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, [up])
        check_quiet_start(said, base_url, tmp_path / "home" / "logs")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            job_id = watched_job(http)
            watched = watch(http, job_id)  # events streamed with three disconnects; the log followed
            check_watched(http, job_id, watched)
            job = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"})
            delays = event_delays(f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}", job_id, watched)
            print(f"event delay on the embedded default: {percentiles(delays)} events")
            assert max(delays) < 1.0, f"an event reached the stream {max(delays):.2f} s after it was written"
            adapter = http.get(f"/v1/models/{job['fine_tuned_model']}/adapter")
            assert adapter.status_code == 200 and adapter.content[:2] == b"\x1f\x8b"  # gzip
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, f"`tuneforge up` exited with {up.returncode} on SIGTERM"
    home = tmp_path / "home"
    assert (home / "tuneforge.db").is_file()
    assert (home / "artifacts" / "adapters" / job_id / "attempt-1.tar.gz").is_file()
    assert list((home / "broker").iterdir()), "the filesystem transport carried the message"
