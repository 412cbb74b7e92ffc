"""What the training process of one job attempt runs (`main`).

worker/launcher.py starts one per attempt, so a crash or OOM in training never takes the worker down;
`python -m worker.train_job JOB_ID ATTEMPT` runs an attempt by hand.
It resolves the job into a RunSpec, runs the recipe, publishes the result and marks the job, every write
fenced by the attempt number. A later attempt resumes from the job's last complete checkpoint.

SIGTERM (the worker shutting down, or the whole process group stopped) makes the run save a checkpoint
at the end of its current step and exit with `EXIT_PREEMPTED`; the worker then re-queues the job.
A disk that fills up (while writing a checkpoint or the model) exits with `EXIT_DISK_FULL`, and the
worker re-queues the job too, counting the attempt: the database is not on that disk, the worker is.
"""

import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING

from app import logs
from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import Job, TrainingFile
from app.files import service as file_service
from app.jobs import lifecycle
from app.jobs import service as job_service
from app.jobs.schemas import hyperparameters_of
from app.models import service as model_service
from app.storage import get_store
from worker.training import distributed

if TYPE_CHECKING:
    from worker.training.sft import RunResult, RunSpec

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint saved; run the job again later
EXIT_DISK_FULL = 74  # EX_IOERR: a write found no space left; run the job again once there is
DISK_FULL = "disk full: "  # starts the line that names the write, in the log of a run exiting EXIT_DISK_FULL
# How writes that found no space surface without an OSError: safetensors (Rust) names the errno in its
# message; torch.save reports a short write ("unexpected pos", "file write failed") and nothing more.
DISK_FULL_MESSAGES = ("no space left on device", "os error 28", "disk quota exceeded", "file write failed")
TORCH_SHORT_WRITE = ("inline_container", "unexpected pos")


def load_spec(job_id: str, attempt: int) -> "RunSpec":
    """Everything the recipe needs, read from the database (files are read in place from the store)."""
    from worker.training.resume import last_checkpoint
    from worker.training.sft import RunSpec

    store = get_store()
    workdir = get_settings().resolved_home / "work" / job_id / f"attempt-{attempt}"
    resume = last_checkpoint(job_id, workdir)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        base = model_service.get_base_model(session, model_id=job.model)
    # Outside the transaction: from an object store, a base model's first fetch on a host can take minutes.
    base_model_path = model_service.base_model_folder(base)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        training = session.get(TrainingFile, job.training_file)
        validation = session.get(TrainingFile, job.validation_file) if job.validation_file else None
        if training is None:
            raise FileNotFoundError(f"training file {job.training_file} was deleted")
        if (
            resume is not None
            and distributed.is_leader()
            and lifecycle.still_owned(session, job_id=job_id, attempt=attempt)
        ):
            job_service.add_event(
                session,
                job_id=job_id,
                message=f"Resuming from the checkpoint at step {resume[0]}.",
                data={"resumed_from_step": resume[0]},
            )
        return RunSpec(
            job_id=job.id,
            attempt=attempt,
            base_model=base.id,
            base_model_path=base_model_path,
            linear_modules=list(base.linear_modules or []),
            profile=base.profile or {},
            hyperparameters=hyperparameters_of(job.method),
            method=job.method,
            seed=job.seed,
            training_file=store.local_path(training.storage_key),
            training_file_id=training.id,
            validation_file=store.local_path(validation.storage_key) if validation else None,
            validation_file_id=validation.id if validation else None,
            workdir=workdir,
            resume_from=resume[1] if resume else None,
        )


def publish(job_id: str, attempt: int, result: "RunResult") -> str | None:
    """Upload the adapter archive, then mark the job succeeded and register its model in one transaction.

    The archive is keyed by attempt and only the winning conditional update points the model at it, so an
    attempt that was superseded while it packed can never replace the adapter that is served. Returns the
    model id, or None when this attempt no longer owns the job (its archive is then removed).
    A run that reported to TensorBoard ships its event files as a second results file, after the CSV.
    """
    from worker.training import tracking
    from worker.training.callbacks import pack_folder

    key = f"adapters/{job_id}/attempt-{attempt}.tar.gz"
    archive = pack_folder(result.output_dir)
    try:
        get_store().put_file(key, archive)
    finally:
        archive.unlink(missing_ok=True)
    # The recipe's output folder is in the attempt's work folder, where TensorBoard wrote its events.
    tensorboard = tracking.tensorboard_archive(result.output_dir.parent)
    tensorboard_id = file_service.new_file_id()
    with session_scope() as session:
        model_id = lifecycle.succeed(
            session,
            job_id=job_id,
            attempt=attempt,
            storage_key=key,
            trained_tokens=result.trained_tokens,
            result_files=[tensorboard_id] if tensorboard is not None else [],
        )
        if model_id is not None and tensorboard is not None:
            job = session.get(Job, job_id)
            assert job is not None  # succeed has just marked it
            file_service.add_results_file(
                session,
                project=job.project,
                file_id=tensorboard_id,
                filename=tracking.TENSORBOARD_RESULTS_NAME,
                content=tensorboard,
            )
    if model_id is None:
        get_store().delete(key)
    return model_id


# The recipe module of each task; each has `run(spec: RunSpec) -> RunResult`.
RECIPES = {
    "supervised": "worker.training.sft",
    "dpo": "worker.training.dpo",
    "classification": "worker.training.classify",
}


def run_recipe(spec: "RunSpec") -> "RunResult":
    """Resolve `peft: auto` on this worker, then run the task's recipe."""
    from worker.training import fast_path
    from worker.training.optimizers import check_runs_here

    check_runs_here(spec.hyperparameters)  # before the model loads: a paged optimizer on a CPU host fails
    fast_path.check_liger_runs_here(spec.hyperparameters)
    if spec.hyperparameters["peft"] == "auto":
        from worker.training.auto import resolve_auto

        spec = resolve_auto(spec)
    fast_path.tune_fused_lm_head(spec.hyperparameters)  # SFT's and DPO's loss head
    recipe = importlib.import_module(RECIPES[spec.method["type"]])
    return recipe.run(spec)


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """An error code and a message a user can act on."""
    text = f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, MemoryError) or any(
        s in str(exc).lower() for s in ("out of memory", "not enough memory", "can't allocate memory")
    ):
        return "out_of_memory", (
            f"{text}. Training ran out of memory: try a smaller batch_size (raise "
            "gradient_accumulation_steps to keep the effective batch) or max_seq_length, or a lighter "
            "method: lora, or qlora."
        )
    if isinstance(exc, FileNotFoundError):
        return "missing_artifact", text
    return "training_error", text


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from or while handling, is a write that found no space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in text for s in DISK_FULL_MESSAGES) or all(s in text for s in TORCH_SHORT_WRITE):
            return True
        current = current.__cause__ or current.__context__
    return False


def main(job_id: str, attempt: int) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logs.configure(run_log=True)  # Tuneforge's own lines, timed, into the run's log (worker/launcher.py)
    if not distributed.is_leader():  # the ranks share the log: the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    with logs.bound(job_id=job_id, attempt=attempt):
        return _run(job_id, attempt)


def _run(job_id: str, attempt: int) -> int:
    try:
        from worker.training.callbacks import PREEMPTED  # imports torch: a broken install fails the job

        signal.signal(signal.SIGTERM, lambda *_: PREEMPTED.set())
        spec = load_spec(job_id, attempt)
        spec.workdir.mkdir(parents=True, exist_ok=True)
        result = run_recipe(spec)
        if result.cancelled:
            return EXIT_PREEMPTED if PREEMPTED.is_set() else 0
        if distributed.is_leader():  # the other ranks of a multi-device job only train
            publish(job_id, attempt, result)
        return 0
    except Exception as exc:  # every failure becomes the job's error, never a silent crash
        full = disk_full(exc)
        if full:  # first, while the log's disk may still take a short line (the traceback is longer)
            with contextlib.suppress(OSError):
                # On a line of its own: the write that found the disk full may have cut the last one short.
                print(f"\n{DISK_FULL}{exc.__class__.__name__}: {exc}", flush=True)
        with contextlib.suppress(OSError):  # the log may be on the disk that is full
            traceback.print_exc()
        if distributed.lost_a_rank(exc):  # another rank died first: the launcher reports how
            return 1
        if full:  # not the job's fault: the worker re-queues it (see worker/runner.py)
            return EXIT_DISK_FULL
        code, message = classify_failure(exc)
        with session_scope() as session:
            lifecycle.fail(session, job_id=job_id, attempt=attempt, code=code, message=message)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
