"""Routing and fairness on the shared stack, whose API knows two worker classes (tests/conftest.py): the
shared worker's queue (one device, kind and memory unstated) and a "big" queue (2 devices of kind Sim,
8 GB each) that only the test that needs it runs a worker for.

A job goes to the first class that fits its resources, is refused with 400 when none does, and waits with
an event that says why while no live worker fits. A worker takes the best job it can hold: highest
priority, then the project that started a job least recently, then the oldest; a project at
TUNEFORGE_PROJECT_MAX_RUNNING waits.
"""

import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from app.db.session import session_scope
from app.jobs import routing
from tests.conftest import BIG_QUEUE, BIG_WORKER, BIG_WORKER_ENV, QUEUE, TEST_HOME, make_key
from tests.helpers import chat_jsonl, job_body, upload, wait_for_status


def sql(query: str, **params: object) -> list:
    with session_scope() as session:
        result = session.execute(text(query), params)
        rows = list(result) if result.returns_rows else []
        session.commit()
        return rows


def create(client: httpx.Client, training_file: str, **extra: object) -> dict:
    response = client.post("/v1/fine_tuning/jobs", json=job_body(training_file) | extra)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def client_of(server: str) -> Iterator:
    """HTTP clients of fresh projects, which have never started a job; their queued jobs are cancelled."""
    clients: list[httpx.Client] = []

    def client(project: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {make_key(project)}"}
        clients.append(httpx.Client(base_url=server, headers=headers, timeout=30))
        return clients[-1]

    yield client
    for each in clients:
        for job in each.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]:
            if job["status"] in ("queued", "running"):
                each.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        each.close()


def test_a_job_no_worker_class_fits_is_refused_saying_what_each_lacks(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(8))["id"]
    for resources, lack in [
        ({"gpus": 3}, "it has 2 device(s), the job asks for 3"),
        ({"gpu_kind": "H100"}, "its GPUs are Sim, the job asks for H100"),
        ({"gpu_kind": "sim", "min_memory_gb": 64}, "it has 8.0 GB per device, the job asks for 64"),
    ]:
        response = http.post("/v1/fine_tuning/jobs", json=job_body(training) | {"resources": resources})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("resources", "no_worker_fits"), error
        assert f"'{BIG_QUEUE}': {lack}" in error["message"] and f"'{QUEUE}'" in error["message"], error
    bad = http.post("/v1/fine_tuning/jobs", json=job_body(training) | {"resources": {"gpus": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "resources.gpus", bad.text
    dpo = {
        "model": "tiny-llama",
        "training_file": training,
        "method": {"type": "dpo"},
        "resources": {"gpus": 2},
    }
    refused = http.post("/v1/fine_tuning/jobs", json=dpo)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "resources.gpus", refused.text
    assert "supervised" in refused.json()["error"]["message"]


def test_a_job_only_an_idle_class_fits_waits_on_its_queue_and_says_why(client_of) -> None:  # type: ignore[no-untyped-def]
    client = client_of("routing-wait")
    training = upload(client, chat_jsonl(8))["id"]
    job = create(client, training, resources={"gpus": 2}, priority=3)
    assert job["resources"] == {"gpus": 2, "gpu_kind": None, "min_memory_gb": None} and job["priority"] == 3
    assert sql("SELECT queue FROM jobs WHERE id = :j", j=job["id"]) == [(BIG_QUEUE,)]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    waiting = [e for e in events if e["level"] == "warning"]
    assert [e["message"] for e in waiting] == [
        f"No worker of queue '{BIG_QUEUE}' is running; the job starts when one does."
    ]
    plain = create(client, training)  # no resources: the shared worker's class, first in the list
    assert sql("SELECT queue FROM jobs WHERE id = :j", j=plain["id"]) == [(QUEUE,)]


def test_the_worker_takes_the_best_job_it_can_hold(client_of) -> None:  # type: ignore[no-untyped-def]
    """Priority first, then the project that started a job least recently, then the oldest; a project at
    its running limit waits; a job needing more than the worker has is never taken. Read straight from
    `routing.claimable`, on jobs of the big queue, where no worker takes them."""
    flood, calm = client_of("routing-flood"), client_of("routing-calm")
    training, other = upload(flood, chat_jsonl(8))["id"], upload(calm, chat_jsonl(8))["id"]
    sim = {"gpu_kind": "sim"}
    a1, a2 = (create(flood, training, resources=sim)["id"] for _ in range(2))
    b1 = create(calm, other, resources=sim)["id"]
    urgent = create(flood, training, resources=sim, priority=5)["id"]
    wide = create(calm, other, resources={"gpus": 2})["id"]

    def best(offer: dict = BIG_WORKER, max_running: int | None = None) -> list[str]:
        with session_scope() as session:
            ours = {a1, a2, b1, urgent, wide}
            queued = routing.claimable(session, queue=BIG_QUEUE, offer=offer, max_running=max_running)
            return [job for job in queued if job in ours]

    assert best() == [urgent, a1, a2, b1, wide], "priority, then the oldest: neither project has started"
    sql("UPDATE jobs SET status = 'running', started_at = now() WHERE id = :j", j=urgent)
    assert best() == [b1, wide, a1, a2], "the project that has not started a job goes first"
    assert best(max_running=1) == [b1, wide], "a project at its running limit waits"
    assert best(BIG_WORKER | {"gpus": 1}) == [b1, a1, a2], "a 1-device worker never gets the 2-device job"
    sql("UPDATE jobs SET status = 'queued' WHERE id = :j", j=urgent)


def test_a_flooding_project_does_not_starve_another(client_of, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One worker, started after project `flood` queued three jobs and project `calm` one: calm's job
    runs second, not last. The worker announces what it has while it runs, and removes its row on exit."""
    flood, calm = client_of("fair-flood"), client_of("fair-calm")
    training, other = upload(flood, chat_jsonl(16))["id"], upload(calm, chat_jsonl(16))["id"]
    sim = {"gpu_kind": "Sim"}
    floods = [create(flood, training, resources=sim)["id"] for _ in range(3)]
    calm_job = create(calm, other, resources=sim)["id"]

    env = os.environ | BIG_WORKER_ENV
    with (TEST_HOME / "fair-worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log, stderr=log
        )
    try:
        for job_id in [*floods, calm_job]:
            client = calm if job_id == calm_job else flood
            assert (
                wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300)["status"] == "succeeded"
            )
        rows = sql("SELECT gpus, gpu_kind, memory_gb, seen_at > now() - interval '30 seconds' FROM workers "
                   "WHERE id = :w", w=f"{socket.gethostname()}:{worker.pid}")  # fmt: skip
        assert rows == [(2, "Sim", 8.0, True)]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    started = sql("SELECT id FROM jobs WHERE id = ANY(:ids) ORDER BY started_at", ids=[*floods, calm_job])
    assert [job_id for (job_id,) in started] == [floods[0], calm_job, floods[1], floods[2]]
    assert sql("SELECT count(*) FROM workers WHERE id = :w", w=f"{socket.gethostname()}:{worker.pid}") == [
        (0,)
    ]


def test_the_estimate_shards_full_fine_tuning_on_gpus_and_replicates_adapters(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(8))["id"]
    body = job_body(training) | {"methods": ["full", "lora"], "resources": {"gpus": 4}}
    response = http.post("/v1/fine_tuning/estimate", json=body)
    assert response.status_code == 200, response.text
    full, lora = response.json()["estimates"]
    assert full["gpus"] == lora["gpus"] == 4
    for part in ("weights", "gradients", "optimizer_states"):
        assert full["per_gpu"][part] == math.ceil(full["bytes"][part] / 4), part
    assert full["per_gpu"]["activations"] == full["bytes"]["activations"], "each device has its micro-batch"
    assert lora["per_gpu"] == lora["bytes"], "DDP keeps a whole copy on each device"
    on_cpu = http.post("/v1/fine_tuning/estimate", json=body | {"device": "cpu"}).json()["estimates"][0]
    assert on_cpu["per_gpu"] == on_cpu["bytes"], "accelerate has no FSDP for CPU ranks: a copy each"
