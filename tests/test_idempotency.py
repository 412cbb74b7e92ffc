"""Idempotency-Key on job creation and file upload, through real HTTP on Postgres."""

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
import redis
from sqlalchemy import update

from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import IdempotencyKey
from app.idempotency import MAX_LENGTH
from tests.helpers import api_process, chat_jsonl, job_body, job_messages, upload

JOBS = "/v1/fine_tuning/jobs"


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def post_job(http: httpx.Client, body: dict, key: str) -> httpx.Response:
    return http.post(JOBS, json=body, headers={"Idempotency-Key": key})


def post_file(http: httpx.Client, data: bytes, key: str, filename: str = "train.jsonl") -> httpx.Response:
    return http.post(
        "/v1/files",
        files={"file": (filename, data)},
        data={"purpose": "fine-tune"},
        headers={"Idempotency-Key": key},
    )


def jobs_tagged(http: httpx.Client, tag: str) -> list[dict]:
    jobs = http.get(JOBS, params={"limit": 100}).json()["data"]
    return [j for j in jobs if (j["metadata"] or {}).get("tag") == tag]


def cancel_all(http: httpx.Client, jobs: list[dict]) -> None:
    """Cancel right away, so the test worker does not spend time training them."""
    for job in jobs:
        http.post(f"{JOBS}/{job['id']}/cancel")


@pytest.fixture(scope="module")
def training_file(http: httpx.Client) -> str:
    return upload(http, chat_jsonl(8))["id"]


def tagged_body(training_file: str) -> tuple[dict, str]:
    tag = uuid.uuid4().hex
    return job_body(training_file) | {"metadata": {"tag": tag}}, tag


def test_same_key_same_body_returns_the_same_job(http: httpx.Client, training_file: str) -> None:
    body, tag = tagged_body(training_file)
    key = new_key()
    first = post_job(http, body, key)
    assert first.status_code == 200, first.text
    # Key order does not make another request.
    again = post_job(http, dict(reversed(list(body.items()))), key)
    cancel_all(http, [first.json()])
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert [j["id"] for j in jobs_tagged(http, tag)] == [first.json()["id"]]


def test_a_replay_sends_no_second_message(api_key: str, training_file: str) -> None:
    """A replay returns the job and enqueues nothing: seen on a queue of its own that no worker reads."""
    queue = f"replays-{uuid.uuid4().hex[:8]}"
    body, _ = tagged_body(training_file)
    key = new_key()
    with (
        api_process(os.environ | {"TUNEFORGE_QUEUE": queue}, "api-replays.log") as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client,
    ):
        first = post_job(client, body, key)
        assert first.status_code == 200, first.text
        job_id = first.json()["id"]
        try:
            assert job_messages(queue) == [job_id]  # what a create sends
            for _ in range(2):
                again = post_job(client, body, key)
                assert again.status_code == 200, again.text
                assert again.json()["id"] == job_id and again.headers["Idempotent-Replayed"] == "true"
            assert job_messages(queue) == [job_id]
        finally:
            cancel_all(client, [first.json()])
            redis.Redis.from_url(os.environ["TUNEFORGE_BROKER_URL"]).delete(queue)


def test_same_key_other_body_is_400_naming_the_difference(http: httpx.Client, training_file: str) -> None:
    body, tag = tagged_body(training_file)
    key = new_key()
    first = post_job(http, body, key)
    assert first.status_code == 200, first.text
    cancel_all(http, [first.json()])
    error = error_of(post_job(http, body | {"seed": 8}, key), 400)
    assert error["code"] == "idempotency_key_reused"
    assert error["param"] == "Idempotency-Key"
    assert "seed" in error["message"] and "metadata" not in error["message"]
    assert first.json()["id"] in error["message"]
    assert len(jobs_tagged(http, tag)) == 1


def test_key_of_another_project_is_independent(
    http: httpx.Client, other_http: httpx.Client, training_file: str
) -> None:
    key = new_key()
    body, _ = tagged_body(training_file)
    mine = post_job(http, body, key)
    assert mine.status_code == 200, mine.text
    cancel_all(http, [mine.json()])
    other_file = upload(other_http, chat_jsonl(8))["id"]
    theirs = post_job(other_http, body | {"training_file": other_file}, key)
    assert theirs.status_code == 200, theirs.text
    cancel_all(other_http, [theirs.json()])
    assert theirs.json()["id"] != mine.json()["id"]


def test_failed_job_request_does_not_use_up_the_key(http: httpx.Client, training_file: str) -> None:
    key = new_key()
    body, tag = tagged_body(training_file)
    error_of(post_job(http, body | {"model": "no-such-model"}, key), 404)
    created = post_job(http, body, key)
    assert created.status_code == 200, created.text
    cancel_all(http, [created.json()])
    assert len(jobs_tagged(http, tag)) == 1


def test_concurrent_job_requests_create_one_job(
    server: str, api_key: str, http: httpx.Client, training_file: str
) -> None:
    body, tag = tagged_body(training_file)
    key = new_key()

    def create(_: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": key}
        return httpx.post(f"{server}{JOBS}", json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(create, range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    jobs = jobs_tagged(http, tag)
    cancel_all(http, jobs)
    assert {r.json()["id"] for r in responses} == {j["id"] for j in jobs}
    assert len(jobs) == 1


def test_same_key_same_upload_returns_the_same_file(http: httpx.Client) -> None:
    key = new_key()
    data = chat_jsonl(4, offset=1000)
    first = post_file(http, data, key, "same.jsonl")
    again = post_file(http, data, key, "same.jsonl")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    listed = [f for f in http.get("/v1/files").json()["data"] if f["id"] == first.json()["id"]]
    assert len(listed) == 1


def test_same_key_other_upload_is_400(http: httpx.Client) -> None:
    key = new_key()
    assert post_file(http, chat_jsonl(4), key, "a.jsonl").status_code == 200
    error = error_of(post_file(http, chat_jsonl(5), key, "a.jsonl"), 400)
    assert error["code"] == "idempotency_key_reused"
    assert "content" in error["message"] and "filename" not in error["message"]
    error = error_of(post_file(http, chat_jsonl(4), key, "b.jsonl"), 400)
    assert "filename" in error["message"] and "content" not in error["message"]


def test_key_of_a_job_cannot_upload_a_file(http: httpx.Client, training_file: str) -> None:
    key = new_key()
    body, _ = tagged_body(training_file)
    job = post_job(http, body, key)
    assert job.status_code == 200, job.text
    cancel_all(http, [job.json()])
    error = error_of(post_file(http, chat_jsonl(4), key), 400)
    assert error["code"] == "idempotency_key_reused" and job.json()["id"] in error["message"]


def test_rejected_upload_leaves_the_key_free(http: httpx.Client) -> None:
    key = new_key()
    bad = post_file(http, b'{"messages": [{"role": "user", "content": "hi"}]}\n', key)
    assert error_of(bad, 400)["code"] == "missing_assistant"
    good = post_file(http, chat_jsonl(4, offset=2000), key)
    assert good.status_code == 200, good.text
    assert post_file(http, chat_jsonl(4, offset=2000), key).json()["id"] == good.json()["id"]


def test_concurrent_uploads_store_one_file(server: str, api_key: str, http: httpx.Client) -> None:
    key = new_key()
    filename = f"race-{uuid.uuid4().hex}.jsonl"

    def create(_: int) -> httpx.Response:
        return httpx.post(
            f"{server}/v1/files",
            files={"file": (filename, chat_jsonl(50))},
            data={"purpose": "fine-tune"},
            headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": key},
            timeout=30,
        )

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(create, range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    stored = [f["id"] for f in http.get("/v1/files").json()["data"] if f["filename"] == filename]
    assert len(stored) == 1
    assert {r.json()["id"] for r in responses} == set(stored)


@pytest.mark.parametrize("key", ["", "k" * (MAX_LENGTH + 1)])
def test_invalid_keys_are_400(http: httpx.Client, training_file: str, key: str) -> None:
    job = error_of(post_job(http, job_body(training_file), key), 400)
    upload_error = error_of(post_file(http, chat_jsonl(2), key), 400)
    for error in (job, upload_error):
        assert error["param"] == "Idempotency-Key"
        assert error["code"] == "invalid_idempotency_key"
        assert "Idempotency-Key" in error["message"]


def test_longest_key_is_accepted(http: httpx.Client) -> None:
    key = "k" * MAX_LENGTH
    assert post_file(http, chat_jsonl(2, offset=3000), key).status_code == 200


def age_key(key: str, hours: float) -> int:
    """Make a key's row `hours` older, as if sent that long ago; returns the rows changed."""
    with session_scope() as session:
        aged = update(IdempotencyKey).where(IdempotencyKey.key == key)
        return session.execute(
            aged.values(created_at=IdempotencyKey.created_at - timedelta(hours=hours))
        ).rowcount


def key_rows(key: str) -> int:
    with session_scope() as session:
        return session.query(IdempotencyKey).filter_by(key=key).count()


def test_a_key_older_than_a_day_is_a_new_key(http: httpx.Client) -> None:
    kept = get_settings().idempotency_key_hours
    key = new_key()
    first = post_file(http, chat_jsonl(2), key)
    assert first.status_code == 200, first.text
    assert age_key(key, kept - 1) == 1
    assert post_file(http, chat_jsonl(3), key).status_code == 400  # an hour short: still remembered
    age_key(key, 2)
    again = post_file(http, chat_jsonl(3), key)  # an hour past: another upload under the same key is new
    assert again.status_code == 200, again.text
    assert again.json()["id"] != first.json()["id"] and "Idempotent-Replayed" not in again.headers
    replay = post_file(http, chat_jsonl(3), key)
    assert replay.json()["id"] == again.json()["id"] and replay.headers["Idempotent-Replayed"] == "true"


def test_the_reconciler_deletes_expired_keys(http: httpx.Client) -> None:
    fresh, expired = new_key(), new_key()
    for key in (fresh, expired):
        assert post_file(http, chat_jsonl(2), key).status_code == 200
    age_key(expired, get_settings().idempotency_key_hours + 1)
    deadline = time.monotonic() + 15  # the tests' reconciler runs every second
    while key_rows(expired):
        assert time.monotonic() < deadline, "the expired key is still stored"
        time.sleep(0.2)
    assert key_rows(fresh) == 1
