"""What the API's speed work must not change, and what it fixed, through a real API process on Postgres.

The figures themselves are in bench/api.py; nothing here is timed.
"""

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.db.session import session_scope
from app.keys import service as key_service
from app.queue import make_celery
from tests.helpers import api_process

# More than the API's thread pool (40) and its database pool (5 + 10 overflow) together.
CONCURRENT = 200


@pytest.fixture(scope="module")
def api(database: str) -> Iterator[str]:
    """An API process alone (no worker needed)."""
    with api_process(os.environ.copy(), "api-speed-behaviour.log") as (url, _):
        yield url


async def _get_all(url: str, path: str, key: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    headers = {"Authorization": f"Bearer {key}"}
    # The timeout only ends a stuck run (the pool's own, 30 s, turns a stall into 500s), never decides.
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.get(path) for _ in range(count)))


def test_more_requests_at_once_than_threads_and_connections_are_all_served(api: str, api_key: str) -> None:
    """Each request's session holds a pooled connection while FastAPI hands its route, then the check of
    its response, to worker threads: with every thread waiting for a connection that such a request held,
    requests failed with 500 once the pool's timeout passed."""
    responses = asyncio.run(_get_all(api, "/v1/models", api_key, CONCURRENT))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * CONCURRENT, sorted(set(statuses))


def test_a_revoked_key_is_refused_on_its_next_request(api: str) -> None:
    """No cache stands between a key and its row: revoking a key stops it at once."""
    with session_scope() as session:
        key, token = key_service.create_key(session, project="speed")
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):  # as a client that polls does
        assert httpx.get(f"{api}/v1/fine_tuning/jobs", headers=headers).status_code == 200
    with session_scope() as session:
        assert key_service.revoke_key(session, key_id=key.id)
    response = httpx.get(f"{api}/v1/fine_tuning/jobs", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_an_idle_worker_on_the_embedded_broker_looks_for_messages_every_tenth_of_a_second(
    tmp_path: Path,
) -> None:
    """kombu's filesystem transport cannot wake a worker: a job waits for the worker's next look at the
    queue's folder, by default a second away."""
    celery = make_celery(Settings(home=tmp_path, broker_url=""))
    with celery.connection_for_read() as connection:
        assert connection.transport_cls == "filesystem"
        assert connection.transport.polling_interval <= 0.1
