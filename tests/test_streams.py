"""Live streams on Postgres: job events as Server-Sent Events (woken by LISTEN/NOTIFY), a run's log followed.

The same checks run on the embedded default (SQLite, streams re-read) in tests/test_embedded.py.
"""

import os

import httpx
from httpx_sse import connect_sse

from app.db.session import session_scope
from app.jobs import service as job_service
from app.jobs.schemas import JobCreate
from tests.conftest import POSTGRES_URL
from tests.helpers import all_events, api_process, chat_jsonl, job_body, upload
from tests.streaming import check_watched, event_delays, percentiles, watch, watched_job


def test_a_client_that_drops_the_stream_three_times_misses_nothing(http: httpx.Client) -> None:
    job_id = watched_job(http)
    watched = watch(http, job_id)
    check_watched(http, job_id, watched)
    delays = event_delays(POSTGRES_URL, job_id, watched)
    print(f"event delay on Postgres: {percentiles(delays)} events")
    assert max(delays) < 1.0, f"an event reached the stream {max(delays):.2f} s after it was written"


def test_the_stream_of_a_finished_job_replays_it_and_ends(http: httpx.Client, finished_job: dict) -> None:
    url = f"/v1/fine_tuning/jobs/{finished_job['id']}/events"
    with connect_sse(http, "GET", url, params={"stream": "true"}) as source:
        streamed = [sse.json() for sse in source.iter_sse()]
    assert streamed == all_events(http, finished_job["id"])
    middle = streamed[len(streamed) // 2]["id"]
    for resume in ({"headers": {"Last-Event-ID": middle}}, {"params": {"stream": "true", "after": middle}}):
        kwargs = {"params": {"stream": "true"}} | resume
        with connect_sse(http, "GET", url, **kwargs) as source:  # type: ignore[arg-type]
            rest = [sse.json() for sse in source.iter_sse()]
        assert rest == streamed[len(streamed) // 2 + 1 :]


def test_streams_and_logs_refuse_what_they_cannot_serve(
    http: httpx.Client, other_http: httpx.Client, finished_job: dict
) -> None:
    job_id = finished_job["id"]
    events, logs = f"/v1/fine_tuning/jobs/{job_id}/events", f"/v1/fine_tuning/jobs/{job_id}/logs"
    for client, url, params in (
        (other_http, events, {"stream": "true"}),  # another project's job
        (other_http, logs, {}),
        (http, "/v1/fine_tuning/jobs/ftjob-nope/events", {"stream": "true"}),
        (http, "/v1/fine_tuning/jobs/ftjob-nope/logs", {"follow": "true"}),
    ):
        response = client.get(url, params=params)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["error"]["code"] == "fine-tuning_job_not_found"

    bad_cursor = http.get(events, params={"stream": "true"}, headers={"Last-Event-ID": "42"})
    assert bad_cursor.status_code == 400
    assert bad_cursor.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "Last-Event-ID",
        "code": "invalid_cursor",
    }
    for attempt in (finished_job["attempt"] + 1, 0):
        response = http.get(logs, params={"attempt": attempt})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "attempt"

    log = http.get(logs)
    assert log.status_code == 200 and "Step 1/" in log.text and "training loss=" in log.text
    assert http.get(logs, params={"follow": "true"}, timeout=30).text == log.text  # over: it ends at once


def test_an_idle_stream_sends_keep_alive_comments(api_key: str, http: httpx.Client) -> None:
    """A paused job's stream stays open with nothing to send: proxies see a comment every ping interval."""
    training = upload(http, chat_jsonl(8))
    with session_scope() as session:  # paused as it is created: never queued for the suite's worker to take
        job = job_service.create_job(session, project="alpha", spec=JobCreate(**job_body(training["id"])))
        job_id = job_service.pause_job(session, project="alpha", job_id=job.id).id
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "paused"
    try:
        with api_process(os.environ | {"TUNEFORGE_STREAM_PING_SECONDS": "0.2"}, "api-ping.log") as (url, _):
            headers = {"Authorization": f"Bearer {api_key}"}
            stream_url = f"{url}/v1/fine_tuning/jobs/{job_id}/events"
            # No byte for 5 s fails the read: at sse-starlette's default (15 s) no comment would come in time.
            params, timeout = {"stream": "true"}, httpx.Timeout(5.0)
            with httpx.stream("GET", stream_url, params=params, headers=headers, timeout=timeout) as response:
                comments = []
                for line in response.iter_lines():
                    if line.startswith(":"):  # an SSE comment: no event, only bytes on the wire
                        comments.append(line)
                        if len(comments) == 3:
                            break
    finally:
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert len(comments) == 3, comments
