"""Peak memory of a training run, measured the way the memory plan counts it.

On a GPU that is torch's peak allocation during training. On a CPU it is the process's peak resident
set (VmHWM) during training, above the resident set just before the model was loaded: the imported
libraries are not the run's memory, and neither is the transient page cache of reading the checkpoint
file while loading. Linux lets a process reset its own VmHWM (writing 5 to /proc/self/clear_refs).

Nor are the pages of shared libraries (.so files) that become resident during the run: code runs for
the first time, or, in a process forked from the preloaded template (worker/launcher.py), code the
template already ran is mapped into this process anew. Their growth is taken off the peak.
"""

import ctypes
import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_SMAPS = Path("/proc/self/smaps")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _library_kib() -> int:
    """Resident KiB of this process's shared-library mappings (0 where /proc/self/smaps is missing)."""
    total, in_library = 0, False
    try:
        lines = _SMAPS.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range, perms, offset, dev, inode, path
            in_library = len(fields) > 5 and ".so" in Path(fields[5]).name
        elif in_library and fields[0] == "Rss:":
            total += int(fields[1])
    return total


class MemoryMeter:
    """`start()` before loading the model, `training_starts()` after, `peak_mb()` after training."""

    def __init__(self) -> None:
        self.baseline_kib = 0
        self.library_kib = 0

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
        self.library_kib = _library_kib()

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
        if peak is None:
            return None
        libraries = max(0, _library_kib() - self.library_kib)
        return round((peak - self.baseline_kib - libraries) / 1024, 1)
