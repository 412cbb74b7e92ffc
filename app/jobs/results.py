"""A job's metrics as one series: `GET /v1/fine_tuning/jobs/{id}/metrics`, and the results CSV.

The series is built from the job's `metrics` events. Each training step writes one (train_loss, learning
rate, gradient norm, ...) and each validation pass another, for the step it ran at (valid_loss, ...); the
two become one row. A step recorded twice (a resumed attempt trains again the steps after its last
checkpoint) keeps the latest recording of each. The same rows, as CSV, are the results file that a
succeeded job lists in `result_files`, as OpenAI's jobs do.
"""

import csv
import io
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import JobEvent
from app.deps import ProjectDep, SessionDep
from app.jobs import service as job_service
from app.jobs.schemas import StepMetricsPublic

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

# OpenAI's metric names, in this order; a task's own metrics (DPO's rewards, classification's accuracy
# and F1) follow them, sorted by name.
COLUMNS = (
    "step",
    "epoch",
    "train_loss",
    "valid_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "train_mean_token_accuracy",
    "valid_mean_token_accuracy",
)
# What a training step's event also says about the run as a whole, not about the step.
NOT_STEP_METRICS = ("total_steps",)
CSV_MEDIA_TYPE = "text/csv"
RESULTS_FILENAME = "step_metrics.csv"


def step_metrics(session: Session, *, job_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The job's metric columns, and its rows ordered by step, each holding every column (None if absent)."""
    recorded = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
    )
    latest: dict[tuple[int, bool], dict[str, Any]] = {}
    for data in recorded:
        if data and "step" in data:
            # Validation figures come in events of their own, without a train_loss.
            latest[(data["step"], "train_loss" in data)] = data
    by_step: dict[int, dict[str, Any]] = {}
    for (step, _training), data in latest.items():
        by_step.setdefault(step, {}).update(data)
    named = {key for row in by_step.values() for key in row}
    columns = [*COLUMNS, *sorted(named - set(COLUMNS) - set(NOT_STEP_METRICS))]
    return columns, [{column: by_step[step].get(column) for column in columns} for step in sorted(by_step)]


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A header line of the columns, then a line per row; a missing value is an empty field."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def results_csv(session: Session, *, job_id: str) -> bytes:
    """The job's results file: its step metrics as CSV."""
    return to_csv(*step_metrics(session, job_id=job_id)).encode()


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def wants_csv(accept: str | None) -> bool:
    """Whether an Accept header asks for CSV: it names text/csv, and ranks no JSON above it.

    JSON stays the answer to no header, to `*/*`, and to anything else.
    """
    ranked: dict[str, float] = {}
    for media_range in (accept or "").split(","):
        media_type, *parameters = media_range.split(";")
        ranked[media_type.strip().lower()] = _quality(parameters)
    csv_quality = ranked.get(CSV_MEDIA_TYPE, 0.0)
    return csv_quality > 0 and csv_quality >= ranked.get("application/json", 0.0)


CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The series: JSON, or CSV when the request's `Accept` asks for `text/csv`.",
        "content": {CSV_MEDIA_TYPE: {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/{job_id}/metrics",
    response_model=StepMetricsPublic,
    operation_id="listFineTuningJobMetrics",
    responses=CSV_RESPONSE,
)
def job_metrics(
    job_id: str, request: Request, session: SessionDep, project: ProjectDep
) -> StepMetricsPublic | Response:
    """The job's whole per-step series in one response, ordered by step.

    JSON by default: `{"object": "list", "columns": ["step", "epoch", "train_loss", "valid_loss",
    "learning_rate", "grad_norm", "tokens_per_second", "train_mean_token_accuracy",
    "valid_mean_token_accuracy", ...], "data": [{"step": 1, "epoch": 0.2, ...}, ...]}`; a task's own
    metrics (`train_rewards/accuracies`, `valid_accuracy`, ...) are further columns, and every row holds
    every column, null where the step has no value (valid_* only at steps a validation pass ran).
    With `Accept: text/csv`: the same table as CSV, a header line of the columns, empty fields for null.
    """
    job_service.get_job(session, project=project, job_id=job_id)
    columns, rows = step_metrics(session, job_id=job_id)
    if wants_csv(request.headers.get("accept")):
        return Response(to_csv(columns, rows), media_type=CSV_MEDIA_TYPE)
    return StepMetricsPublic(columns=columns, data=rows)
