"""The job's `optimizer` as transformers' Trainer names it, refused on a device that cannot run it.

`adamw` is torch's fused AdamW, what the Trainer uses when it is given no optimizer (so jobs from before
the choice existed train as they did); the 8-bit and paged ones are bitsandbytes' AdamW, and `adafactor`
is transformers' own, as the Trainer configures it (a fixed learning rate, no first moment).

bitsandbytes pages states through CUDA's unified memory. On a CPU it warns and runs the unpaged optimizer
instead; the API refuses a paged choice for a CPU deployment, and a worker that gets one anyway (a job
sent to a GPU queue and taken by a CPU host) fails the job rather than quietly train with another one.
"""

from typing import Any

from app.jobs.schemas import CUDA_ONLY_OPTIMIZERS

# Tuneforge's name -> transformers' OptimizerNames value (transformers 5.24).
TRAINER_OPTIM = {
    "adamw": "adamw_torch_fused",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
}


class OptimizerUnavailable(RuntimeError):
    """The job's optimizer cannot run on this worker's device."""


def optimizer_of(hp: dict[str, Any]) -> str:
    """The job's optimizer; jobs queued before the choice existed trained with AdamW."""
    return hp.get("optimizer", "adamw")


def check_runs_here(hp: dict[str, Any]) -> None:
    """Raise OptimizerUnavailable, naming the optimizer, if this worker's device cannot run it."""
    import torch

    optimizer = optimizer_of(hp)
    if optimizer in CUDA_ONLY_OPTIMIZERS and not torch.cuda.is_available():
        raise OptimizerUnavailable(
            f"optimizer '{optimizer}' pages its states with CUDA and this worker has no GPU; run the job "
            f"on a GPU worker, or with '{CUDA_ONLY_OPTIMIZERS[optimizer]}', the same optimizer unpaged"
        )


def trainer_optim(hp: dict[str, Any]) -> str:
    """TrainingArguments' `optim` for the job's optimizer (run_recipe has checked this device runs it)."""
    return TRAINER_OPTIM[optimizer_of(hp)]
