"""Trainer callbacks that report to Tuneforge: metrics events, checkpoints, and cooperative cancel."""

import os
import secrets
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from app.db.session import session_scope
from app.jobs import lifecycle
from app.jobs import service as job_service
from app.storage import get_store

# Files of a checkpoint folder that make up the model; optimizer state stays on the worker for resume.
# Trainer's timing figures among the eval_* logs: not metrics of the model.
EVAL_BOOKKEEPING = (
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_num_tokens",
    "eval_model_preparation_time",
)
MODEL_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json")


def pack_folder(folder: Path, names: list[str] | None = None) -> Path:
    """A .tar.gz of the folder's files (flat, at the archive root), written to a temp file."""
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz", prefix="tuneforge-pack-")
    os.close(fd)  # tarfile opens (and, unlike a passed file object, closes and flushes) the path itself
    with tarfile.open(tmp, "w:gz") as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file() and (names is None or path.name in names):
                archive.add(path, arcname=path.name)
    return Path(tmp)


class JobReporter(TrainerCallback):
    """Writes metrics every logging step, records checkpoints, and stops when the job is cancelled."""

    def __init__(self, *, job_id: str, attempt: int) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.stopped = False
        self.last_metrics: dict[str, Any] = {}
        self.last_eval_step = -1
        self._last_log = (time.monotonic(), 0)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        with session_scope() as session:
            owned = lifecycle.still_owned(session, job_id=self.job_id, attempt=self.attempt)
        if not owned:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = False
            # Not fenced: the user should see where a cancelled run stopped.
            with session_scope() as session:
                job_service.add_event(
                    session,
                    job_id=self.job_id,
                    message=f"Training stopped at step {state.global_step}.",
                    data={"step": state.global_step},
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
            )

    def _record_train_log(self, state, logs: dict) -> None:  # type: ignore[no-untyped-def]
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        then, tokens_before = self._last_log
        self._last_log = (now, tokens)
        data = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "train_loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_second": round((tokens - tokens_before) / max(now - then, 1e-6), 1),
            "train_mean_token_accuracy": logs.get("mean_token_accuracy"),
            # DPO: how often and by how much the policy prefers the preferred answer over the reference
            **{"train_" + k: logs[k] for k in ("rewards/accuracies", "rewards/margins") if k in logs},
        }
        data = {k: v for k, v in data.items() if v is not None}  # a task logs only its own metrics
        self.last_metrics.update(data)
        self.event(
            f"Step {state.global_step}/{state.max_steps}: training loss={logs['loss']:.4f}", data, "metrics"
        )

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.stopped or not folder.is_dir():
            return
        key = f"checkpoints/{self.job_id}/step-{state.global_step}.tar.gz"
        archive = pack_folder(folder, list(MODEL_FILES))
        try:
            get_store().put_file(key, archive)  # atomic: temp name, then rename
        finally:
            archive.unlink(missing_ok=True)
        metrics = {"step": state.global_step} | {
            k: v
            for k, v in self.last_metrics.items()
            if k in ("train_loss", "train_mean_token_accuracy") or k.startswith(("valid_", "train_rewards/"))
        }
        with session_scope() as session:
            lifecycle.record_checkpoint(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                checkpoint_id="ftckpt-" + secrets.token_hex(12),
                step=state.global_step,
                metrics=metrics,
                storage_key=key,
            )

    def event(self, message: str, data: dict, type: str = "message") -> None:
        with session_scope() as session:
            if lifecycle.still_owned(session, job_id=self.job_id, attempt=self.attempt):
                job_service.add_event(session, job_id=self.job_id, message=message, type=type, data=data)
