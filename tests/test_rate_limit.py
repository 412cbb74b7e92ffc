"""Rate limit per API key: 429 with Retry-After in OpenAI's envelope, from a real API server process."""

import os
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.ratelimit import RateLimiter
from tests.conftest import make_key
from tests.helpers import api_process

LIMIT = 5


@pytest.fixture(scope="module")
def limited_server(database: str) -> Iterator[str]:
    """An API process alone (no worker needed), allowing 5 requests a minute per key."""
    env = os.environ | {"TUNEFORGE_RATE_LIMIT_PER_MINUTE": str(LIMIT)}
    with api_process(env, "api-rate-limited.log") as (base_url, _):
        yield base_url


def files(base_url: str, key: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/files", headers={"Authorization": f"Bearer {key}"})


def test_sixth_request_in_a_minute_is_429_with_retry_after(limited_server: str) -> None:
    key = make_key("rate-a")
    assert [files(limited_server, key).status_code for _ in range(LIMIT)] == [200] * LIMIT
    refused = files(limited_server, key)
    assert refused.status_code == 429, refused.text
    retry_after = int(refused.headers["Retry-After"])
    # One request comes back every 60 / LIMIT = 12 s.
    assert 0 < retry_after <= 60 // LIMIT
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert f"{LIMIT} requests per minute" in error["message"]


def test_other_key_is_not_limited(limited_server: str) -> None:
    busy, idle = make_key("rate-b"), make_key("rate-b")
    assert [files(limited_server, busy).status_code for _ in range(LIMIT + 1)][-1] == 429
    assert files(limited_server, idle).status_code == 200


def test_unauthenticated_requests_stay_401(limited_server: str) -> None:
    for _ in range(LIMIT + 1):
        assert httpx.get(f"{limited_server}/v1/files").status_code == 401


def test_openai_sdk_raises_rate_limit_error(limited_server: str) -> None:
    client = openai.OpenAI(base_url=f"{limited_server}/v1", api_key=make_key("rate-c"), max_retries=0)
    for _ in range(LIMIT):
        client.files.list()
    with pytest.raises(openai.RateLimitError) as refused:
        client.files.list()
    assert refused.value.code == "rate_limit_exceeded"
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 60 // LIMIT


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
