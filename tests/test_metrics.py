"""A job's metrics and results: the step series (JSON and CSV), the results file, progress and estimate.

One small SFT job with a validation file (6 steps, validation and a checkpoint every 2) serves the module.
It is held after step 2 (the test locks the checkpoints table, so the run waits in its checkpoint's
database write) to see it running, then let go to finish.
"""

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx
import openai
import pytest
from sqlalchemy import select, text

from app.db.session import get_engine, session_scope
from app.db.tables import Job, JobEvent
from app.jobs import service as job_service
from app.jobs.results import COLUMNS, wants_csv
from app.jobs.schemas import JobCreate
from tests.helpers import chat_jsonl, job_body, upload, wait_for_status

STEPS = 6  # 24 examples at batch 4; validation and a checkpoint every 2 steps
CHECKPOINTED = [2, 4, 6]
VALIDATED = [0, *CHECKPOINTED]  # step 0: the base model's validation loss, before the first step


@dataclass
class HeldRun:
    running: dict  # the job as the API showed it while the run was held after step 2
    estimated_finish: datetime  # what the job row held then, to the microsecond
    events: list[JobEvent]  # every event, in the order written, with the writers' exact times
    job: dict  # the job once it succeeded


def until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def events_of(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def validated_at(job_id: str, step: int) -> bool:
    return any((e.data or {}).get("step") == step and "valid_loss" in e.data for e in events_of(job_id))


@pytest.fixture(scope="module")
def held(http: httpx.Client) -> HeldRun:
    training = upload(http, chat_jsonl(24))
    validation = upload(http, chat_jsonl(8, offset=100), "valid.jsonl")
    body = job_body(training["id"], batch_size=4, checkpoint_every_steps=2) | {
        "validation_file": validation["id"]
    }
    with get_engine().connect() as connection, connection.begin():
        connection.execute(text("LOCK TABLE checkpoints IN SHARE MODE"))  # reads pass, writes wait
        created = http.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        # Step 2 is logged, then validated, then checkpointed: the run now waits on the lock.
        until(lambda: validated_at(job_id, 2), "the validation pass of step 2")
        running = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        with session_scope() as session:
            estimate = session.scalar(select(Job.estimated_finish).where(Job.id == job_id))
    assert estimate is not None, running
    job = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return HeldRun(running, estimate, events_of(job_id), job)


def is_training_step(event: JobEvent) -> bool:
    return event.type == "metrics" and "train_loss" in (event.data or {})


def training_steps(events: list[JobEvent]) -> list[dict]:
    return [e.data for e in events if is_training_step(e)]


def validation_passes(events: list[JobEvent]) -> list[dict]:
    return [e.data for e in events if e.type == "metrics" and not is_training_step(e)]


def test_a_running_job_reports_its_step_and_when_it_should_finish(held: HeldRun) -> None:
    assert held.running["status"] == "running"
    assert held.running["progress"] == {"step": 2, "total_steps": STEPS}
    assert held.running["estimated_finish"] == int(held.estimated_finish.timestamp())
    # Four steps are left, at the pace of the two trained: later than step 2's record, by no more than
    # twice the time from the start of training to step 2 (and a little for a loaded machine).
    step_time = {e.data["step"]: e.created_at for e in held.events if is_training_step(e)}
    trains = next(e.created_at for e in held.events if e.message.startswith("Method lora"))
    left = (held.estimated_finish - step_time[2]).total_seconds()
    assert 0 < left <= 2 * (step_time[2] - trains).total_seconds() + 0.5, left


def test_a_finished_job_shows_its_last_step_and_no_estimate(held: HeldRun) -> None:
    assert held.job["progress"] == {"step": STEPS, "total_steps": STEPS}
    assert held.job["estimated_finish"] is None


def test_validation_passes_are_metrics_events_and_checkpoints_use_openais_names(
    http: httpx.Client, held: HeldRun
) -> None:
    steps = training_steps(held.events)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(s["grad_norm"] > 0 for s in steps)
    validations = validation_passes(held.events)
    assert [v["step"] for v in validations] == VALIDATED
    assert all({"valid_loss", "valid_mean_token_accuracy"} <= v.keys() for v in validations)

    checkpoints = http.get(f"/v1/fine_tuning/jobs/{held.job['id']}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == CHECKPOINTED
    valid = {v["step"]: v for v in validations}
    for checkpoint in checkpoints:
        metrics, step = checkpoint["metrics"], checkpoint["step_number"]
        assert metrics["full_valid_loss"] == metrics["valid_loss"] == valid[step]["valid_loss"]
        accuracy = valid[step]["valid_mean_token_accuracy"]
        assert metrics["full_valid_mean_token_accuracy"] == accuracy


def test_metrics_route_is_the_whole_series_one_row_a_step(http: httpx.Client, held: HeldRun) -> None:
    series = http.get(f"/v1/fine_tuning/jobs/{held.job['id']}/metrics").json()
    columns, rows = series["columns"], series["data"]
    # OpenAI's columns, then what else the run recorded (SFTTrainer's valid_entropy), by name
    recorded_names = {
        k for data in training_steps(held.events) + validation_passes(held.events) for k in data
    }
    assert columns == [*COLUMNS, *sorted(recorded_names - {*COLUMNS, "total_steps"})]
    assert series["object"] == "list" and len(columns) > len(COLUMNS)
    assert [row["step"] for row in rows] == list(range(0, STEPS + 1))
    valid = {v["step"]: v for v in validation_passes(held.events)}
    assert rows[0] == {column: valid[0].get(column) for column in columns}  # validated, not trained
    for row, trained in zip(rows[1:], training_steps(held.events), strict=True):
        recorded = trained | valid.get(trained["step"], {})
        assert row == {column: recorded.get(column) for column in columns}
    assert [row["step"] for row in rows if row["valid_loss"] is not None] == VALIDATED


def test_metrics_as_csv_when_asked(http: httpx.Client, held: HeldRun) -> None:
    url = f"/v1/fine_tuning/jobs/{held.job['id']}/metrics"
    series = http.get(url).json()
    response = http.get(url, headers={"Accept": "text/csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    table = csv.DictReader(io.StringIO(response.text))
    assert table.fieldnames == series["columns"]
    assert list(table) == [{k: "" if v is None else str(v) for k, v in row.items()} for row in series["data"]]


@pytest.mark.parametrize(
    ("accept", "csv_wanted"),
    [
        ("text/csv", True),
        ("application/json;q=0.5, text/csv", True),
        ("text/csv;q=0, application/json", False),
        ("application/json, text/csv;q=0.9", False),
        ("*/*", False),
        (None, False),
    ],
)
def test_accept_header_picks_csv(accept: str | None, csv_wanted: bool) -> None:
    assert wants_csv(accept) is csv_wanted


def test_a_step_recorded_twice_appears_once_the_latest_winning(http: httpx.Client) -> None:
    """As a resumed attempt writes them: it trains again the steps after its last checkpoint."""
    training = upload(http, chat_jsonl(8))
    with session_scope() as session:
        job = job_service.create_job(
            session, project="alpha", spec=JobCreate.model_validate(job_body(training["id"]))
        )
        job_service.cancel_job(session, project="alpha", job_id=job.id)  # never sent: nothing else writes
        for data in (
            {"step": 1, "train_loss": 2.0},
            {"step": 2, "train_loss": 1.9},
            {"step": 2, "valid_loss": 1.8},
            {"step": 2, "train_loss": 1.5, "train_rewards/accuracies": 0.75},  # attempt 2, resumed at step 1
            {"step": 3, "train_loss": 1.2},
        ):
            job_service.add_event(session, job_id=job.id, message="step", type="metrics", data=data)
    series = http.get(f"/v1/fine_tuning/jobs/{job.id}/metrics").json()
    assert series["columns"] == [*COLUMNS, "train_rewards/accuracies"]
    picked = [
        (row["step"], row["train_loss"], row["valid_loss"], row["train_rewards/accuracies"])
        for row in series["data"]
    ]
    assert picked == [(1, 2.0, None, None), (2, 1.5, 1.8, 0.75), (3, 1.2, None, None)]


def test_a_succeeded_job_lists_its_step_metrics_as_a_results_file(
    http: httpx.Client, held: HeldRun, server: str, api_key: str
) -> None:
    [file_id] = held.job["result_files"]
    described = http.get(f"/v1/files/{file_id}").json()
    assert (described["purpose"], described["filename"]) == ("fine-tune-results", "step_metrics.csv")
    content = http.get(f"/v1/files/{file_id}/content")
    assert content.headers["content-type"].startswith("text/csv")
    as_csv = http.get(f"/v1/fine_tuning/jobs/{held.job['id']}/metrics", headers={"Accept": "text/csv"})
    assert content.content == as_csv.content and described["bytes"] == len(content.content)
    listed = http.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"]
    assert file_id in {f["id"] for f in listed}

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    assert client.fine_tuning.jobs.retrieve(held.job["id"]).result_files == [file_id]
    assert client.files.retrieve(file_id).purpose == "fine-tune-results"
    assert client.files.content(file_id).content == content.content


@pytest.mark.parametrize(
    ("route", "field"),
    [("jobs", "training_file"), ("jobs", "validation_file"), ("estimate", "training_file")],
)
def test_a_results_file_is_no_training_data(
    http: httpx.Client, held: HeldRun, route: str, field: str
) -> None:
    [results_file] = held.job["result_files"]
    body = job_body(held.job["training_file"]) | {field: results_file}
    response = http.post(f"/v1/fine_tuning/{route}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, "invalid_file_purpose")
    assert "fine-tune-results" in error["message"]


def test_metrics_and_results_of_another_project_are_not_found(
    http: httpx.Client, other_http: httpx.Client, held: HeldRun
) -> None:
    url = f"/v1/fine_tuning/jobs/{held.job['id']}/metrics"
    theirs, theirs_as_csv = other_http.get(url), other_http.get(url, headers={"Accept": "text/csv"})
    unknown = http.get("/v1/fine_tuning/jobs/ftjob-doesnotexist/metrics")
    assert theirs.status_code == theirs_as_csv.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"]
    [file_id] = held.job["result_files"]
    assert other_http.get(f"/v1/files/{file_id}/content").status_code == 404
