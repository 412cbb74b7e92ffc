"""Fine-tuning jobs as the API sees them: create, read, list, cancel, events and checkpoints."""

import secrets
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from app import webhooks
from app.config import get_settings
from app.db.session import lock_rows
from app.db.tables import Checkpoint, Job, JobEvent, Model, TrainingFile
from app.db.time import db_now
from app.errors import ApiError, not_found
from app.estimate import planner
from app.estimate.counts import PlanError
from app.files import service as file_service
from app.files.validation import TASK_FORMATS
from app.jobs import routing
from app.jobs.schemas import (
    ACTIVE_STATUSES,
    LLAMA_ADAPTER_ARCHITECTURES,
    LORA_FAMILY,
    QUANTIZED,
    TASK_METHODS,
    CheckpointPublic,
    EventPublic,
    JobCreate,
    JobError,
    JobProgress,
    JobPublic,
    Resources,
    hyperparameters_of,
)
from app.models import service as model_service


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value else None


def to_public(job: Job) -> JobPublic:
    hp = hyperparameters_of(job.method)
    return JobPublic(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_ts(job.finished_at),
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.project,
        status=job.status,
        error=JobError(**job.error) if job.error else None,
        hyperparameters={k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        method=job.method,
        training_file=job.training_file,
        validation_file=job.validation_file,
        result_files=job.result_files or [],
        trained_tokens=job.trained_tokens,
        seed=job.seed,
        suffix=job.suffix,
        user_provided_suffix=job.suffix,
        metadata=job.metadata_,
        integrations=job.integrations or [],
        # An estimate from a finished, paused or re-queued attempt's pace says nothing about the future.
        estimated_finish=_ts(job.estimated_finish) if job.status == "running" else None,
        progress=progress_of(job),
        attempt=job.attempt,
        priority=job.priority or 0,
        resources=Resources(**job.resources) if job.resources else None,
    )


def progress_of(job: Job) -> JobProgress | None:
    """The step the run has reached, of how many; None before its first step."""
    if job.step is None or job.total_steps is None:
        return None
    return JobProgress(step=job.step, total_steps=job.total_steps)


def event_to_public(event: JobEvent) -> EventPublic:
    return EventPublic(
        id=f"ftevent-{event.seq}",
        created_at=int(event.created_at.timestamp()),
        level=event.level,
        message=event.message,
        type=event.type,
        data=event.data,
    )


def checkpoint_to_public(checkpoint: Checkpoint, job: Job) -> CheckpointPublic:
    return CheckpointPublic(
        id=checkpoint.id,
        created_at=int(checkpoint.created_at.timestamp()),
        fine_tuned_model_checkpoint=model_service.checkpoint_model_id(job, checkpoint.step),
        fine_tuning_job_id=job.id,
        metrics=checkpoint.metrics,
        step_number=checkpoint.step,
    )


def check_spec_against_model(session: Session, project: str, spec: JobCreate) -> None:
    """404 for an unknown model, 400 naming the field for a method or hyperparameter it cannot take."""
    base = model_service.get_model(session, project=project, model_id=spec.model, param="model")
    if base.kind != model_service.BASE:
        raise ApiError(
            400,
            f"'{spec.model}' is a fine-tuned model; start from its base model '{base.base_model}'.",
            param="model",
            code="invalid_base_model",
        )
    task, hp = spec.method.type, spec.method.hyperparameters
    hp_param = f"method.{task}.hyperparameters"
    known = set(base.linear_modules or [])
    # Models registered before profiles existed were all causal LMs.
    causal_lm = (base.profile or {}).get("causal_lm", True)
    if task in ("supervised", "dpo") and not causal_lm:
        raise ApiError(
            400,
            f"'{spec.model}' is {base.architecture}, not a causal language model; "
            f"method.type '{task}' needs one (an encoder can take 'classification').",
            param="model",
            code="unsupported_model",
        )
    if hp.peft not in TASK_METHODS[task]:
        raise ApiError(
            400,
            f"peft '{hp.peft}' is not offered for method.type '{task}'; "
            f"choose one of {', '.join(TASK_METHODS[task])}.",
            param=f"{hp_param}.peft",
            code="unsupported_method",
        )
    if hp.peft in QUANTIZED and not known:
        raise ApiError(
            400,
            f"peft '{hp.peft}' quantizes nn.Linear layers with bitsandbytes, and '{spec.model}' has none; "
            "use 'lora' instead.",
            param=f"{hp_param}.peft",
            code="unsupported_method",
        )
    if hp.peft == "llama_adapter" and base.architecture not in LLAMA_ADAPTER_ARCHITECTURES:
        raise ApiError(
            400,
            f"peft 'llama_adapter' works on Llama-family models ({', '.join(LLAMA_ADAPTER_ARCHITECTURES)}); "
            f"'{spec.model}' is {base.architecture}.",
            param=f"{hp_param}.peft",
            code="unsupported_method",
        )
    profile = base.profile or {}
    context = profile.get("max_position_embeddings")  # recorded at registration (older rows lack it)
    if context and hp.max_seq_length > context:
        raise ApiError(
            400,
            f"max_seq_length {hp.max_seq_length} is longer than the context of '{spec.model}' ({context} "
            "tokens); use at most that.",
            param=f"{hp_param}.max_seq_length",
            code="invalid_value",
        )
    layers = profile.get("num_layers")
    if hp.peft == "freeze" and layers and hp.n_trainable_layers > layers:
        raise ApiError(
            400,
            f"n_trainable_layers={hp.n_trainable_layers} but '{spec.model}' has only {layers} blocks.",
            param=f"{hp_param}.n_trainable_layers",
            code="invalid_value",
        )
    if hp.peft in LORA_FAMILY and isinstance(hp.target_modules, list) and known:
        missing = [m for m in hp.target_modules if m not in known]
        if missing:
            raise ApiError(
                400,
                f"target_modules {missing} are not linear layers of '{spec.model}'; it has {sorted(known)}.",
                param=f"{hp_param}.target_modules",
                code="invalid_target_modules",
            )


def training_data(session: Session, *, project: str, file_id: str, param: str, task: str) -> TrainingFile:
    """The project's file `file_id`, if it is fine-tuning data (not a job's results) in a format `task`
    trains on; else a 400 naming `param`."""
    file = file_service.get_file(session, project=project, file_id=file_id, param=param)
    if file.purpose != "fine-tune":
        raise ApiError(
            400,
            f"File '{file.id}' has purpose '{file.purpose}', not 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    if file.format not in TASK_FORMATS[task]:
        raise ApiError(
            400,
            f"File '{file.id}' holds {file.format} examples; method.type '{task}' trains on "
            f"{' or '.join(TASK_FORMATS[task])} files.",
            param=param,
            code="invalid_file_format",
        )
    return file


def create_job(session: Session, *, project: str, spec: JobCreate) -> Job:
    """Validate a job spec against its files and base model and write it as `queued`."""
    # Locked first, so a concurrent delete of either file runs wholly before or after this job's insert.
    lock_rows(session, TrainingFile.id, [f for f in (spec.training_file, spec.validation_file) if f])
    check_spec_against_model(session, project, spec)
    training_data(
        session, project=project, file_id=spec.training_file, param="training_file", task=spec.method.type
    )
    if spec.validation_file:
        training_data(
            session,
            project=project,
            file_id=spec.validation_file,
            param="validation_file",
            task=spec.method.type,
        )
    if spec.validation_file and spec.method.hyperparameters.validation_split:
        raise ApiError(
            400,
            "Give either a validation_file or a validation_split, not both.",
            param=f"method.{spec.method.type}.hyperparameters.validation_split",
            code="invalid_value",
        )
    method = spec.method.model_copy(deep=True)
    method.hyperparameters = method.hyperparameters.resolved(get_settings().resolved_worker_device)
    resources = spec.resources.model_dump(exclude_none=True) if spec.resources else {}
    queue = routing.route(resources, _per_device_bytes(session, spec, method))
    job = Job(
        id="ftjob-" + secrets.token_hex(12),
        project=project,
        model=spec.model,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        suffix=spec.suffix,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**31),
        metadata_=spec.metadata,
        method=method.model_dump(mode="json"),
        integrations=[integration.as_stored() for integration in spec.integrations or []] or None,
        status="queued",
        result_files=[],
        attempt=0,
        max_attempts=get_settings().max_attempts,
        queue=queue,
        sent_at=db_now(),  # the caller sends once this commits; the reconciler re-sends if that is lost
        priority=spec.priority,
        resources=resources or None,
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, message=f"Created fine-tuning job: {job.id}")
    waiting = routing.live_misfit(session, job)
    if waiting:
        add_event(session, job_id=job.id, message=waiting, level="warning")
    return job


def _per_device_bytes(session: Session, spec: JobCreate, method: Any) -> int | None:
    """The memory plan of the job per device, for routing; None where the plan waits for the worker
    (`peft: auto`, chosen against the worker's own memory) or no worker class states its memory."""
    hp = method.hyperparameters
    if hp.peft == "auto" or not any(c.memory_gb for c in routing.worker_classes()):
        return None
    device = get_settings().resolved_worker_device
    try:
        base = model_service.get_model(session, project="", model_id=spec.model, param="model")
        plan = planner.plan_method(
            base.profile or {},
            hp.resolved().model_dump(),
            peft=hp.peft,
            device=device,
            task=method.type,
            num_labels=2,  # the head's size barely counts; the worker counts the labels
        )
    except (ApiError, PlanError):  # a model the planner cannot profile is routed by its resources alone
        return None
    return planner.per_device_bytes(plan, spec.resources.gpus if spec.resources else 1, device)


def get_servable_model(session: Session, *, project: str, model_id: str) -> Model:
    """A model this project may use: 404 as get_model decides, 409 for its own job that has not succeeded."""
    try:
        return model_service.get_model(session, project=project, model_id=model_id, param="model")
    except ApiError as missing:
        job_id = model_id.rsplit(":", 1)[-1] if model_id.startswith("ft:") else None
        if not job_id:
            raise
        try:
            job = get_job(session, project=project, job_id=job_id)
        except ApiError:
            raise missing from None
        if job.status != "succeeded" and model_service.fine_tuned_model_id(job) == model_id:
            raise ApiError(
                409,
                f"Model '{model_id}' is not ready: its fine-tuning job {job.id} is {job.status}. "
                "It can be used once the job has succeeded.",
                param="model",
                code="model_not_ready",
            ) from None
        raise


def get_job(session: Session, *, project: str, job_id: str) -> Job:
    """A job of this project, else 404."""
    job = session.get(Job, job_id)
    if job is None or job.project != project:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session, *, project: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page; `metadata` pairs must match."""
    query = select(Job).where(Job.project == project)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    if after:
        cursor = get_job(session, project=project, job_id=after)
        query = query.where(
            or_(
                Job.created_at < cursor.created_at,
                and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
            )
        )
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _transition(session: Session, job: Job, *, to: str, where: tuple[str, ...], **values: Any) -> bool:
    """Move `job` to status `to` if it is in one of `where`, in one conditional UPDATE; True if it moved.

    Never read-then-write: a worker publishing the job, or another request, may change it in between.
    The row is refreshed either way, so the caller answers with the job as it now is.
    """
    moved = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(where))
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    return moved.rowcount == 1  # type: ignore[attr-defined]


def cancel_job(session: Session, *, project: str, job_id: str) -> Job:
    """Cancel a job that has not finished; a finished job is returned unchanged."""
    job = get_job(session, project=project, job_id=job_id)
    # A running worker sees this on its next step and stops; a queued job is never claimed.
    if _transition(
        session, job, to="cancelled", where=ACTIVE_STATUSES, finished_at=db_now(), lease_expires_at=None
    ):
        add_event(session, job_id=job.id, message="Job cancelled by the user.")
        webhooks.enqueue(session, job_id=job.id, type="fine_tuning.job.cancelled")
    return job


def pause_job(session: Session, *, project: str, job_id: str) -> Job:
    """Pause a queued or running job; a running one saves a checkpoint at the end of its current step.

    A paused job keeps its checkpoints and resumes from the last one. The attempt a pause interrupts is
    given back (`max_attempts` grows), so pausing never uses up a job's attempts.
    """
    job = get_job(session, project=project, job_id=job_id)
    given_back = case((Job.status == "running", Job.max_attempts + 1), else_=Job.max_attempts)
    pausable = ("validating_files", "queued", "running")
    if _transition(
        session,
        job,
        to="paused",
        where=pausable,
        max_attempts=given_back,
        lease_owner=None,
        lease_expires_at=None,
    ):
        add_event(session, job_id=job.id, message="Job paused by the user.")
        webhooks.enqueue(session, job_id=job.id, type="fine_tuning.job.paused")
    elif job.status != "paused":
        raise ApiError(
            400,
            f"Job {job.id} has {job.status}; only a queued or running job can be paused.",
            code="job_not_pausable",
        )
    return job


def resume_job(session: Session, *, project: str, job_id: str) -> tuple[Job, bool]:
    """Queue a paused job again (it continues from its last checkpoint); True if it needs sending."""
    job = get_job(session, project=project, job_id=job_id)
    if _transition(session, job, to="queued", where=("paused",), sent_at=db_now()):
        add_event(session, job_id=job.id, message="Job resumed by the user.")
        return job, True
    if job.status not in ("validating_files", "queued", "running"):
        raise ApiError(
            400, f"Job {job.id} has {job.status}; only a paused job can be resumed.", code="job_not_paused"
        )
    return job, False


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Append one event to a job's log."""
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def event_seq(event_id: str, *, param: str = "after") -> int:
    prefix, _, number = event_id.partition("-")
    if prefix != "ftevent" or not number.isdigit():
        raise ApiError(
            400, f"'{event_id}' is not an event id (ftevent-N).", param=param, code="invalid_cursor"
        )
    return int(number)


def list_events(
    session: Session, *, project: str, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """Newest first, like OpenAI; `after` is the id of the last event of the previous page."""
    get_job(session, project=project, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after:
        query = query.where(JobEvent.seq < event_seq(after))
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_checkpoints(
    session: Session, *, project: str, job_id: str, after: str | None, limit: int
) -> tuple[Job, list[Checkpoint], bool]:
    """Newest step first."""
    job = get_job(session, project=project, job_id=job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after:
        cursor = session.get(Checkpoint, after)
        if cursor is None or cursor.job_id != job_id:
            raise not_found("checkpoint", after, param="after")
        query = query.where(Checkpoint.step < cursor.step)
    rows = list(session.scalars(query.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    return job, rows[:limit], len(rows) > limit
