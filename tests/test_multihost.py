"""Tuneforge on several hosts: network namespaces on this machine (tests/netns.py), joined by a bridge.

The `services` namespace runs what the hosts share: a private Postgres (the installed initdb and
postgres binaries), redis-server and moto's S3 server. The API and the reconciler run on host `api`,
two workers on hosts `a` and `b`, the inference server on host `inference`; each has a TUNEFORGE_HOME
of its own on this machine's disk and reaches the others only over the bridge. The test talks to the
API and to Postgres through loopback forwarders, never through an address of the machine's namespace.

A job starts on host a; a's worker is SIGKILLed mid-run; b resumes it from the last checkpoint in the
store; the model is then served, merged and downloaded from the inference host. Nothing is lost (every
step after the checkpoint is trained, the log of the killed attempt is kept) and nothing is run twice
(one model, one adapter, a second attempt only).
"""

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import openai
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.helpers import (
    all_events,
    chat_jsonl,
    checkpoint_steps,
    is_training_step,
    job_body,
    training_processes,
    upload,
    wait_for_status,
)
from tests.netns import Host, Network, private_postgres
from tests.stack import LONG_JOB, wait_until

API_PORT, INFERENCE_PORT, REDIS_PORT, S3_PORT = 8000, 8001, 6379, 9000
BUCKET = "tuneforge"
# 120 steps of 2 examples, a checkpoint every 10: the kill lands with most of the run ahead.
HOSTS_JOB = LONG_JOB | {"n_epochs": 6, "checkpoint_every_steps": 10}
TOTAL_STEPS = 40 // HOSTS_JOB["batch_size"] * HOSTS_JOB["n_epochs"]  # 40 examples


@dataclass
class Cluster:
    network: Network
    hosts: dict[str, Host]
    env: dict[str, str]  # the settings every host shares
    folder: Path  # each host's TUNEFORGE_HOME is folder/<host>
    url: str = ""  # the API, through a loopback forwarder
    key: str = ""
    db: Engine | None = None  # the shared Postgres, through a loopback forwarder
    s3: Any = None  # a boto3 client of the shared store, through a loopback forwarder
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env_of(self, host: str) -> dict[str, str]:
        home = self.folder / host
        home.mkdir(exist_ok=True)
        return self.env | {"TUNEFORGE_HOME": str(home)}

    def start(self, host: str, *command: str, log: str) -> subprocess.Popen:
        """`command` on `host` (in its namespace, with its own TUNEFORGE_HOME), output to `log`."""
        env = self.env_of(host)
        process = subprocess.Popen(
            self.hosts[host].command(*command),
            env=env,
            stdout=(Path(env["TUNEFORGE_HOME"]) / log).open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def cli(self, host: str, *args: str) -> str:
        done = subprocess.run(
            self.hosts[host].command(sys.executable, "-m", "app.cli", *args),
            env=self.env_of(host),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def sql(self, query: str, **params: object) -> list:
        assert self.db is not None
        with self.db.begin() as connection:
            return list(connection.execute(text(query), params))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    network = Network()
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-hosts-"))
    try:
        hosts = {name: network.add_host(name) for name in ("api", "a", "b", "inference")}
        services = network.services
        with private_postgres(network, folder / "postgres.log") as database_url:
            env = os.environ | {
                "TUNEFORGE_DATABASE_URL": database_url,
                "TUNEFORGE_BROKER_URL": f"redis://{services.address}:{REDIS_PORT}/0",
                "TUNEFORGE_ARTIFACT_URL": f"s3://{BUCKET}/cluster",
                "TUNEFORGE_S3_ENDPOINT_URL": f"http://{services.address}:{S3_PORT}",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "TUNEFORGE_QUEUE": "tuneforge",
                "TUNEFORGE_LEASE_SECONDS": "8",
                "TUNEFORGE_HEARTBEAT_SECONDS": "1",
                "TUNEFORGE_RECONCILE_SECONDS": "1",
                "TUNEFORGE_INFERENCE_URL": f"http://{hosts['inference'].address}:{INFERENCE_PORT}",
                "TUNEFORGE_INFERENCE_SECRET": "a-secret-for-the-hosts-test",
            }
            cluster = Cluster(network, hosts | {"services": services}, env, folder)
            try:
                yield from _started(cluster)
            finally:
                for process in cluster.processes:
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                if cluster.db is not None:
                    cluster.db.dispose()
    finally:
        network.close()


def _started(cluster: Cluster) -> Iterator[Cluster]:
    services = cluster.hosts["services"].address
    cluster.start("services", "redis-server", "--bind", services, "--port", str(REDIS_PORT), "--save", "",
                  "--appendonly", "no", "--protected-mode", "no", log="redis.log")  # fmt: skip
    cluster.start(
        "services", sys.executable, "-m", "moto.server", "-H", services, "-p", str(S3_PORT), log="s3.log"
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{cluster.network.forward(cluster.hosts['services'], S3_PORT)}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    wait_until(lambda: _succeeds(lambda: s3.create_bucket(Bucket=BUCKET)), "the S3 server", 60)
    wait_until(lambda: _succeeds(lambda: cluster.cli("api", "db", "upgrade")), "Postgres", 60)
    cluster.cli("api", "models", "make-tiny")
    cluster.key = cluster.cli("api", "keys", "create", "--project", "hosts").strip().splitlines()[-1]
    api = cluster.hosts["api"].address
    uvicorn = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", api, "--port", str(API_PORT)]
    cluster.start("api", *uvicorn, "--log-level", "warning", log="api.log")
    cluster.start("api", sys.executable, "-m", "app.cli", "reconciler", log="reconciler.log")
    cluster.url = f"http://127.0.0.1:{cluster.network.forward(cluster.hosts['api'], API_PORT)}"
    postgres = cluster.network.forward(cluster.hosts["services"], 5432)
    cluster.db = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{postgres}/postgres")
    cluster.s3 = s3
    wait_until(lambda: _succeeds(lambda: httpx.get(f"{cluster.url}/livez").raise_for_status()), "the API", 60)
    yield cluster


def _succeeds(action) -> bool:  # type: ignore[no-untyped-def]
    try:
        action()
    except Exception:
        return False
    return True


@pytest.fixture
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {cluster.key}"}
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=60) as client:
        yield client


def test_the_hosts_share_no_network_with_this_machine(cluster: Cluster) -> None:
    """The test's subnet is on none of this machine's own interfaces: the hosts can only reach each other."""
    addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert cluster.hosts["api"].address.rsplit(".", 1)[0] + "." not in addresses
    for name in ("api", "a", "b", "inference"):
        inside = subprocess.run(
            cluster.hosts[name].command("ip", "-o", "addr"), capture_output=True, text=True, check=True
        ).stdout
        assert cluster.hosts[name].address in inside


def test_a_job_started_on_one_host_resumes_on_another_and_is_served_from_a_third(
    cluster: Cluster, http: httpx.Client
) -> None:
    training = upload(http, chat_jsonl(40))["id"]
    worker = [sys.executable, "-m", "app.cli", "worker"]
    host_a = cluster.start("a", *worker, log="worker.log")
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training, **HOSTS_JOB))
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint in the store", 300)
    os.kill(host_a.pid, signal.SIGKILL)
    host_a.wait()
    wait_until(lambda: not training_processes(job_id), "the run died with its worker", 30)
    last = max(checkpoint_steps(http, job_id))

    cluster.start("b", *worker, log="worker.log")
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job

    # Nothing lost: b went on from a's last checkpoint, and a's log (up to its last heartbeat) is kept.
    events = all_events(http, job_id)
    resumed = [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming from")]
    assert resumed == [last]
    steps = {e["data"]["step"] for e in events if is_training_step(e)}
    assert steps == set(range(1, TOTAL_STEPS + 1)), "every step trained, before the kill or after"
    kept = http.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params={"attempt": 1}).content
    written = (cluster.folder / "a" / "spool" / "logs" / job_id / "attempt-1.log").read_bytes()
    assert b"Training on 40 examples" in kept and written.startswith(kept), "a's log, as of its last sync"
    # Nothing run twice: one model, whose adapter is the second attempt's.
    model = job["fine_tuned_model"]
    assert cluster.sql("SELECT storage_key FROM models WHERE job_id = :j", j=job_id) == [
        (f"adapters/{job_id}/attempt-2.tar.gz",)
    ]
    # b read the checkpoint (both archives) and the base model from the store, into its own folder.
    s3_log = (cluster.folder / "services" / "s3.log").read_text()
    assert s3_log.count(f"GET /{BUCKET}/cluster/checkpoints/{job_id}/attempt-1/step-{last}.") == 2
    b_cache = cluster.folder / "b" / "cache" / "artifacts"
    assert list(b_cache.glob("base-models/tiny-llama/*/model.safetensors"))
    assert not list(b_cache.glob("checkpoints/**/step-*")), "the unpacked checkpoint's copies are gone"

    adapter = http.get(f"/v1/models/{model}/adapter")
    assert adapter.status_code == 200, adapter.text
    stored = f"cluster/adapters/{job_id}/attempt-2.tar.gz"
    head = cluster.s3.head_object(Bucket=BUCKET, Key=stored)
    assert hashlib.sha256(adapter.content).hexdigest() == head["Metadata"]["sha256"]

    serving = [sys.executable, "-m", "worker.serving", "--host", cluster.hosts["inference"].address]
    cluster.start("inference", *serving, "--port", str(INFERENCE_PORT), log="inference.log")
    wait_until(lambda: _inference_ready(cluster.url), "the inference server", 120)
    sdk = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.key, max_retries=0)
    reply = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    merged = http.get(f"/v1/models/{model}/merged", timeout=300)
    assert merged.status_code == 200, merged.text
    with tarfile.open(fileobj=io.BytesIO(merged.content), mode="r:gz") as archive:
        assert "model.safetensors" in {Path(name).name for name in archive.getnames()}
    served_from = cluster.folder / "inference" / "cache" / "artifacts"
    assert list(served_from.glob("base-models/tiny-llama/*/model.safetensors")), "its own copy of the base"
    assert not any((cluster.folder / host / "artifacts").exists() for host in ("api", "a", "b", "inference"))


def _inference_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=3).json()["checks"].get("inference") == "ok"
    except (httpx.HTTPError, ValueError, KeyError):
        return False
