"""Base models (shared by every project), fine-tuned models and their checkpoints (owned by one project).

A checkpoint is a model too, as at OpenAI: `<fine-tuned model id>:ckpt-step-<N>` can be retrieved, chatted
with and downloaded while its checkpoint row exists. It has no row of its own in `models`: `get_model`
builds it from the job and the checkpoint row.
"""

import re
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db.session import after_commit
from app.db.tables import Checkpoint, Job, Model
from app.errors import ApiError, not_found
from app.models.schemas import ModelPublic
from app.storage import get_store

BASE, FINE_TUNED, CHECKPOINT = "base", "fine-tuned", "checkpoint"
_CHECKPOINT_ID = re.compile(r"^(ft:.*):ckpt-step-(\d{1,9})$")


def fine_tuned_model_id(job: Job) -> str:
    """OpenAI's naming: ft:<base>:<suffix>:<job id> (suffix may be empty)."""
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


def checkpoint_model_id(job: Job, step: int) -> str:
    """OpenAI's naming of a checkpoint: the job's model id, then :ckpt-step-<step>."""
    return f"{fine_tuned_model_id(job)}:ckpt-step-{step}"


def to_public(row: Model) -> ModelPublic:
    return ModelPublic(
        id=row.id,
        created=int(row.created_at.timestamp()),
        owned_by=row.project or "tuneforge",
        parent=row.base_model,
        kind=row.kind,  # type: ignore[arg-type]
    )


def register_base_model(
    session: Session, *, name: str, path: Path, profile: dict[str, Any], storage_key: str | None = None
) -> Model:
    """Register (or re-register) a model folder under `name`, with its profile (see inspect_model); with
    `storage_key`, the folder's copy in the object store, which every host reads instead of `path`."""
    row = session.get(Model, name)
    if row is not None and row.kind != BASE:
        raise ApiError(409, f"'{name}' is a fine-tuned model id; pick another name.", param="name")
    if row is None:
        row = Model(id=name, kind=BASE)
        session.add(row)
    row.path, row.profile, row.storage_key = str(path), profile, storage_key
    row.architecture, row.linear_modules = profile["architecture"], sorted(profile["linear_modules"])
    session.flush()
    return row


def base_model_folder(row: Model) -> Path:
    """Where this host reads base model `row`: its folder, or this host's copy of it from the object store."""
    if row.storage_key:
        return get_store().model_folder(row.storage_key)
    return Path(row.path or "")


def add_fine_tuned_model(
    session: Session, *, model_id: str, project: str, base_model: str, job_id: str, storage_key: str
) -> Model:
    """Record the model a succeeded job produced."""
    row = Model(
        id=model_id,
        project=project,
        kind=FINE_TUNED,
        base_model=base_model,
        job_id=job_id,
        storage_key=storage_key,
    )
    session.add(row)
    session.flush()
    return row


def get_model(session: Session, *, project: str, model_id: str, param: str | None = None) -> Model:
    """A base model or one of this project's fine-tuned models or checkpoints, else 404."""
    if "\x00" in model_id:  # Postgres refuses NUL, and no id holds one
        row = None
    else:
        row = session.get(Model, model_id) or _checkpoint_model(session, model_id)
    if row is None or (row.project is not None and row.project != project):
        raise not_found("model", model_id, param=param)
    return row


def _checkpoint_model(session: Session, model_id: str) -> Model | None:
    """The checkpoint `model_id` names, as a model (not added to the session), or None."""
    match = _CHECKPOINT_ID.match(model_id)
    if match is None:
        return None
    job = session.get(Job, match.group(1).rsplit(":", 1)[-1])
    if job is None or fine_tuned_model_id(job) != match.group(1):
        return None
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == int(match.group(2)))
    )
    if checkpoint is None:
        return None
    return Model(
        id=model_id,
        project=job.project,
        kind=CHECKPOINT,
        base_model=job.model,
        job_id=job.id,
        storage_key=checkpoint.storage_key,
        created_at=checkpoint.created_at,
    )


def get_base_model(session: Session, *, model_id: str) -> Model:
    """A registered base model, for the worker."""
    row = session.get(Model, model_id)
    if row is None or row.kind != BASE:
        raise LookupError(f"base model '{model_id}' is not registered")
    return row


def list_models(session: Session, *, project: str) -> list[Model]:
    query = (
        select(Model).where(or_(Model.project.is_(None), Model.project == project)).order_by(Model.created_at)
    )
    return list(session.scalars(query))


def delete_model(session: Session, *, project: str, model_id: str) -> None:
    """Delete a fine-tuned model and its adapter; base models are managed with the CLI."""
    row = get_model(session, project=project, model_id=model_id)
    if row.kind == BASE:
        raise ApiError(400, f"'{model_id}' is a base model; remove it with the tuneforge CLI.", param="model")
    if row.kind == CHECKPOINT:
        raise ApiError(
            400,
            f"'{model_id}' is a checkpoint of job {row.job_id}; a job keeps its newest checkpoints and "
            "removes older ones itself.",
            param="model",
            code="checkpoint_not_deletable",
        )
    session.delete(row)
    session.flush()
    if row.storage_key:
        key = row.storage_key
        after_commit(session, lambda: get_store().delete(key))


def adapter_path(session: Session, *, project: str, model_id: str) -> Path:
    """Where the fine-tuned model's adapter archive is."""
    row = get_model(session, project=project, model_id=model_id)
    if row.kind == BASE or not row.storage_key:
        raise ApiError(
            400, f"'{model_id}' is a base model and has no adapter.", param="model", code="not_fine_tuned"
        )
    return get_store().local_path(row.storage_key)
