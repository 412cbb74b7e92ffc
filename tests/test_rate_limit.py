"""Rate limit per API key: 429 with Retry-After in OpenAI's envelope, from real API server processes.

Two servers. One allows a key one request a minute: a served request leaves the key's bucket empty for
60 s, so the request sent right after it is refused; no timing decides that short of a 60 s stall between
two requests (the in-process tests at the end drive the bucket's arithmetic with a clock of their own).
The other allows 60 a minute, so that the openai SDK's wait for a token (Retry-After: 1) is short.
"""

import os
import re
import time
from collections.abc import Iterator

import httpx
import httpx2
import openai
import pytest

from app.ratelimit import RateLimiter
from tests.conftest import make_key
from tests.helpers import api_process

# The routes that take no API key, and so no rate limit: probes and the API's own description.
# Prometheus scrapes /metrics with TUNEFORGE_METRICS_TOKEN, not an API key (open when that is unset).
OPS_ROUTES = {
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
}


def limited_api(per_minute: int) -> Iterator[str]:
    """An API process alone (no worker needed), allowing each key `per_minute` requests a minute."""
    env = os.environ | {"TUNEFORGE_RATE_LIMIT_PER_MINUTE": str(per_minute)}
    with api_process(env, f"api-{per_minute}-a-minute.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def one_a_minute(database: str) -> Iterator[str]:
    yield from limited_api(1)


@pytest.fixture(scope="module")
def sixty_a_minute(database: str) -> Iterator[str]:
    yield from limited_api(60)


def files(base_url: str, key: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/files", headers={"Authorization": f"Bearer {key}"})


def spent_key(base_url: str, project: str) -> str:
    """A new key whose one request a minute is used up, by a request that was served."""
    key = make_key(project)
    assert files(base_url, key).status_code == 200
    return key


def test_a_request_past_the_limit_is_429_with_retry_after(one_a_minute: str) -> None:
    refused = files(one_a_minute, spent_key(one_a_minute, "rate-a"))
    assert refused.status_code == 429, refused.text
    # The bucket just gave its one token; it is back in 60 s, less what has passed since.
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "1 requests per minute" in error["message"]


def test_other_key_is_not_limited(one_a_minute: str) -> None:
    busy = spent_key(one_a_minute, "rate-b")
    assert files(one_a_minute, busy).status_code == 429
    assert files(one_a_minute, make_key("rate-b")).status_code == 200


def test_unauthenticated_requests_stay_401(one_a_minute: str) -> None:
    for _ in range(3):
        assert httpx.get(f"{one_a_minute}/v1/files").status_code == 401


def test_openai_sdk_raises_rate_limit_error(one_a_minute: str) -> None:
    client = openai.OpenAI(base_url=f"{one_a_minute}/v1", api_key=make_key("rate-c"), max_retries=0)
    client.files.list()
    with pytest.raises(openai.RateLimitError) as refused:
        client.files.list()
    assert refused.value.code == "rate_limit_exceeded"
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 60


def served_operations(base_url: str) -> set[tuple[str, str]]:
    """Every (method, path) the API serves, from its OpenAPI schema, with each path parameter filled in."""
    schema = httpx.get(f"{base_url}/openapi.json").json()
    return {
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, operations in schema["paths"].items()
        for method in operations
    } | {("GET", "/openapi.json"), ("GET", "/docs")}


def test_every_authenticated_route_is_rate_limited(one_a_minute: str) -> None:
    """Each route that needs a key answers 429 to a key whose bucket is empty; the others need no key."""
    operations = served_operations(one_a_minute)
    authenticated = {
        (method, path)
        for method, path in operations
        if httpx.request(method, f"{one_a_minute}{path}").status_code == 401
    }
    assert operations - authenticated == OPS_ROUTES
    assert all(path.startswith("/v1/") for _, path in authenticated)
    unlimited = {}
    for method, path in sorted(authenticated):
        key = spent_key(one_a_minute, "rate-routes")
        response = httpx.request(method, f"{one_a_minute}{path}", headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 429:
            unlimited[f"{method} {path}"] = response.status_code
    assert not unlimited, f"routes that served a key with an empty bucket: {unlimited}"


def test_ops_routes_are_not_rate_limited(one_a_minute: str) -> None:
    headers = {"Authorization": f"Bearer {spent_key(one_a_minute, 'rate-ops')}"}
    for method, path in sorted(OPS_ROUTES):
        for _ in range(2):
            response = httpx.request(method, f"{one_a_minute}{path}", headers=headers)
            assert response.status_code == 200, (path, response.text)


def test_openai_sdk_waits_retry_after_and_retries(sixty_a_minute: str) -> None:
    """The SDK, left to retry, meets a 429, waits its Retry-After, and its retry is served.

    The SDK's own calls drain the key's 60-request bucket, far faster than it refills (one a second);
    an event hook on its HTTP client records what it sent and what came back, and when.
    """
    sent: list[float] = []
    received: list[tuple[float, httpx2.Response]] = []
    hooks = {
        "request": [lambda request: sent.append(time.monotonic())],
        "response": [lambda response: received.append((time.monotonic(), response))],
    }
    client = openai.OpenAI(
        base_url=f"{sixty_a_minute}/v1",
        api_key=make_key("rate-sdk"),
        max_retries=1,  # a second 429 would raise RateLimitError
        http_client=httpx2.Client(event_hooks=hooks),
    )
    for _ in range(600):  # ends at the first call that met the empty bucket
        client.files.list()
        if any(response.status_code == 429 for _, response in received):
            break
    statuses = [response.status_code for _, response in received]
    assert statuses[-2:] == [429, 200] and statuses.count(429) == 1, statuses
    refused_at, refused = received[-2]
    assert refused.headers["retry-after"] == "1"
    assert sent[-1] - refused_at >= 1, "the SDK retried before the Retry-After had passed"


def test_bucket_refills_at_the_limit_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one request a second, bursts of 60
    assert [limiter.acquire("k") for _ in range(60)] == [0] * 60
    assert limiter.acquire("k") == 1
    now[0] += 0.5
    assert limiter.acquire("k") == 1  # half a token back: still wait, and say 1 s, never 0
    now[0] += 0.5
    assert limiter.acquire("k") == 0
    assert limiter.acquire("other") == 0


def test_retry_after_is_enough_to_succeed() -> None:
    now = [0.0]
    limiter = RateLimiter(5, clock=lambda: now[0])
    for _ in range(5):
        limiter.acquire("k")
    wait = limiter.acquire("k")
    assert wait == 12
    now[0] += wait - 1
    assert limiter.acquire("k") > 0
    now[0] += 1
    assert limiter.acquire("k") == 0


def test_zero_disables_the_limit() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.acquire("k") == 0 for _ in range(10_000))
