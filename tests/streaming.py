"""Watching a job live, as a client would: its event stream (with disconnects) and its log, followed.

Shared by tests/test_streams.py (Postgres, notifications) and tests/test_embedded.py (SQLite, re-reads).
"""

import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from httpx_sse import connect_sse
from sqlalchemy import create_engine, select

from app.db.tables import JobEvent
from tests.helpers import all_events, chat_jsonl, job_body, upload, wait_for_status

# Tuneforge's lines in a run's log start with their time (app/logs.py CONSOLE_FORMAT).
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


def watched_job(http: httpx.Client) -> str:
    """A job of 64 short steps: long enough to disconnect from mid-run three times."""
    training = upload(http, chat_jsonl(16))
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=4, batch_size=1))
    assert response.status_code == 200, response.text
    return response.json()["id"]


@dataclass
class Watched:
    events: list[dict] = field(default_factory=list)  # as received, over every connection
    statuses_at_disconnect: list[str] = field(default_factory=list)
    received_at: dict[str, float] = field(default_factory=dict)  # event id -> when it arrived (epoch s)
    log_lines: list[tuple[float, str]] = field(default_factory=list)  # (when it arrived, line)


def follow_log(http: httpx.Client, job_id: str, watched: Watched) -> None:
    """`GET /logs?follow=true` from before the run starts until the server ends the stream."""
    with http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/logs", params={"follow": "true"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            watched.log_lines.append((time.time(), line))


def stream_events(http: httpx.Client, job_id: str, watched: Watched, disconnect_after: list[int]) -> None:
    """The event stream, dropped after each count in `disconnect_after` events and resumed from the last
    id received with `Last-Event-ID`; the last connection runs until the server ends the stream."""
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    for limit in [*disconnect_after, None]:
        headers = {"Last-Event-ID": watched.events[-1]["id"]} if watched.events else {}
        with connect_sse(http, "GET", url, params={"stream": "true"}, headers=headers) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            received = 0
            for sse in source.iter_sse():
                event = sse.json()
                assert sse.id == event["id"]
                watched.received_at[event["id"]] = time.time()
                watched.events.append(event)
                received += 1
                if limit is not None and received == limit:
                    break
        if limit is not None:
            watched.statuses_at_disconnect.append(http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


def watch(http: httpx.Client, job_id: str) -> Watched:
    """Follow the log in a thread while streaming the events with three disconnects, both to the end."""
    watched = Watched()
    follower = threading.Thread(target=follow_log, args=(http, job_id, watched))
    follower.start()
    try:
        stream_events(http, job_id, watched, disconnect_after=[3, 3, 3])
    finally:
        follower.join(timeout=120)
    assert not follower.is_alive(), "the log follower never ended"
    return watched


def log_delays(watched: Watched) -> list[float]:
    """Seconds from each of Tuneforge's timed lines being written to the follower receiving it."""
    delays = []
    for arrived, line in watched.log_lines:
        try:
            printed = datetime.strptime(line[:23], LOG_TIME_FORMAT).timestamp()
        except ValueError:  # a library's line: untimed
            continue
        delays.append(arrived - printed)
    return delays


def event_delays(database_url: str, job_id: str, watched: Watched) -> list[float]:
    """Seconds from each event being written (its row's time) to the stream delivering it."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(JobEvent.seq, JobEvent.created_at).where(JobEvent.job_id == job_id)
            )
            written = {f"ftevent-{seq}": created.timestamp() for seq, created in rows}
    finally:
        engine.dispose()
    return [watched.received_at[id] - written[id] for id in watched.received_at]


def percentiles(delays: list[float]) -> str:
    cuts = statistics.quantiles(delays, n=100)
    return f"p50 {statistics.median(delays) * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms over {len(delays)}"


def check_watched(http: httpx.Client, job_id: str, watched: Watched) -> None:
    """The stream gave exactly the paged list's events, in order, though dropped mid-run three times;
    it ended after the final status; the log follower saw each timed line within a second, and all of
    what the log holds."""
    job = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    assert watched.statuses_at_disconnect == ["running"] * 3, "the disconnects were not mid-run"
    listed = all_events(http, job_id)
    assert [e["id"] for e in watched.events] == [e["id"] for e in listed]
    assert watched.events == listed
    assert watched.events[-1]["message"] == "The job has successfully completed."

    delays = log_delays(watched)
    steps = [line for _, line in watched.log_lines if "training loss=" in line]
    trained = [e for e in listed if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert len(steps) == len(trained), "a step's log line is missing"
    # stdout is in the log too, in the order printed: Trainer prints each step's figures there just after
    # Tuneforge logs the step to stderr.
    lines = [line for _, line in watched.log_lines]
    printed = [i for i, line in enumerate(lines) if line.startswith("{'loss'")]
    assert len(printed) == len(steps) and all("training loss=" in lines[i - 1] for i in printed), lines
    assert delays and max(delays) < 1.0, f"log lines reached the follower {max(delays):.2f} s late"
    stored = http.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params={"attempt": 1})
    assert stored.status_code == 200 and stored.headers["content-type"].startswith("text/plain")
    assert [line for _, line in watched.log_lines] == stored.text.splitlines()
    print(f"log line delay: {percentiles(delays)} lines")
