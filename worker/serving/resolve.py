"""Model id -> the folders that serve it, read from the database and the artifact store.

The one place that decides 404 (unknown, or another project's model) and 409 (its job has not
succeeded yet). Fine-tuned adapters are extracted once from their tar.gz into
``<home>/serving/adapters/<model id, made safe>-<hash>`` and reused from there.
"""

from __future__ import annotations

from pathlib import Path

from app.db.session import session_scope
from app.jobs import service as job_service
from app.models import service as model_service
from app.storage import cache_folder, get_store, unpack_once
from worker.serving.engine import Target


def resolve(model_id: str, *, project: str | None) -> Target:
    """The target for `model_id` as `project` sees it; raise ApiError 404 or 409 otherwise."""
    with session_scope() as session:
        row = job_service.get_servable_model(session, project=project or "", model_id=model_id)
        if row.kind == model_service.BASE:
            base = row
        else:
            base = model_service.get_base_model(session, model_id=row.base_model or "")
            storage_key = row.storage_key or ""
    # Outside the transaction: from an object store, the first fetch of a model on a host takes a while.
    base_path = model_service.base_model_folder(base)
    if base is row:
        return Target(model_id=row.id, base_id=row.id, base_path=base_path)
    archive = get_store().local_path(storage_key)
    return Target(
        model_id=model_id, base_id=base.id, base_path=base_path, adapter_path=extracted(model_id, archive)
    )


def extracted(model_id: str, archive: Path) -> Path:
    """The adapter archive unpacked into its cache folder, once."""
    return unpack_once(archive, cache_folder("serving", model_id), model_id=model_id)
