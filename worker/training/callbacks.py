"""Trainer callbacks that report to Tuneforge: metrics events, progress, checkpoints, and cooperative stops.

Each training step writes a `metrics` event (train_loss, learning rate, grad_norm, ...) and the job's
progress: its step, and when it should finish at the pace this attempt has trained so far. A validation
pass writes a `metrics` event of its own for the step it ran at (valid_loss, ...; no train_loss).

A run stops at the end of a step when its job is cancelled (no checkpoint) or paused (checkpoint first),
and when `PREEMPTED` is set (the worker is shutting down: checkpoint first, then the job is re-queued).
A checkpoint folder Trainer writes is removed from the work folder once it is in the artifact store
(resume reads from the store), and the store keeps only the job's newest `keep_checkpoints`.
"""

import contextlib
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from transformers import TrainerCallback

from app.config import get_settings
from app.db.session import session_scope, statement_scope
from app.jobs import lifecycle
from app.storage import get_store, resume_state_key
from worker.training import distributed

log = logging.getLogger(__name__)
# Set by the training process's SIGTERM handler: save a checkpoint at the end of this step, then stop.
PREEMPTED = threading.Event()
# The job's status, read at the end of a step, as a reason to stop (worker/training/distributed.py).
STOP_REASONS = {"paused": distributed.PAUSED, "cancelled": distributed.CANCELLED}

# Trainer's timing figures among the eval_* logs: not metrics of the model.
EVAL_BOOKKEEPING = (
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_num_tokens",
    "eval_model_preparation_time",
)
# Files of a checkpoint folder that make up the model: the checkpoint users download.
MODEL_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json")
# Trainer writes its arguments as a pickle; resuming never reads it, so it never leaves the worker.
NOT_RESUME_STATE = ("training_args.bin",)


def pack_folder(folder: Path, names: list[str] | None = None, *, compress: bool = True) -> Path:
    """A .tar.gz (or plain .tar) of the folder's files, flat at the archive root, written to a temp file.

    The caller removes the file; if packing fails (a full disk), nothing is left behind.
    """
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz" if compress else ".tar", prefix="tuneforge-pack-")
    os.close(fd)  # tarfile opens (and, unlike a passed file object, closes and flushes) the path itself
    # gzip's fastest level: SmolLM2-135M's 513 MiB of weights took 71.5 s at tarfile's default (9) and
    # 7.3 s at 1, for an archive 6% larger (268 MiB against 253); a full fine-tune packs one per checkpoint.
    options = {"compresslevel": 1} if compress else {}
    try:
        with tarfile.open(tmp, "w:gz" if compress else "w", **options) as archive:  # type: ignore[call-overload]
            for path in sorted(folder.iterdir()):
                if path.is_file() and (names is None or path.name in names):
                    archive.add(path, arcname=path.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


class JobReporter(TrainerCallback):
    """Writes metrics every logging step, records checkpoints, and stops when asked to (see the module)."""

    def __init__(self, *, job_id: str, attempt: int) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.stopped = False
        self.keeps_checkpoint = False  # stopped with a checkpoint saved: paused or preempted
        self.saved_steps: set[int] = set()
        self.last_metrics: dict[str, Any] = {}
        self.last_eval_step = -1
        self._last_log = (time.monotonic(), 0)
        self._attempt_began = (time.monotonic(), 0)  # when, and at which step (a resumed one), it began
        self._last_step_logged = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._attempt_began = (time.monotonic(), state.global_step)  # Trainer has restored a resumed step
        return control

    def seconds_to_last_step(self) -> float:
        """From the start of this attempt's training to its last step's log: its steps, without what Trainer
        does after the last one (the checkpoint it saves there)."""
        return max(self._last_step_logged - self._attempt_began[0], 0.0)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        try:
            with session_scope() as session:
                status = lifecycle.attempt_status(session, job_id=self.job_id, attempt=self.attempt)
        except SQLAlchemyError:  # the database is away: go on; the worker stops us if the lease runs out
            log.warning("could not read the job's status; training on", exc_info=True)
            status = "running"
        # Ranks of one job stop at the same step, for the weightiest reason any of them saw.
        reason = distributed.agree(
            STOP_REASONS.get(status, distributed.CANCELLED)
            if status != "running"
            else (distributed.PREEMPTED if PREEMPTED.is_set() else distributed.RUNNING)
        )
        if reason == distributed.RUNNING:
            return control
        status = {distributed.PAUSED: "paused", distributed.CANCELLED: "cancelled"}.get(reason, "running")
        if reason == distributed.PREEMPTED:
            PREEMPTED.set()
        self.stopped = True
        self.keeps_checkpoint = status in ("running", "paused")
        control.should_training_stop = True
        control.should_save = self.keeps_checkpoint
        step = state.global_step
        if PREEMPTED.is_set() and status == "running":
            message = f"The worker is shutting down: saving a checkpoint at step {step} to resume from."
        elif status == "paused":
            message = f"Job paused at step {step}; saving a checkpoint to resume from."
        else:
            message = f"Training stopped at step {step}."
        # The user should see where a cancelled, paused or preempted run stopped. An attempt that lost the
        # job (superseded, or re-queued when its lease ran out) is fenced off: it writes nothing.
        if not distributed.is_leader():
            return control
        with session_scope() as session:
            lifecycle.add_attempt_event(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                statuses=("running", "paused", "cancelled"),
                message=message,
                data={"step": step},
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        logs = logs or {}
        if "loss" in logs:
            self._record_train_log(state, logs)
        if "eval_loss" in logs:
            # Every eval_* metric (loss, and a recipe's own: accuracy, F1, DPO rewards) becomes valid_*.
            valid = {
                "valid_" + key.removeprefix("eval_"): value
                for key, value in logs.items()
                if key.startswith("eval_") and key not in EVAL_BOOKKEEPING
            }
            self.last_metrics.update(valid)
            self.last_eval_step = state.global_step
            self.event(
                f"Step {state.global_step}: validation loss={logs['eval_loss']:.4f}",
                {"step": state.global_step} | valid,
                "metrics",
                pausing_too=True,
            )

    def _record_train_log(self, state, logs: dict) -> None:  # type: ignore[no-untyped-def]
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        then, tokens_before = self._last_log
        self._last_log = (now, tokens)
        self._last_step_logged = now
        data = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "train_loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round((tokens - tokens_before) / max(now - then, 1e-6), 1),
            "train_mean_token_accuracy": logs.get("mean_token_accuracy"),
            # DPO: how often and by how much the policy prefers the preferred answer over the reference
            **{"train_" + k: logs[k] for k in ("rewards/accuracies", "rewards/margins") if k in logs},
        }
        data = {k: v for k, v in data.items() if v is not None}  # a task logs only its own metrics
        self.last_metrics.update(data)
        self.event(
            f"Step {state.global_step}/{state.max_steps}: training loss={logs['loss']:.4f}",
            data,
            "metrics",
            pausing_too=True,
            progress=self._progress(state, now),
        )

    def _progress(self, state, now: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """The step reached, and the seconds left at the pace of this attempt's steps so far."""
        began, first_step = self._attempt_began
        per_step = (now - began) / max(state.global_step - first_step, 1)
        steps_left = max(state.max_steps - state.global_step, 0)
        return {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "seconds_left": steps_left * per_step,
        }

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Every rank has written its part (its RNG state) before the leader packs the folder; the others
        # go on to the next step, where they wait for the leader.
        distributed.wait_for_all()
        if not distributed.is_leader():
            return
        try:
            if (self.stopped and not self.keeps_checkpoint) or not folder.is_dir():
                return
            if state.global_step in self.saved_steps:  # a stop mid-epoch saves, and so may the epoch's end
                return
            self.saved_steps.add(state.global_step)
            self._store_checkpoint(folder, state.global_step)
        finally:
            # In the store (or failed, and the attempt ends): the work folder's copy is never read again.
            shutil.rmtree(folder, ignore_errors=True)

    def _store_checkpoint(self, folder: Path, step: int) -> None:
        """Both archives into the store (each written atomically), then the row that points at them."""
        # Per attempt: a superseded attempt that still runs can never overwrite the live one's files.
        key = f"checkpoints/{self.job_id}/attempt-{self.attempt}/step-{step}.tar.gz"
        state_files = [p.name for p in folder.iterdir() if p.name not in NOT_RESUME_STATE + MODEL_FILES]
        archives = ((resume_state_key(key), state_files), (key, list(MODEL_FILES)))
        stored: list[str] = []
        try:
            for archive_key, names in archives:
                archive = pack_folder(folder, names, compress=archive_key == key)
                try:
                    get_store().put_file(archive_key, archive)  # atomic: temp name, then rename
                    stored.append(archive_key)
                finally:
                    archive.unlink(missing_ok=True)
        except BaseException:
            # Half a checkpoint is never resumed from: free its room (a full disk is the usual cause, and
            # the run's log, on the same disk, still has to say so).
            for archive_key in stored:
                with contextlib.suppress(Exception):
                    get_store().delete(archive_key)
            raise
        metrics = {"step": step} | {
            k: v
            for k, v in self.last_metrics.items()
            if k in ("train_loss", "train_mean_token_accuracy") or k.startswith(("valid_", "train_rewards/"))
        }
        # Evaluation always covers the whole validation set: OpenAI names such a pass's figures full_valid_*.
        if self.last_eval_step == step:
            metrics |= {
                "full_" + k: self.last_metrics[k]
                for k in ("valid_loss", "valid_mean_token_accuracy")
                if k in self.last_metrics
            }
        try:
            with session_scope() as session:
                recorded = lifecycle.record_checkpoint(
                    session,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    checkpoint_id="ftckpt-" + secrets.token_hex(12),
                    step=step,
                    metrics=metrics,
                    storage_key=key,
                    keep=get_settings().keep_checkpoints,
                )
        except SQLAlchemyError:  # the files stay in the store; without a row no resume ever uses them
            log.warning("could not record the checkpoint at step %s", step, exc_info=True)
            return
        if not recorded:  # this attempt lost the job: no row will ever name these archives
            for archive_key, _ in archives:
                get_store().delete(archive_key)

    def event(
        self,
        message: str,
        data: dict,
        type: str = "message",
        *,
        pausing_too: bool = False,
        progress: dict[str, Any] | None = None,
    ) -> None:
        """Record an event while this attempt owns the job; lost, not fatal, while the database is away.

        `pausing_too` records it while the job is paused as well: a step's metrics, since the step a pause
        stops at is trained and checkpointed, and the resumed run continues after it. `progress` (the
        arguments of `lifecycle.record_progress`) goes on the job's row once the event is written, in a
        statement of its own (see app/db/session.py `statement_scope`).
        """
        log.info(message)  # into the run's log too, timed: followers of /logs see each step as it ends
        if not distributed.is_leader():  # one job, one account of it: the leader's
            return
        try:
            with session_scope() as session:
                written = lifecycle.add_attempt_event(
                    session,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    statuses=("running", "paused") if pausing_too else ("running",),
                    message=message,
                    type=type,
                    data=data,
                )
            if written and progress is not None:
                with statement_scope() as session:
                    lifecycle.record_progress(session, job_id=self.job_id, attempt=self.attempt, **progress)
        except SQLAlchemyError:
            log.warning("could not record event %r", message, exc_info=True)
