"""Resume: a re-queued job continues from the last complete checkpoint any of its attempts recorded.

A checkpoint is complete once its row exists: the row is written only after both of its archives (the
model files, and the rest of the folder) are in the store (see `JobReporter.on_save`), so a write cut
short by a crash is never found here. Only what Tuneforge wrote is loaded: the archives named by the
database row, unpacked only if they hold nothing but regular files and folders at safe paths; Trainer
then reads the weights as safetensors and the optimizer, scheduler and RNG states with
`torch.load(weights_only=True)`; Trainer's pickled arguments are never shipped (`NOT_RESUME_STATE`).
"""

import os
from pathlib import Path

from sqlalchemy import select

from app.db.session import session_scope
from app.db.tables import Checkpoint
from app.storage import get_store, resume_state_key, unpack_once
from worker.training import distributed
from worker.training.callbacks import NOT_RESUME_STATE


def last_checkpoint(job_id: str, workdir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the job's latest resumable checkpoint, unpacked under `workdir`; None if none."""
    with session_scope() as session:
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
        )
        for row in rows:
            archive = get_store().local_path(resume_state_key(row.storage_key))
            if archive.is_file():
                step, storage_key = row.step, row.storage_key
                break
        else:
            return None
    # Each archive is unpacked atomically into this attempt's own folder, then the two are joined (hard
    # links, no copies) into the folder Trainer resumes from; it finds the step in that folder's name.
    # Each rank of a multi-device job unpacks its own copy: Trainer reads the folder as each rank starts.
    parts = workdir / ("resume" if distributed.world_size() == 1 else f"resume-rank-{distributed.rank()}")
    state = unpack_once(archive, parts / "state", model_id=job_id)
    model = unpack_once(get_store().local_path(storage_key), parts / "model", model_id=job_id)
    if distributed.world_size() == 1:  # unpacked: an object store's copies may go (the ranks share them)
        for key in (resume_state_key(storage_key), storage_key):
            get_store().evict(key)
    folder = parts / f"checkpoint-{step}"
    folder.mkdir()
    for path in [*state.iterdir(), *model.iterdir()]:
        if path.name in NOT_RESUME_STATE or not path.is_file():
            raise ValueError(f"checkpoint at step {step} holds what Tuneforge never writes: {path.name}")
        os.link(path, folder / path.name)
    return step, folder
