"""Telemetry: Prometheus /metrics scraped and parsed; JSON log lines that say which request and job they
belong to."""

import json
import os
import sys
from pathlib import Path

import httpx

from app.config import get_settings
from app.services import free_port
from tests.conftest import TEST_HOME
from tests.helpers import (
    api_process,
    chat_jsonl,
    job_body,
    sample,
    scrape,
    serving_process,
    upload,
    wait_for_step,
)


def test_metrics_show_requests_jobs_queues_workers_and_a_running_job(
    http: httpx.Client, finished_job: dict
) -> None:
    training = upload(http, chat_jsonl(40))
    job_id = http.post(
        "/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=50, batch_size=1)
    ).json()["id"]
    try:
        wait_for_step(http, job_id, 3)
        http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}")
        samples = scrape(http)
    finally:
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert sample(samples, "tuneforge_http_requests_total", handler=route, method="GET", status="2xx") >= 1
    assert sample(samples, "tuneforge_http_request_duration_seconds_count", handler=route) >= 1
    assert sample(samples, "tuneforge_jobs", status="succeeded") >= 1
    assert sample(samples, "tuneforge_jobs", status="running") >= 1
    assert sample(samples, "tuneforge_state_readable") == 1
    queue = get_settings().queue
    assert sample(samples, "tuneforge_queue_messages", queue=queue) >= 0  # the broker could say
    assert sample(samples, "tuneforge_queue_oldest_job_age_seconds", queue=queue) >= 0
    assert 0 <= sample(samples, "tuneforge_worker_heartbeat_age_seconds") < get_settings().lease_seconds
    assert sample(samples, "tuneforge_training_tokens_per_second", job_id=job_id) > 0
    assert 0 < sample(samples, "tuneforge_training_step_seconds", job_id=job_id) < 10


def json_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a banner or a library's print: not a log line
            continue
    return lines


def test_json_logs_carry_the_request_project_job_and_attempt(api_key: str, finished_job: dict) -> None:
    """An API of its own logging JSON, behind a metrics token; the tests' worker logs JSON (its output is
    not a terminal) with each run's job and attempt."""
    env = os.environ | {"TUNEFORGE_LOG_FORMAT": "json", "TUNEFORGE_METRICS_TOKEN": "scrape-me"}
    with (
        api_process(env, "api-json.log") as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client,
    ):
        response = client.get(
            f"/v1/fine_tuning/jobs/{finished_job['id']}", headers={"X-Request-ID": "trace-42"}
        )
        assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
        made_up = client.get("/v1/fine_tuning/jobs", headers={"X-Request-ID": "bad id\twith a tab"})
        assert (
            made_up.headers["x-request-id"] != "bad id\twith a tab"
            and len(made_up.headers["x-request-id"]) == 32
        )

        refused = client.get("/metrics")  # the key of a project is not the metrics token
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
        scrape(client, headers={"Authorization": "Bearer scrape-me"})

    lines = json_lines(TEST_HOME / "api-json.log")
    served = [line for line in lines if line.get("request_id") == "trace-42"]
    assert served and all(line["project"] == "alpha" for line in served), lines[-5:]
    assert served[-1]["status"] == 200 and served[-1]["level"] == "INFO"

    runs = [line for line in json_lines(TEST_HOME / "worker.log") if line.get("job_id") == finished_job["id"]]
    assert runs and {line["attempt"] for line in runs if line["attempt"] is not None} == {1}, runs[:3]


def test_the_inference_server_counts_tokens_steps_waits_loads_and_evictions(
    http: httpx.Client, finished_job: dict
) -> None:
    """A server of its own holding one adapter at a time: the job's model, then its checkpoint's (a model
    too), evict each other."""
    checkpoint = http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}/checkpoints").json()["data"][0]
    models = [finished_job["fine_tuned_model"], checkpoint["fine_tuned_model_checkpoint"], "tiny-llama"]
    secret, port = "metrics-test-secret-0123456789", free_port()
    env = os.environ | {"TUNEFORGE_INFERENCE_SECRET": secret, "TUNEFORGE_MAX_ACTIVE_ADAPTERS": "1"}
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {secret}", "X-Tuneforge-Project": "alpha"}
    command = [sys.executable, "-m", "worker.serving", "--port", str(port)]
    with (
        serving_process(command, env, "serving-metrics.log", f"{url}/healthz", "the inference server"),
        httpx.Client(base_url=url, headers=headers, timeout=60) as client,
    ):
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        generated = 0
        for model in models:
            body = {"model": model, "messages": [{"role": "user", "content": "What is 2 plus 2?"}]}
            answer = client.post("/v1/chat/completions", json=body | {"max_tokens": 5, "temperature": 0})
            assert answer.status_code == 200, answer.text
            generated += answer.json()["usage"]["completion_tokens"]
        samples = scrape(client)
    assert sample(samples, "tuneforge_inference_generated_tokens_total") == generated
    assert sample(samples, "tuneforge_inference_queue_wait_seconds_count") == len(models)
    # One decode step per token after each request's first (its prefill's), one row in each.
    assert sample(samples, "tuneforge_inference_batch_rows_count") == generated - len(models)
    assert sample(samples, "tuneforge_inference_batch_rows_sum") == generated - len(models)
    assert sample(samples, "tuneforge_inference_adapter_loads_total") == 2
    assert sample(samples, "tuneforge_inference_adapter_evictions_total") == 1
    route = "/v1/chat/completions"
    assert sample(samples, "tuneforge_inference_http_requests_total", handler=route, status="2xx") == len(
        models
    )
