"""What several benchmarks share: how a spread of ratios is printed, and a job's spec for in-process runs."""

import statistics
from pathlib import Path
from typing import Any


def spread(values: list[float]) -> str:
    """min / median / max of ratios, as BENCHMARKS.md gives each one."""
    return " / ".join(f"{v:.2f}x" for v in (min(values), statistics.median(values), max(values)))


def supervised_spec(
    folder: Path, profile: dict, hp: dict, *, training_file: Path, workdir: Path, base_model: str = ""
) -> Any:
    """The RunSpec the worker would build for a supervised job with these hyperparameters, for a run of the
    recipe's pieces in this process."""
    from worker.training.sft import RunSpec

    return RunSpec(
        job_id="bench",
        attempt=1,
        base_model=base_model or folder.name,
        base_model_path=folder,
        linear_modules=profile["linear_modules"],
        profile=profile,
        hyperparameters=hp,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        seed=0,
        training_file=training_file,
        training_file_id="file-bench",
        validation_file=None,
        validation_file_id=None,
        workdir=workdir,
    )
