"""Chats in flight hold no database connection: the API authenticates in a short session, then forwards."""

import threading
import time

import httpx
from sqlalchemy import Engine, create_engine, text

# Fewer than either pool holds (SQLAlchemy's 5 + 10 overflow): all of them wait at the inference server at
# once, and a connection held per chat shows as a count rather than as requests queued for the pool.
CHATS = 10
# The inference server resolving a chat's model: the query our lock on `models` holds up.
HELD_AT_THE_LOCK = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'SELECT%FROM models%'
"""


def test_chats_in_flight_leave_the_database_pool_idle(
    server: str, api_key: str, http: httpx.Client, database: str
) -> None:
    """Chats held at the inference server keep no connection of the API's pool, and other routes answer.

    The test holds the chats there itself: it locks the `models` table, which the inference server reads
    to resolve each chat's model after the API has authenticated and forwarded it. Postgres then shows
    every chat's query waiting on that lock, so all of them are provably in flight while the pool is read.
    """
    idle = http.get("/readyz").json()["database_pool"]["checked_out"]
    statuses: list[int] = []

    def chat() -> None:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        headers = {"Authorization": f"Bearer {api_key}"}
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=120)
        statuses.append(response.status_code)

    engine = create_engine(database)
    threads = [threading.Thread(target=chat) for _ in range(CHATS)]
    try:
        with engine.connect() as lock:
            lock.execute(text("LOCK TABLE models IN ACCESS EXCLUSIVE MODE"))  # until the rollback below
            for thread in threads:
                thread.start()
            held = wait_for_held_chats(engine, CHATS)
            assert held == CHATS, f"only {held} of {CHATS} chats reached the inference server"
            pool = http.get("/readyz").json()["database_pool"]
            listing = http.get("/v1/fine_tuning/jobs", params={"limit": 5})
            assert statuses == []  # none could have been answered yet
            lock.rollback()
    finally:
        for thread in threads:
            thread.join()
        engine.dispose()
    assert pool["checked_out"] <= idle, pool
    assert listing.status_code == 200, listing.text
    assert statuses == [200] * CHATS, statuses


def wait_for_held_chats(engine: Engine, count: int, timeout_s: float = 120) -> int:
    """How many chats wait on the lock, once `count` do (or once `timeout_s` has passed, failing the test)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as probe:  # a transaction of its own: Postgres shows activity as it is now
            held = probe.execute(text(HELD_AT_THE_LOCK)).scalar_one()
        if held >= count or time.monotonic() > deadline:
            return held
        time.sleep(0.05)
