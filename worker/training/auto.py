"""`peft: auto`: on the worker that runs the job, pick full, LoRA or QLoRA by what fits its memory.

The plans are the estimate's own (app/estimate/planner.py), for this worker's device, so what
POST /v1/fine_tuning/estimate predicts is what a worker decides on. The choice and its reason are written
to the job's events.
"""

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from app.config import get_settings
from app.estimate import planner
from app.jobs.schemas import BASE_LEARNING_RATES
from worker.training.callbacks import JobReporter
from worker.training.sft import RunSpec

MEMINFO = Path("/proc/meminfo")


def worker_device() -> planner.Device:
    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_budget_bytes() -> int:
    """TUNEFORGE_WORKER_MEMORY_GB, else GPU 0's total memory, else the host's MemAvailable."""
    configured = get_settings().worker_memory_gb
    if configured:
        return int(configured * 2**30)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    match = re.search(r"^MemAvailable:\s+(\d+) kB", MEMINFO.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError("cannot read MemAvailable from /proc/meminfo; set TUNEFORGE_WORKER_MEMORY_GB")
    return int(match.group(1)) * 1024


def needs_by_method(
    profile: dict[str, Any], hp: dict[str, Any], *, task: str, device: planner.Device
) -> dict:
    """Planned bytes of auto's candidates; QLoRA only where the model has Linear layers to quantize."""
    candidates = [m for m in planner.AUTO_ORDER if m != "qlora" or profile.get("linear_modules")]
    return {
        m: planner.plan_method(profile, hp | {"peft": m}, peft=m, device=device, task=task).total
        for m in candidates
    }


def resolve_auto(spec: RunSpec) -> RunSpec:
    """A copy of the spec with `peft` and `learning_rate` resolved, the choice recorded as a job event."""
    hp = spec.hyperparameters
    budget = memory_budget_bytes()
    needs = needs_by_method(spec.profile, hp, task=spec.method["type"], device=worker_device())
    chosen, reason = planner.choose_auto(needs, budget)
    learning_rate = hp.get("learning_rate")
    if learning_rate is None:
        learning_rate = BASE_LEARNING_RATES[chosen] * float(hp.get("learning_rate_multiplier") or 1.0)
    resolved = hp | {"peft": chosen, "learning_rate": learning_rate}
    task = spec.method["type"]
    # The manifest records spec.method: it should say what trained, not 'auto'.
    method = spec.method | {task: spec.method[task] | {"hyperparameters": resolved}}
    JobReporter(job_id=spec.job_id, attempt=spec.attempt).event(
        reason, {"chosen": chosen, "budget_bytes": budget, "needs": needs, "learning_rate": learning_rate}
    )
    return replace(spec, hyperparameters=resolved, method=method)
