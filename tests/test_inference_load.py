"""Chats in flight hold no database connection: the API authenticates in a short session, then forwards."""

import threading
import time

import httpx

SLOW_CHATS = 40


def test_slow_completions_leave_the_database_pool_idle(server: str, api_key: str, http: httpx.Client) -> None:
    """While 40 long generations are in flight, the pool stays at its idle level and other routes answer."""
    idle = http.get("/readyz").json()["database_pool"]["checked_out"]
    statuses: list[int] = []

    def chat() -> None:
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 250,
            "temperature": 1.0,
            "seed": 1,
        }
        headers = {"Authorization": f"Bearer {api_key}"}
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=600)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=chat) for _ in range(SLOW_CHATS)]
    for thread in threads:
        thread.start()
    samples = []  # (chats in flight, pool connections checked out, status of a job list)
    # Each chat holds a connection while its key is checked, as the 40 arrive at once; the test samples
    # from the moment that burst is over (the pool back at its idle level) until the last answer.
    settled = None  # chats still in flight when it was
    while any(thread.is_alive() for thread in threads):
        in_flight = sum(thread.is_alive() for thread in threads)
        checked = http.get("/readyz").json()["database_pool"]["checked_out"]
        listing = http.get("/v1/fine_tuning/jobs", params={"limit": 5}).status_code
        if settled is None and checked <= idle:
            settled = in_flight
        elif settled is not None:
            samples.append((in_flight, checked, listing))
        time.sleep(0.05)
    for thread in threads:
        thread.join()

    assert settled is not None, "the pool never went back to its idle level while chats were in flight"
    assert settled >= SLOW_CHATS // 2, f"the pool was busy until only {settled} chats were in flight"
    assert len(samples) >= 3, f"too few samples while chats were in flight: {samples}"
    assert max(checked for _, checked, _ in samples) <= idle + 1, samples
    assert all(status == 200 for *_, status in samples), samples
    assert statuses == [200] * SLOW_CHATS, statuses
