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
            "max_tokens": 120,
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
    # A chat holds a connection only while its key is checked, at its very start: sample after that.
    warm = time.monotonic() + 1.5
    while any(thread.is_alive() for thread in threads):
        in_flight = sum(thread.is_alive() for thread in threads)
        pool = http.get("/readyz").json()["database_pool"]
        listing = http.get("/v1/fine_tuning/jobs", params={"limit": 5}).status_code
        if time.monotonic() > warm:
            samples.append((in_flight, pool["checked_out"], listing))
        time.sleep(0.05)
    for thread in threads:
        thread.join()

    assert len(samples) >= 3, f"too few samples while chats were in flight: {samples}"
    assert max(checked for _, checked, _ in samples) <= idle + 1, samples
    assert all(status == 200 for *_, status in samples), samples
    assert statuses == [200] * SLOW_CHATS, statuses
