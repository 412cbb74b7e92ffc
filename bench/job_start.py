"""How long a training process takes to start, printed as a ratio measured in one process.

    .venv/bin/python bench/job_start.py [--repeats 5]

A training process is ready once torch, transformers, peft, trl and the three recipes are imported.
"template" forks it from the process that imported them once (worker/launcher.py, the default without a
GPU, after the worker's warm-up); "fresh" starts a new interpreter that imports them (spawn, the GPU
default). Each start runs a process to that point and lets it exit; the time is from start to exit,
median of `--repeats` interleaved starts after one warm-up each.
"""

import argparse
import importlib
import multiprocessing
import os
import statistics
import time
from multiprocessing import forkserver

from worker.launcher import PRELOAD


def _ready() -> None:
    """What a training process imports before it trains (nothing new in a forked one)."""
    for name in PRELOAD:
        importlib.import_module(name)


def start_seconds(context: multiprocessing.context.BaseContext) -> float:
    began = time.perf_counter()
    process = context.Process(target=_ready)  # type: ignore[attr-defined]
    process.start()
    process.join()
    assert process.exitcode == 0, process.exitcode
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    template = multiprocessing.get_context("forkserver")
    template.set_forkserver_preload(PRELOAD)
    fresh = multiprocessing.get_context("spawn")
    forkserver.ensure_running()
    start_seconds(template)  # waits for the template's own imports: the worker's warm-up
    start_seconds(fresh)
    times: dict[str, list[float]] = {"template": [], "fresh": []}
    for _ in range(args.repeats):
        times["template"].append(start_seconds(template))
        times["fresh"].append(start_seconds(fresh))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:9} median {median[name]:.3f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"fresh / template: {median['fresh'] / median['template']:.1f}x")


if __name__ == "__main__":
    main()
