"""Starts the training process of one job attempt and tells the worker when it is gone.

Each attempt trains in a process of its own, so a crash or out-of-memory in training never takes the
worker down, and the worker itself never imports torch.

Without a GPU, training processes are forked from a template process that has imported torch,
transformers, peft and trl once (multiprocessing's forkserver with those modules preloaded): a job starts
at once instead of after the ~7 s those imports take. CUDA cannot be used in a process forked after it was
initialised, and bitsandbytes initialises it on import, so on a GPU machine every run starts in a fresh
interpreter instead (spawn), where the imports are small next to the training.
"""

import ctypes
import multiprocessing
import os
import resource
import select
import signal
import sys
import threading
from functools import cache
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path

from app.config import get_settings, gpu_present
from worker.train_job import EXIT_DISK_FULL, EXIT_PREEMPTED, RECIPES

# What the template process imports once (an import that fails there only costs the head start).
PRELOAD = ["worker.template", "worker.train_job", *RECIPES.values()]


@cache
def _context() -> BaseContext:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time: set before the template imports
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preload = get_settings().preload_training
    if not (preload if preload is not None else not gpu_present()):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def warm_up() -> None:
    """Start the template process now (it imports in the background), so the first job need not wait."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def wait_until_ready() -> None:
    """Return once a training process can start at once, so that no job's lease runs out before it does.

    A fork asked of a template still importing waits for those imports (about 7 s, longer on a busy
    machine): a worker that took a job as it started would spend that much of the job's lease on it.
    A process that does nothing, started and reaped, costs a fork (about 30 ms) once the template is up.
    """
    if _context().get_start_method() == "forkserver":
        probe = _context().Process(target=_nothing, name="template-ready")  # type: ignore[attr-defined]
        probe.start()
        probe.join()


def _nothing() -> None:
    """What the readiness probe runs."""


class TrainingProcess:
    """One attempt's training process.

    It counts as exited only once the kernel says it is gone (a pidfd), not when the template process
    reports an exit code: if the template dies first, that report says 255 while the run may go on, and
    the worker must never start another attempt beside it.
    """

    def __init__(self, job_id: str, attempt: int, log_path: Path, gpus: int = 1) -> None:
        settings = get_settings()
        self.process: BaseProcess = _context().Process(  # type: ignore[attr-defined]
            target=_train,
            args=(job_id, attempt, str(log_path), settings.training_memory_limit_mb, os.getpid(), gpus),
            name=f"train-{job_id}-{attempt}",
        )
        self.process.start()
        self._gone = _pidfd(self.process.pid)

    def wait(self, timeout: float | None) -> int | None:
        """The exit code (negative: killed by that signal) once it is gone, or None after `timeout` s."""
        if self._gone is not None:
            if not select.select([self._gone], [], [], timeout)[0]:
                return None
            self.process.join()
        else:
            self.process.join(timeout)
        code = self.process.exitcode
        if code is not None and self._gone is not None:
            os.close(self._gone)
            self._gone = None
        return code

    def stop(self) -> None:
        """Ask the run to save a checkpoint at the end of its step and exit (see worker/train_job.py)."""
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()
        self.wait(None)


def _pidfd(pid: int | None) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux 5.3+); None where there is none."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:  # already exited and reaped: its exit code is on the way
        return None


def _train(
    job_id: str, attempt: int, log_path: str, memory_limit_mb: int, worker_pid: int, gpus: int = 1
) -> None:
    """The training process: named after its job, dies with its worker, capped, its output in `log_path`;
    for a job on several devices, the launcher of its ranks (`_train_group`)."""
    from setproctitle import setproctitle

    setproctitle(f"tuneforge train {job_id} attempt {attempt}")  # what `ps` shows
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the template ignores it (worker/template.py)
    _die_with(worker_pid)
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    # Each line reaches the file as it is printed (a follower of the log sees it at once, and a killed run
    # loses none): Python buffers a redirected stdout in blocks.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if gpus > 1:
        sys.exit(_train_group(job_id, attempt, gpus, worker_pid))
    from worker.train_job import main

    sys.exit(main(job_id, attempt))


def _train_group(job_id: str, attempt: int, gpus: int, worker_pid: int) -> int:
    """Run the job as `gpus` ranks started by torchrun's launcher (torch.distributed.elastic), forked
    from this process; returns the leader's exit code.

    A rank that dies or fails takes the group down (the launcher stops the others; no restarts), and the
    attempt ends like any crashed one. SIGTERM, the worker's request to checkpoint and stop, is passed to
    every rank; they agree on the step to stop at (worker/training/distributed.py). The launcher runs in a
    thread so that its own signal handling, which would stop the ranks at once, stays out of the way.
    """
    import threading

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from app.services import free_port

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=gpus,
        run_id=f"{job_id}-{attempt}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="fork",  # from this process, which has imported torch and co. already
    )
    outcome: dict[str, object] = {}

    def launch() -> None:
        try:
            outcome["codes"] = elastic_launch(config, _rank)(job_id, attempt, worker_pid)
        except BaseException as error:  # ChildFailedError names each failed rank and how it ended
            outcome["error"] = error

    signal.signal(signal.SIGTERM, lambda *_: _signal_children(signal.SIGTERM))
    launcher = threading.Thread(target=launch, name="rank-launcher")
    launcher.start()
    while launcher.is_alive():
        launcher.join(0.5)
    if "error" in outcome:
        # A rank that does not finish exits at once with its code (`_rank`): the leader's says how the
        # attempt ended (stopped with a checkpoint, disk full, failed); a rank killed by a signal, a crash.
        failures = getattr(outcome["error"], "failures", {})
        first = failures.get(0) or next(iter(failures.values()), None)
        code = first.exitcode if first is not None else 1
        if code not in (EXIT_PREEMPTED, EXIT_DISK_FULL):
            print(f"The group of {gpus} ranks failed: {outcome['error']}", flush=True)
        return code if code > 0 else 1
    codes = outcome["codes"]
    assert isinstance(codes, dict)
    return int(codes.get(0, 1))


def _rank(job_id: str, attempt: int, worker_pid: int) -> int:
    """One rank of a multi-device job."""
    from setproctitle import setproctitle

    from worker.train_job import main

    setproctitle(f"tuneforge train {job_id} attempt {attempt} rank {os.environ.get('RANK')}")
    _die_with(worker_pid)
    code = main(job_id, attempt)
    if code != 0:
        # Not the launcher's return path, which waits until it has read every rank's value and so, when
        # another rank has died, until it kills this one 30 s later: the launcher reads the exit code.
        sys.stdout.flush()
        os._exit(code)
    return code


def _signal_children(signum: int) -> None:
    """Send `signum` to this process's children (the ranks)."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                os.kill(int(child), signum)
            except ProcessLookupError:
                pass


def _die_with(worker_pid: int) -> None:
    """SIGKILL this process as soon as the worker is gone, however it went.

    A forked run's parent is the template process, which outlives a killed worker while runs hold it,
    so the parent-death signal alone would not fire; a pidfd on the worker does.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    worker = _pidfd(worker_pid)
    if worker is None:
        if hasattr(os, "pidfd_open"):  # the worker died before this process started
            os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        select.select([worker], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-worker", daemon=True).start()
