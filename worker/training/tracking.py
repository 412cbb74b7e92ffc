"""Experiment trackers a job reports to: Weights & Biases, MLflow and TensorBoard, through transformers.

A job's `integrations` (validated by the API: app/jobs/schemas.py) become the trainer's `report_to`, so
the metrics reach each tracker through transformers' own WandbCallback, MLflowCallback and
TensorBoardCallback; a run reports to the trackers its job lists and no others (never `report_to="all"`).
`tracked` opens each tracker's run before the trainer is built, named after the job and holding the
resolved spec as its config, and closes it once training is over: after the final evaluation, which
the callbacks would otherwise log to a closed run (or, for MLflow, to a new run of its own).

Where a tracker's run goes comes from the job (W&B project, name, entity, tags; MLflow server and
experiment); credentials and hosts come from the worker's environment only (WANDB_API_KEY,
WANDB_BASE_URL, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, ...). What the job sets goes into this
process's environment, where the libraries and their callbacks read it, and dies with the run.

A tracker that cannot start (its library is not installed on the worker, its server is unreachable, no
API key) is left out of `report_to` with a `warn` event saying why, and training goes on: a tracker
mirrors metrics the job keeps anyway (its events, /metrics, the results CSV), so failing a run that may
have hours of compute ahead would cost more than the missing copy.

TensorBoard writes its event files into the attempt's work folder (`tensorboard_dir`); once the job has
succeeded, worker/train_job.py ships them as a results file of the job (TENSORBOARD_RESULTS_NAME).
"""

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from app.db.session import session_scope
from app.db.tables import Job
from app.jobs import lifecycle
from app.jobs import service as job_service
from worker.training.callbacks import JobReporter, pack_folder

if TYPE_CHECKING:
    from worker.training.sft import RunSpec

log = logging.getLogger(__name__)

TENSORBOARD_RESULTS_NAME = "tensorboard.tar.gz"
LABELS = {"wandb": "Weights & Biases", "mlflow": "MLflow", "tensorboard": "TensorBoard"}
# How a run ended, as each tracker records it: MLflow's run statuses; W&B takes an exit code.
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

# Closes a tracker's run, given how training ended: "finished", "stopped" (cancel, pause) or "failed".
Closer = Callable[[str], None]


def tensorboard_dir(workdir: Path) -> Path:
    """Where a run's TensorBoard event files go: the `tensorboard` folder of its attempt's work folder."""
    return workdir / "tensorboard"


def tensorboard_archive(workdir: Path) -> bytes | None:
    """The run's TensorBoard event files as a .tar.gz; None when it wrote none (it did not report there)."""
    folder = tensorboard_dir(workdir)
    if not folder.is_dir():
        return None
    packed = pack_folder(folder)
    try:
        return packed.read_bytes()
    finally:
        packed.unlink(missing_ok=True)


def integrations_of(job_id: str) -> list[dict[str, Any]]:
    """The trackers the job was created with, as the API stored them."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        return list(job.integrations or []) if job is not None else []


def run_config(spec: "RunSpec") -> dict[str, Any]:
    """What each tracker records as the run's config: the resolved spec the run trains."""
    return {
        "job_id": spec.job_id,
        "attempt": spec.attempt,
        "model": spec.base_model,
        "method": spec.method,  # its hyperparameters resolved, `auto` included
        "seed": spec.seed,
        "training_file": spec.training_file_id,
        "validation_file": spec.validation_file_id,
    }


def _flat(config: dict[str, Any], prefix: str) -> dict[str, str]:
    """A nested config as MLflow's params: one string per leaf, named by its dotted path."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def _start_wandb(spec: "RunSpec", settings: dict[str, Any]) -> Closer:
    # Offline runs (WANDB_MODE=offline) stay in WANDB_DIR for `wandb sync`; without it, in the work folder.
    os.environ.setdefault("WANDB_DIR", str(spec.workdir))
    import wandb

    run = wandb.init(
        project=settings["project"],
        name=settings.get("name") or spec.job_id,
        entity=settings.get("entity"),
        tags=settings.get("tags"),
        config={"tuneforge": run_config(spec)},
        job_type="fine-tune",
    )  # WandbCallback finds this run and adds the TrainingArguments to its config
    return lambda outcome: run.finish(exit_code=1 if outcome == "failed" else 0)


def _start_mlflow(spec: "RunSpec", settings: dict[str, Any]) -> Closer:
    # The variables MLflowCallback (and MLflow itself) read; a job's own values win over the worker's.
    if settings.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = settings["tracking_uri"]
    if settings.get("experiment_name"):
        os.environ["MLFLOW_EXPERIMENT_NAME"] = settings["experiment_name"]
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])  # creates it; reaches the server now
    # MLflowCallback logs into the active run, and leaves ending it to whoever started it.
    mlflow.start_run(run_name=spec.job_id)
    mlflow.log_params(_flat(run_config(spec), "tuneforge."))

    def close(outcome: str) -> None:
        mlflow.end_run(status=MLFLOW_STATUS[outcome])  # waits for the metrics still being sent

    return close


def _start_tensorboard(spec: "RunSpec", settings: dict[str, Any]) -> Closer:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    folder = tensorboard_dir(spec.workdir)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)  # where TensorBoardCallback writes
    with SummaryWriter(log_dir=str(folder)) as writer:
        config = json.dumps(run_config(spec), indent=2, sort_keys=True)
        writer.add_text("tuneforge/run_config", "    " + config.replace("\n", "\n    "))  # a code block
    return lambda outcome: None  # TensorBoardCallback closes its writer at the end of training


STARTERS: dict[str, Callable[["RunSpec", dict[str, Any]], Closer]] = {
    "wandb": _start_wandb,
    "mlflow": _start_mlflow,
    "tensorboard": _start_tensorboard,
}


def _warn(spec: "RunSpec", message: str, data: dict[str, Any]) -> None:
    """A `warn` event while this attempt owns the job (and a line in the run's log either way)."""
    log.warning(message)
    try:
        with session_scope() as session:
            if lifecycle.still_owned(session, job_id=spec.job_id, attempt=spec.attempt):
                job_service.add_event(session, job_id=spec.job_id, level="warn", message=message, data=data)
    except SQLAlchemyError:
        log.warning("could not record event %r", message, exc_info=True)


def _why(kind: str, exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return f"{exc.name or kind} is not installed on this worker (pip install 'tuneforge[tracking]')"
    return f"{exc.__class__.__name__}: {exc}"


@contextmanager
def tracked(spec: "RunSpec", reporter: JobReporter) -> Iterator["RunSpec"]:
    """Open the job's tracker runs; yield the spec reporting to those that opened; close them after."""
    closers: dict[str, Closer] = {}
    for integration in integrations_of(spec.job_id):
        kind = integration["type"]
        try:
            closers[kind] = STARTERS[kind](spec, integration.get(kind) or {})
        except Exception as exc:  # each library fails its own way; none of them may fail the run
            _warn(
                spec,
                f"{LABELS[kind]} is off for this run: {_why(kind, exc)}. Training goes on; its metrics are "
                "in the job's events and results file.",
                {"integration": kind, "error": f"{exc.__class__.__name__}: {exc}"},
            )
    if closers:
        names = ", ".join(LABELS[kind] for kind in closers)
        reporter.event(f"Reporting to {names}.", {"integrations": list(closers), "run_name": spec.job_id})
    outcome = "failed"
    try:
        yield replace(spec, report_to=list(closers))
        outcome = "stopped" if reporter.stopped else "finished"
    finally:
        for kind, close in closers.items():
            try:
                close(outcome)
            except Exception as exc:  # a tracker that cannot save its run's end leaves the model intact
                _warn(
                    spec,
                    f"{LABELS[kind]} could not close this run: {_why(kind, exc)}.",
                    {"integration": kind, "error": f"{exc.__class__.__name__}: {exc}"},
                )
