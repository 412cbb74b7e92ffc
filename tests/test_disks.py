"""Disks on a worker: nothing grows without bound, and a full disk is not a failed job; a pause waits.

The end-to-end tests run an API and a worker of their own (their own state folder and queue, the
session's database) whose artifact store is a small tmpfs mounted here, so the disk really fills up.
Mounting needs root, as the CI machine has; without it these tests fail (they never skip).
"""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_key
from tests.helpers import (
    all_events,
    api_process,
    chat_jsonl,
    checkpoint_steps,
    job_body,
    training_processes,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)

STORE_MB = 16
# The worker sees a cancel (or a pause) at its next heartbeat, and kills a cancelled run (before the fix,
# a paused one too) the grace period later. A paused run is waited for until the worker shuts down.
HEARTBEAT_SECONDS, GRACE_SECONDS, SHUTDOWN_GRACE_SECONDS = 0.25, 0.1, 1


def mount_tmpfs(folder: Path, size_kb: int) -> None:
    """A tmpfs of `size_kb` at `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], capture_output=True
    )
    assert done.returncode == 0, f"could not mount a tmpfs (these tests need root): {done.stderr!r}"


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted after the test."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, 256)
    try:
        yield folder
    finally:
        unmount(folder)


def test_writes_that_find_no_space_are_recognised_however_they_surface(tiny_disk: Path) -> None:
    """The training process tells a full disk from a failed job: an OSError, torch.save's short write,
    safetensors' error, and any of them raised from inside another error."""
    import torch
    from safetensors.torch import save_file

    from worker.train_job import disk_full

    tensors = {"w": torch.zeros(512, 512)}  # 1 MiB: more than the disk holds
    errors = []
    for write in (
        lambda: (tiny_disk / "a.bin").write_bytes(bytes(1 << 20)),
        lambda: torch.save(tensors, tiny_disk / "b.pt"),
        lambda: save_file(tensors, tiny_disk / "c.safetensors"),
    ):
        with pytest.raises(Exception) as failed:
            write()
        errors.append(failed.value)
    try:
        try:
            raise errors[0]
        except OSError as exc:
            raise RuntimeError("could not save the checkpoint") from exc
    except RuntimeError as wrapped:
        errors.append(wrapped)
    assert [disk_full(e) for e in errors] == [True] * 4, [repr(e) for e in errors]
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(RuntimeError("CUDA out of memory"))


def test_a_store_write_that_finds_the_disk_full_leaves_no_temp_file(tiny_disk: Path, tmp_path: Path) -> None:
    from app.storage import LocalArtifactStore
    from worker.training.callbacks import pack_folder

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(512 * 1024))
    store = LocalArtifactStore(tiny_disk / "store")
    with pytest.raises(OSError) as failed:
        store.put_file("checkpoints/ftjob-1/attempt-1/step-2.tar.gz", big)
    assert failed.value.errno == errno.ENOSPC
    assert [p.name for p in (tiny_disk / "store").rglob("*") if p.is_file()] == []

    source = tmp_path / "checkpoint-2"
    source.mkdir()
    (source / "optimizer.pt").write_bytes(os.urandom(512 * 1024))
    tempfile.tempdir = str(tiny_disk)  # where pack_folder writes its archive
    try:
        with pytest.raises(OSError):
            pack_folder(source, compress=False)
    finally:
        tempfile.tempdir = None
    assert list(tiny_disk.glob("tuneforge-pack-*")) == []


@dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    home: Path
    store: Path
    worker: subprocess.Popen | None = None
    filler: Path = field(init=False)

    def __post_init__(self) -> None:
        self.filler = self.store / "filler"

    def start_worker(self) -> None:
        """`tuneforge worker`, in a process group of its own (with the template it forks runs from)."""
        with (self.home / "worker.log").open("ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def fill(self, leave: int) -> None:
        """Fill the store's disk up to `leave` free bytes."""
        with self.filler.open("ab") as handle:
            handle.write(b"\0" * max(self.free() - leave, 0))
        assert self.free() <= leave + 4096

    def work(self, job_id: str) -> Path:
        """The job's work folder on the worker (one folder per attempt inside)."""
        return self.home / "work" / job_id

    def free(self) -> int:
        stat = os.statvfs(self.store)
        return stat.f_bavail * stat.f_frsize

    def leftovers(self) -> list[str]:
        """Temp files left in the store or the worker's temp folder."""
        store = [str(p) for p in self.store.rglob(".tmp-*")]
        return store + [str(p) for p in (self.home / "tmp").glob("tuneforge-pack-*")]


@pytest.fixture(scope="module")
def stack(database: str, tiny_model: str) -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="tuneforge-disks-"))
    store = home / "artifacts"
    mount_tmpfs(store, STORE_MB * 1024)
    (home / "tmp").mkdir()
    env = os.environ | {
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_ARTIFACT_DIR": str(store),
        "TUNEFORGE_QUEUE": f"disks-{uuid.uuid4().hex[:8]}",  # the session's worker never sees these jobs
        "TUNEFORGE_MAX_ATTEMPTS": "2",
        "TUNEFORGE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "TUNEFORGE_STOP_GRACE_SECONDS": str(GRACE_SECONDS),
        "TUNEFORGE_SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_SECONDS),
        "TUNEFORGE_INFERENCE_URL": "http://127.0.0.1:9",  # no inference here
        "TMPDIR": str(home / "tmp"),  # where archives are packed: checked for leftovers
    }
    try:
        with api_process(env, "api.log") as (url, _):
            result = Stack(url, make_key("disks"), env, home, store)
            result.start_worker()
            try:
                yield result
            finally:
                assert result.worker is not None
                with contextlib.suppress(ProcessLookupError):  # a test may have stopped it
                    os.killpg(result.worker.pid, signal.SIGKILL)  # the worker and its template process
                result.worker.wait()
    finally:
        unmount(store)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as c:
        yield c


def events_from(http: httpx.Client, job_id: str, starts: str) -> list[dict]:
    return [e for e in all_events(http, job_id) if e["message"].startswith(starts)]


def wait_until(condition, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


@dataclass
class BoundedJob:
    job: dict
    most_trainer_checkpoints: int  # checkpoint folders seen at once in the run's work folder
    work: Path


@pytest.fixture(scope="module")
def bounded_job(stack: Stack, http: httpx.Client) -> BoundedJob:
    """Five steps of tiny-llama with a checkpoint after each, its work folder watched as it runs."""
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], checkpoint_every_steps=1)
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    work = stack.home / "work" / job_id
    most, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                found = [
                    p for p in (work / "attempt-1" / "trainer").iterdir() if p.name.startswith("checkpoint-")
                ]
                most[0] = max(most[0], len(found))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        job = wait_for_status(http, job_id, {"succeeded", "failed"})
    finally:
        done.set()
        watcher.join()
    assert job["status"] == "succeeded", job
    return BoundedJob(job, most[0], work)


def test_checkpoints_and_work_folders_do_not_pile_up(
    stack: Stack, http: httpx.Client, bounded_job: BoundedJob
) -> None:
    """Item 12: Trainer's checkpoint folders go once stored, the work folder goes with the attempt, and the
    store keeps the newest three checkpoints (rows and archives) besides the final model."""
    job_id = bounded_job.job["id"]
    assert bounded_job.most_trainer_checkpoints <= 1, "Trainer checkpoint folders piled up"
    wait_until(lambda: not bounded_job.work.exists(), "the attempt's work folder was removed")
    assert checkpoint_steps(http, job_id) == [3, 4, 5]
    stored = stack.store / "checkpoints" / job_id / "attempt-1"
    expected = {f"step-{step}{ext}" for step in (3, 4, 5) for ext in (".state.tar", ".tar.gz")}
    assert {p.name for p in stored.iterdir()} == expected
    assert (stack.store / "adapters" / job_id / "attempt-1.tar.gz").is_file()
    assert stack.leftovers() == []


def checkpoint_footprint(stack: Stack, bounded_job: BoundedJob, *suffixes: str) -> int:
    """Bytes one checkpoint of the bounded job takes on the store's disk: both archives, or those named."""
    stored = stack.store / "checkpoints" / bounded_job.job["id"] / "attempt-1"
    return sum(
        p.stat().st_blocks * 512
        for s in suffixes or (".state.tar", ".tar.gz")
        for p in stored.glob(f"step-5{s}")
    )


@pytest.fixture
def small_store(stack: Stack) -> Iterator[Stack]:
    """The stack, its store's disk filled up by each test; emptied again however the test ends."""
    try:
        yield stack
    finally:
        stack.filler.unlink(missing_ok=True)


def test_a_full_store_requeues_the_attempt_and_it_resumes_once_there_is_room(
    small_store: Stack, http: httpx.Client, bounded_job: BoundedJob
) -> None:
    """Item 13: room for one checkpoint, not two: attempt 1 stores step 2, finds the disk full at step 4
    (after storing its first archive, which is removed again) and is re-queued with an event; with the
    disk freed, attempt 2 resumes from step 2 and succeeds. Every attempt's work folder goes when it
    ends, and so does one a killed worker left behind."""
    training = upload(http, chat_jsonl(40))
    left_behind = small_store.work(bounded_job.job["id"]) / "attempt-7" / "trainer" / "checkpoint-3"
    left_behind.mkdir(parents=True)
    (left_behind / "optimizer.pt").write_bytes(bytes(1024))
    # Room for one checkpoint and the next one's resume state (its first archive), not its model.
    state, model = (checkpoint_footprint(small_store, bounded_job, s) for s in (".state.tar", ".tar.gz"))
    small_store.fill(leave=state + model + state + model // 2)
    body = job_body(training["id"], checkpoint_every_steps=2)  # 5 steps: checkpoints at 2, 4 and the end
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    # Another project's job, queued behind it once the worker has taken this one (and while its run still
    # loads the model): once this project has started a job, the worker takes the other project's next
    # (app/jobs/routing.py), so the retry waits until the disk is freed. Queued before this job was taken,
    # the other would go first (this project ran the bounded job), and its log alone fills the disk.
    wait_until(lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] != "queued", "taken")
    other = httpx.Client(
        base_url=http.base_url, headers={"Authorization": f"Bearer {make_key('disks-other')}"}
    )
    other_training = upload(other, chat_jsonl(40))
    blocker = job_body(other_training["id"], n_epochs=50, batch_size=1, checkpoint_every_steps=10**6)
    blocker_id = other.post("/v1/fine_tuning/jobs", json=blocker).json()["id"]

    try:  # generous: on a loaded machine the other pytest-xdist worker may be training too
        full = wait_for_event(http, job_id, "The disk filled up", timeout=180)
    except TimeoutError:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        events = [e["message"] for e in all_events(http, job_id)]
        raise AssertionError(f"no disk-full event: {job} {events}") from None
    assert full["level"] == "warn" and "Retrying (attempt 1 of 2 used)" in full["message"], full
    run_log = small_store.store / "logs" / job_id / "attempt-1.log"
    assert "No space left on device" in full["message"], (
        f"the event names the write that failed; the run's log ends: {run_log.read_text()[-3000:]!r}"
    )
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["error"] is None, job
    assert checkpoint_steps(http, job_id) == [2]
    stored = small_store.store / "checkpoints" / job_id / "attempt-1"
    assert sorted(p.name for p in stored.iterdir()) == ["step-2.state.tar", "step-2.tar.gz"], (
        "the half-stored checkpoint at step 4 is removed"
    )
    assert small_store.leftovers() == [], "a write that found the disk full leaves no temp file"
    assert not small_store.work(bounded_job.job["id"]).exists(), "a finished job's work folder is removed"

    small_store.filler.unlink()
    other.post(f"/v1/fine_tuning/jobs/{blocker_id}/cancel")
    other.close()
    job = wait_for_status(http, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert events_from(http, job_id, "Resuming from the checkpoint at step 2")
    assert checkpoint_steps(http, job_id) == [2, 4, 5]
    wait_until(lambda: not small_store.work(job_id).exists(), "the work folders were removed")


def test_a_disk_that_stays_full_fails_the_job_with_disk_full_once_attempts_run_out(
    small_store: Stack, http: httpx.Client
) -> None:
    training = upload(http, chat_jsonl(16))
    small_store.fill(leave=16 * 1024)  # smaller than any checkpoint
    body = job_body(training["id"], checkpoint_every_steps=1)
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    job = wait_for_status(http, job_id, {"succeeded", "failed"})
    assert job["status"] == "failed" and job["attempt"] == 2, job
    assert job["error"]["code"] == "disk_full", job["error"]
    assert job["error"]["message"].startswith("The disk filled up")
    assert "used all 2 attempts" in job["error"]["message"]
    assert len(events_from(http, job_id, "The disk filled up")) == 1  # the re-queue of attempt 1
    assert checkpoint_steps(http, job_id) == []
    assert small_store.leftovers() == []
    wait_until(lambda: not small_store.work(job_id).exists(), "the work folders were removed")


def test_a_pause_waits_for_a_step_that_outlasts_the_grace_period(stack: Stack, http: httpx.Client) -> None:
    """Item 11: the training process is frozen mid-run (SIGSTOP: a step that takes as long as we like) and
    the job paused. The worker does not kill it when the grace period is over: it waits for the checkpoint
    the run announced until something else bounds the wait, here the worker's own shutdown, and then tells
    the user the pause was cut short (a message only that wait writes). A cancelled run frozen the same
    way is killed after the grace period: it keeps nothing."""
    training = upload(http, chat_jsonl(40))
    body = job_body(training["id"], n_epochs=10, batch_size=1, checkpoint_every_steps=10**6)  # 400 steps
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    wait_for_step(http, job_id, 2)
    [run] = training_processes(job_id)
    os.kill(run, signal.SIGSTOP)
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    assert stack.worker is not None
    stack.worker.send_signal(signal.SIGTERM)
    cut = wait_for_event(http, job_id, "The paused run was still in its step when the worker shut down")
    assert cut["level"] == "warn", cut
    wait_until(lambda: stack.worker is not None and stack.worker.poll() is not None, "the worker exited")
    assert stack.worker.returncode == 0, "the worker shut down cleanly"
    assert training_processes(job_id) == [], "the frozen run was killed at the end of the shutdown grace"
    assert checkpoint_steps(http, job_id) == []
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "paused"

    stack.start_worker()
    http.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    wait_for_event(http, job_id, "Fine-tuning job started (attempt 2")
    wait_until(lambda: training_processes(job_id), "attempt 2's run started")
    [run] = training_processes(job_id)
    os.kill(run, signal.SIGSTOP)
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    wait_until(lambda: not training_processes(job_id), "the frozen cancelled run was killed")
    assert not events_from(http, job_id, "Training stopped"), "it was killed, it did not stop on its own"
