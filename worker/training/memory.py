"""Peak memory of a training run, measured the way the memory plan counts it.

On a GPU that is torch's peak allocation during training. On a CPU it is the process's peak resident
set (VmHWM) during training, above the resident set just before the model was loaded: the imported
libraries are not the run's memory, and neither is the transient page cache of reading the checkpoint
file while loading. Linux lets a process reset its own VmHWM (writing 5 to /proc/self/clear_refs).
"""

import ctypes
import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryMeter:
    """`start()` before loading the model, `training_starts()` after, `peak_mb()` after training."""

    def __init__(self) -> None:
        self.baseline_kib = 0

    def start(self, *, quantized: bool = False) -> None:
        if quantized:
            import bitsandbytes  # noqa: F401  # imported now: its libraries are not the run's memory
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        except OSError:
            pass  # not Linux, or not allowed: the peak then includes what ran before (an overestimate)
        self.baseline_kib = _status_kib("VmRSS") or 0

    def training_starts(self) -> None:
        """Measure the peak from here: the model is resident, loading's transient buffers are freed."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed loader buffers otherwise
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        """The run's peak memory in MiB, or None where this platform does not report it."""
        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak = _status_kib("VmHWM")
        return None if peak is None else round((peak - self.baseline_kib) / 1024, 1)
