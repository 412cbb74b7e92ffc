"""Memory and time of validating an upload, measured in fresh processes against the old way.

    .venv/bin/python bench/upload_validation.py [--mb 200] [--line-mb 21]

Builds a valid chat JSONL file of about `--mb` MB in a temp folder and validates it as an upload is
validated (`validate_training_file` reading the spooled file, with the API's line cap). The reference
is the old way: the whole file read into memory, split into lines, then the same checks on each line.
Each run is a fresh interpreter (Linux): the peak resident set is reset just before validating
(/proc/self/clear_refs), so its peak (VmHWM) minus its resident set then (VmRSS) is what validation itself
cost. The streaming run is repeated under tracemalloc for the Python heap's peak. A second file holds one
`--line-mb` MB line of many small messages (the case that cost +556 MB in the API before): the streaming
validator refuses it as `line_too_long` without holding it, where the old way parsed it whole.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from app.config import get_settings
from app.files import validation
from app.files.validation import validate_training_file

BUDGET_MB = 64  # issue 11: a 200 MB valid file may raise peak memory by at most this much
WORDS = "the a model learns from each example line by line while memory stays flat and small".split()


def build_file(path: Path, megabytes: int) -> int:
    """A valid chat file of about `megabytes` MB with examples of varied length; returns the count."""
    rng = random.Random(0)
    target, written, count = megabytes << 20, 0, 0
    with path.open("w") as out:
        while written < target:
            words = rng.choice((8, 40, 200, 1500))  # mostly short, now and then a long answer
            example = {
                "messages": [
                    {"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=12))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words))},
                ]
            }
            written += out.write(json.dumps(example) + "\n")
            count += 1
    return count


def build_capped_file(path: Path, megabytes: int, cap: int) -> int:
    """A valid file of lines just under the cap, each with as many small messages as the limits allow."""
    small = json.dumps({"role": "user", "content": "hi"})
    many = ", ".join([small] * (validation.MAX_ARRAY_LENGTH - 1))
    head, tail = '{"messages": [' + many + ', {"role": "assistant", "content": "', '"}]}\n'
    line = head + "a" * (cap - len(head) - len(tail) + 1) + tail
    count = (megabytes << 20) // len(line)
    with path.open("w") as out:
        for _ in range(count):
            out.write(line)
    return count


def build_long_line(path: Path, megabytes: int) -> None:
    message = '{"role": "user", "content": "hi"}, '
    body = message * ((megabytes << 20) // len(message))
    path.write_text('{"messages": [' + body + '{"role": "assistant", "content": "ok"}]}\n')


def old_way(path: Path) -> dict:
    """What upload validation did before: read it all, split it, then the same checks on each line."""
    data = path.read_bytes()
    file_format, examples, code = None, 0, None
    for raw in data.split(b"\n"):
        text = raw.decode("utf-8")
        if not text.strip():
            continue
        try:
            file_format = validation._check_example(json.loads(text), file_format)
            examples += 1
        except validation._Invalid as problem:
            code = code or problem.code
    return {"examples": examples, "code": code}


def streaming(path: Path) -> dict:
    with path.open("rb") as spooled:
        report = validate_training_file(spooled, max_line_bytes=get_settings().max_line_kb << 10)
    return {"examples": report.example_count, "code": report.errors[0].code if report.errors else None}


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(way: str, path: Path, traced: bool) -> None:
    """In a fresh process: validate once and print what it cost as JSON."""
    run = {"old": old_way, "streaming": streaming}[way]
    if traced:
        tracemalloc.start()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident set
    before = _status_kb("VmRSS")
    began = time.perf_counter()
    result = run(path)
    seconds = time.perf_counter() - began
    peak = _status_kb("VmHWM")
    traced_peak = tracemalloc.get_traced_memory()[1] if traced else 0
    cost = {"rss_mb": (peak - before) / 1024, "heap_mb": traced_peak / 2**20, "s": seconds}
    print(json.dumps(result | cost))


def child(way: str, path: Path, traced: bool = False) -> dict:
    command = [sys.executable, __file__, "--measure", way, str(path)] + (["--traced"] if traced else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(label: str, size_mb: float, way: str, figures: dict, heap_mb: float | None = None) -> None:
    heap = f", Python heap peak {heap_mb:.1f} MB" if heap_mb is not None else ""
    outcome = figures["code"] or f"{figures['examples']:,} examples accepted"
    grew = figures["rss_mb"]
    print(
        f"{label:8} {way:9} peak RSS +{grew:6.1f} MB ({grew / size_mb:5.2f}x the file){heap}, "
        f"{figures['s']:6.2f} s ({size_mb / figures['s']:5.1f} MB/s): {outcome}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200, help="size of the valid file")
    parser.add_argument("--line-mb", type=int, default=21, help="size of the one-line file")
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]), args.traced)
        return
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as folder:
        valid, long_line = Path(folder) / "valid.jsonl", Path(folder) / "one-line.jsonl"
        capped = Path(folder) / "capped.jsonl"
        cap = get_settings().max_line_kb << 10
        count = build_file(valid, args.mb)
        capped_count = build_capped_file(capped, args.mb, cap)
        build_long_line(long_line, args.line_mb)
        valid_mb, capped_mb, line_mb = (p.stat().st_size / 2**20 for p in (valid, capped, long_line))
        print(f"valid file {valid_mb:.1f} MB, {count:,} chat examples")
        print(
            f"capped file {capped_mb:.1f} MB, {capped_count:,} examples of {cap >> 10} KB and 10,000 messages"
        )
        print(f"one-line file {line_mb:.1f} MB; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
        new = child("streaming", valid)
        report("valid", valid_mb, "streaming", new, child("streaming", valid, traced=True)["heap_mb"])
        old = child("old", valid)
        report("valid", valid_mb, "old way", old)
        report("capped", capped_mb, "streaming", child("streaming", capped))
        report("capped", capped_mb, "old way", child("old", capped))
        report("one line", line_mb, "streaming", child("streaming", long_line))
        report("one line", line_mb, "old way", child("old", long_line))
        verdict = "within" if new["rss_mb"] <= BUDGET_MB else "OVER"
        print(
            f"valid file: streaming peak growth {new['rss_mb']:.1f} MB, {verdict} the {BUDGET_MB} MB budget"
        )
        print(f"old / streaming time: {old['s'] / new['s']:.2f}x")


if __name__ == "__main__":
    main()
