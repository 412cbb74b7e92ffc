"""How long building `tiny-llama` takes (`tuneforge models make-tiny`), and how big it is.

    .venv/bin/python bench/tiny_model.py [--repeats 3]

The test suite builds it once and trains on it dozens of times; the README says it is built in seconds.
Times `make_tiny_llama` (tokenizer and random weights, saved as safetensors): the first build in this
fresh process, which includes importing torch and transformers, then the median of `--repeats` more.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import transformers

from worker.training.base_models import inspect_model, make_tiny_llama


def build_seconds(folder: Path) -> float:
    began = time.perf_counter()
    make_tiny_llama(folder, seed=0)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()
    home = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    first = build_seconds(home / "tiny-first")
    seconds = [build_seconds(home / f"tiny-{i}") for i in range(args.repeats)]
    profile = inspect_model(home / "tiny-first")
    size_mb = sum(path.stat().st_size for path in (home / "tiny-first").iterdir()) / 1e6
    print(f"tiny-llama: {profile['total_parameters']:,} parameters, {size_mb:.1f} MB on disk")
    print(f"first build, imports included  {first:.2f} s")
    each = ", ".join(f"{s:.2f}" for s in seconds)
    print(f"later builds, median           {statistics.median(seconds):.2f} s  ({each})")


if __name__ == "__main__":
    main()
