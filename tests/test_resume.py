"""Resuming trains what an uninterrupted run trains: however a run stops (its worker SIGKILLed or
SIGTERMed, the job paused, the training process killed) and whatever the task (supervised, DPO,
classification, full fine-tuning), the resumed job's per-step losses equal those of the same job run
straight through. Pausing and resuming never uses up an attempt. Runs on a stack of its own
(`tests/stack.py`).

Each uninterrupted run is made once per module and shared by every test of the same job body. A fault
that must land mid-run strikes as soon as the test sees the run's first steps or first checkpoint, most
of the run still ahead; where the fault takes a while to reach the run (a pause read at the end of a
step, a stop signal the worker passes on), the run is frozen first (SIGSTOP: a step that lasts as long as
the test needs), so it cannot finish in between.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import (
    all_events,
    chat_jsonl,
    checkpoint_steps,
    is_training_step,
    job_body,
    training_processes,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)
from tests.stack import (  # noqa: F401 (fixtures)
    Stack,
    freeze_run,
    http,
    losses,
    no_workers_left,
    stack,
    wait_until,
)

# The supervised LoRA job every way of stopping is tried on: 40 chats, one a step, twice over (80 steps),
# a checkpoint every 10.
SFT_STEPS, EVERY = 80, 10
MAX_ATTEMPTS = 3  # the default, which the stack keeps
# Bounds on waits that only keep a broken run from hanging: a machine shared with other test runs can
# train 50 times slower than an idle one. No test decides on them.
STARTS, RUNS = 300, 600
Uninterrupted = Callable[[httpx.Client, dict], dict[int, float]]


def sft_body(training_file: str) -> dict:
    return job_body(training_file, n_epochs=2, batch_size=1, checkpoint_every_steps=EVERY)


@pytest.fixture(scope="module")
def chat_file(stack: Stack) -> str:
    """The supervised tests' training file, uploaded once: their job bodies, and so their reference, agree."""
    headers = {"Authorization": f"Bearer {stack.key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        return upload(client, chat_jsonl(40))["id"]


@pytest.fixture(scope="module")
def uninterrupted(stack: Stack) -> Uninterrupted:
    """Per-step losses of a job body run straight through, on the test's worker; each body runs once."""
    runs: dict[str, dict[int, float]] = {}

    def losses_of(http: httpx.Client, body: dict) -> dict[int, float]:
        key = json.dumps(body, sort_keys=True)
        if key not in runs:
            job = wait_for_status(http, create(http, body), {"succeeded", "failed"}, timeout=RUNS)
            assert job["status"] == "succeeded", job
            runs[key] = losses(all_events(http, job["id"]))
        return runs[key]

    return losses_of


def create(http: httpx.Client, body: dict) -> str:
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def assert_same_losses(events: list[dict], expected: dict[int, float]) -> None:
    """Same seed, same data: every step's loss equals the uninterrupted run's."""
    got = losses(events)
    assert sorted(got) == sorted(expected) == list(range(1, len(expected) + 1)), "a step's loss is missing"
    worst = max(abs(got[step] - expected[step]) for step in expected)
    assert worst <= 1e-4, f"resumed and uninterrupted losses differ by up to {worst}"


def resumed_from(events: list[dict]) -> list[int]:
    return [e["data"]["resumed_from_step"] for e in events if e["message"].startswith("Resuming from")]


def attempts(stack: Stack, job_id: str) -> tuple[int, int]:
    """(attempt, max_attempts) of a job."""
    [row] = stack.sql("SELECT attempt, max_attempts FROM jobs WHERE id = :j", j=job_id)
    return tuple(row)


@contextlib.contextmanager
def frozen(job_id: str) -> Iterator[int]:
    """The job's training process stopped where it is (SIGSTOP), then let go; yields its pid."""
    run = freeze_run(job_id)
    try:
        wait_until(lambda: process_state(run) == "T", "the run stopped")
        yield run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run, signal.SIGCONT)


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to process `pid` (as a signal to a stopped process does)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def reconcile_once(stack: Stack) -> None:
    """One whole pass of the reconciler, as its process makes every second, started and finished now."""
    code = "from app.reconciler import reconcile_once; reconcile_once()"
    subprocess.run([sys.executable, "-c", code], env=stack.env, check=True, timeout=120)


def test_sigkilled_worker_resumes_from_last_checkpoint_with_the_same_losses(
    stack: Stack, http: httpx.Client, chat_file: str, uninterrupted: Uninterrupted
) -> None:
    """Chaos 1, 2 and 6: SIGKILL the worker mid-run; the next worker resumes, and the losses match."""
    body = sft_body(chat_file)
    stack.start_worker()
    expected = uninterrupted(http, body)

    job_id = create(http, body)
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint to resume from", STARTS)
    stack.workers[0].send_signal(signal.SIGKILL)
    stack.workers[0].wait()
    wait_until(lambda: not training_processes(job_id), "the training process died with its worker", 30)
    last = max(checkpoint_steps(http, job_id))
    assert last < SFT_STEPS, "the run ended before the kill"

    # A kill in the middle of writing the next checkpoint leaves, at worst, a temp file or an archive with
    # no database row (the row comes last). Plant both, torn, where that write would have put them.
    store = Path(stack.env["TUNEFORGE_HOME"]) / "artifacts" / "checkpoints" / job_id / "attempt-1"
    torn = store / f"step-{last + EVERY}.state.tar"
    torn.write_bytes(b"\x1f\x8b torn")
    (store / ".tmp-torn").write_bytes(b"\x1f\x8b torn")

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=RUNS)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    assert resumed_from(events) == [last]
    resumed = next(e for e in events if e["message"].startswith("Resuming from"))
    after_resume = events[events.index(resumed) :]
    first_step = min(e["data"]["step"] for e in after_resume if is_training_step(e))
    assert first_step == last + 1, "the global step continues from the checkpoint"
    assert stack.sql("SELECT count(*) FROM models WHERE job_id = :j", j=job_id)[0][0] == 1
    assert_same_losses(events, expected)
    # The killed run's log kept every step it recorded: each line is in the store once it is printed.
    killed_log = http.get(f"/v1/fine_tuning/jobs/{job_id}/logs", params={"attempt": 1}).text
    recorded = [e["data"]["step"] for e in events[: events.index(resumed)] if is_training_step(e)]
    assert recorded and all(f"Step {step}/" in killed_log for step in recorded), killed_log[-2000:]


@pytest.mark.parametrize("to", ["worker", "process group"])
def test_sigterm_checkpoints_and_requeues_without_using_an_attempt(
    stack: Stack, http: httpx.Client, chat_file: str, uninterrupted: Uninterrupted, to: str
) -> None:
    """Chaos 9: a worker asked to stop saves a checkpoint, re-queues the job and exits; the next resumes
    it, and the losses match.

    Docker and Kubernetes signal the worker alone, which passes it on to its run; systemd signals every
    process of the service at once, the run and the template it was forked from included. The run is
    frozen until the signal has reached it, so it cannot finish first."""
    body = sft_body(chat_file)
    worker = stack.start_worker()
    expected = uninterrupted(http, body)

    job_id = create(http, body)
    wait_for_step(http, job_id, 3, timeout=STARTS)
    with frozen(job_id) as run:
        if to == "worker":
            worker.send_signal(signal.SIGTERM)
        else:
            os.killpg(worker.pid, signal.SIGTERM)
        wait_until(lambda: pending(run, signal.SIGTERM), "the stop signal reached the run")
    assert worker.wait(timeout=STARTS) == 0, "the worker shut down cleanly"
    saved = wait_for_event(http, job_id, "The worker is shutting down")["data"]["step"]
    assert saved < SFT_STEPS
    assert max(checkpoint_steps(http, job_id)) == saved
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    assert attempts(stack, job_id) == (1, MAX_ATTEMPTS + 1), "the shutdown gave its attempt back"

    stack.start_worker()
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=RUNS)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    events = all_events(http, job_id)
    assert resumed_from(events) == [saved]
    assert_same_losses(events, expected)


def test_pause_keeps_the_checkpoint_and_resume_continues_from_it(
    stack: Stack, http: httpx.Client, chat_file: str, uninterrupted: Uninterrupted
) -> None:
    """Pause a running job through the openai SDK: it checkpoints and stops, and stays paused; resume
    picks up there, with the same losses, and the pause has used up no attempt."""
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    body = sft_body(chat_file)
    stack.start_worker()
    expected = uninterrupted(http, body)

    job_id = create(http, body)
    wait_for_step(http, job_id, 3, timeout=STARTS)
    with frozen(job_id):
        assert sdk.fine_tuning.jobs.pause(job_id).status == "paused"
    paused_at = wait_for_event(http, job_id, "Job paused at step")["data"]["step"]
    assert paused_at < SFT_STEPS
    wait_until(lambda: checkpoint_steps(http, job_id)[-1:] == [paused_at], "the paused run's checkpoint")
    wait_until(lambda: not training_processes(job_id), "the paused run exited")

    # Nothing brings it back: the worker has finished a job posted after the pause, so it is done with
    # the paused one, and a reconciler pass begun after the pause leaves it alone too.
    later = create(http, job_body(chat_file))
    assert wait_for_status(http, later, {"succeeded", "failed"}, timeout=RUNS)["status"] == "succeeded"
    reconcile_once(stack)
    assert sdk.fine_tuning.jobs.retrieve(job_id).status == "paused", "a paused job stays paused"
    assert attempts(stack, job_id) == (1, MAX_ATTEMPTS + 1), "the pause gave its attempt back"

    assert sdk.fine_tuning.jobs.resume(job_id).status == "queued"
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=RUNS)
    assert job["status"] == "succeeded"
    attempt, max_attempts = attempts(stack, job_id)
    assert max_attempts - attempt == MAX_ATTEMPTS - 1, "as many attempts left as after one uninterrupted run"
    events = all_events(http, job_id)
    assert resumed_from(events) == [paused_at]
    assert_same_losses(events, expected)

    finished = http.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert finished.status_code == 400 and finished.json()["error"]["code"] == "job_not_pausable"


def test_a_paused_queued_job_is_not_run_until_resumed(
    stack: Stack, http: httpx.Client, chat_file: str
) -> None:
    """A job paused before any worker took it is passed over (a job queued after it runs) and costs no
    attempt; resumed, it runs."""
    job_id = create(http, job_body(chat_file))
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    later = create(http, job_body(chat_file))
    stack.start_worker()  # the first to take any message: the paused job's, then the later one's
    assert wait_for_status(http, later, {"succeeded", "failed"}, timeout=RUNS)["status"] == "succeeded"
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "paused"
    assert attempts(stack, job_id) == (0, MAX_ATTEMPTS), "never claimed"
    worker_log = (Path(stack.env["TUNEFORGE_HOME"]) / "worker.log").read_text()
    assert f"woken for job {job_id}" in worker_log, "the worker was handed it, first"

    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=RUNS)
    assert job["status"] == "succeeded", job
    assert attempts(stack, job_id) == (1, MAX_ATTEMPTS)


def preference_jsonl(count: int) -> bytes:
    """Preference pairs: the right sum preferred over a refusal."""
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{2 * i}."}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}],
        }
        for i in range(count)
    ]
    return "".join(json.dumps(pair) + "\n" for pair in pairs).encode()


def labelled_jsonl(count: int) -> bytes:
    examples = [{"text": f"{i} is a number", "label": "even" if i % 2 == 0 else "odd"} for i in range(count)]
    return "".join(json.dumps(example) + "\n" for example in examples).encode()


# Each task's training data and hyperparameters: 40 steps, a checkpoint every 5 (tiny-llama throughout).
TASKS: dict[str, tuple[str, Callable[[], bytes], dict]] = {
    "dpo": ("dpo", lambda: preference_jsonl(40), {"batch_size": 2}),
    "classification": ("classification", lambda: labelled_jsonl(20), {}),
    "full": ("supervised", lambda: chat_jsonl(20), {"peft": "full"}),
}


def task_body(http: httpx.Client, name: str) -> dict:
    task, data, extra = TASKS[name]
    hp = {"n_epochs": 2, "batch_size": 1, "checkpoint_every_steps": 5} | extra
    return {
        "model": "tiny-llama",
        "training_file": upload(http, data())["id"],
        "seed": 7,
        "method": {"type": task, task: {"hyperparameters": hp}},
    }


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_resumes_a_killed_run_with_the_same_losses(
    stack: Stack, http: httpx.Client, uninterrupted: Uninterrupted, task: str
) -> None:
    """A DPO, a classification and a full fine-tuning run whose training process is killed (as the
    out-of-memory killer would) after a checkpoint: the retry resumes from it with the same losses."""
    body = task_body(http, task)
    stack.start_worker()
    expected = uninterrupted(http, body)
    assert len(expected) == 40

    job_id = create(http, body)
    wait_until(lambda: checkpoint_steps(http, job_id), "a checkpoint to resume from", STARTS)
    [run] = training_processes(job_id)
    os.kill(run, signal.SIGKILL)
    job = wait_for_status(http, job_id, {"succeeded", "failed"}, timeout=RUNS)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = all_events(http, job_id)
    [step] = resumed_from(events)
    assert 5 <= step < 40, "resumed mid-run, from a checkpoint"
    assert_same_losses(events, expected)
