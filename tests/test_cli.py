"""`tuneforge` as a client: every command run as a subprocess against the shared server, as a user types
it, its output read as they would; `jobs follow` also under tmux, its screen captured mid-run; and the
errors, each one line that says what to fix.

Captures go to tests/output/cli/.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import TEST_HOME, make_key
from tests.helpers import chat_jsonl, job_body, upload, wait_for_status, wait_for_step

pytestmark = pytest.mark.e2e
OUTPUT = Path(__file__).parent / "output" / "cli"


def tuneforge(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def cli_env(server: str, api_key: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A user's environment: the server and key in variables, a profile file of their own."""
    profiles = tmp_path_factory.mktemp("profiles") / "profiles.toml"
    return os.environ | {
        "TUNEFORGE_BASE_URL": server,
        "TUNEFORGE_API_KEY": api_key,
        "TUNEFORGE_PROFILES": str(profiles),
        "COLUMNS": "120",
    }


@pytest.fixture(scope="module")
def followed(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A new user's path: upload with the CLI, create from a YAML spec that flags override, follow it to
    the end."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "train.jsonl").write_bytes(chat_jsonl(24))
    uploaded = json.loads(
        ok(tuneforge("files", "upload", str(folder / "train.jsonl"), "--json", env=cli_env))
    )
    assert uploaded["id"].startswith("file-") and uploaded["bytes"] == len(chat_jsonl(24))
    spec = job_body(uploaded["id"], n_epochs=1) | {"suffix": "from-yaml"}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    created = ok(
        tuneforge(
            "jobs", "create", "--spec", str(folder / "job.yaml"), "--epochs", "2", "--set", "lora_r=4",
            "--json", env=cli_env,
        )
    )  # fmt: skip
    job = json.loads(created)
    hyperparameters = job["method"]["supervised"]["hyperparameters"]
    assert (
        job["suffix"] == "from-yaml" and hyperparameters["n_epochs"] == 2 and hyperparameters["lora_r"] == 4
    )
    follow = tuneforge("jobs", "follow", job["id"], env=cli_env, timeout=180)
    return {"job": job, "follow": follow, "folder": folder}


def test_follow_shows_the_run_and_exits_0_when_it_succeeds(followed: dict) -> None:
    follow, job = followed["follow"], followed["job"]
    assert follow.returncode == 0, follow.stderr
    assert f"{job['id']} succeeded; fine-tuned model ft:tiny-llama:from-yaml:" in follow.stdout
    # Progress and the log go to stderr: the bar's last state, the run's own lines, the job's events.
    assert "6/6 steps" in follow.stderr and "loss " in follow.stderr, follow.stderr
    assert "INFO worker.training.callbacks: Step 6/6: training loss=" in follow.stderr
    assert "The job has successfully completed." in follow.stderr
    assert "Traceback" not in follow.stderr
    # Each log line once: the follower reads the log from the start only on a new connection.
    steps = [line for line in follow.stderr.splitlines() if "callbacks: Step 3/6: training loss" in line]
    assert len(steps) == 1, steps


def test_list_get_and_metrics_as_tables_csv_and_json(followed: dict, cli_env: dict[str, str]) -> None:
    job_id = followed["job"]["id"]
    listed = ok(tuneforge("jobs", "list", "--status", "succeeded", "--limit", "100", env=cli_env))
    row = next(line for line in listed.splitlines() if job_id in line)
    assert "succeeded" in row and "6/6" in row and "tiny-llama" in row and "lora" in row, row
    got = json.loads(ok(tuneforge("--json", "jobs", "get", job_id, env=cli_env)))
    assert got["status"] == "succeeded" and got["progress"] == {"step": 6, "total_steps": 6}
    table = ok(tuneforge("jobs", "metrics", job_id, env=cli_env))
    assert "train_loss" in table and "learning_rate" in table
    assert len([line for line in table.splitlines() if line.startswith("│ ")]) == 6, table
    csv = ok(tuneforge("jobs", "metrics", job_id, "--csv", env=cli_env)).splitlines()
    assert csv[0].startswith("step,epoch,train_loss,") and len(csv) == 7 and csv[6].startswith("6,")


def test_models_download_checks_the_checksum(
    followed: dict, http: httpx.Client, cli_env: dict[str, str]
) -> None:
    """The adapter arrives whole and checked; bytes that differ from what the server hashed are refused."""
    job = http.get(f"/v1/fine_tuning/jobs/{followed['job']['id']}").json()
    model = job["fine_tuned_model"]
    assert model in ok(tuneforge("models", "list", env=cli_env))
    target = followed["folder"] / "adapter.tar.gz"
    saved = ok(tuneforge("models", "download", model, "-o", str(target), env=cli_env))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest in saved and target.read_bytes()[:2] == b"\x1f\x8b"

    # The stored archive changes under the server after it hashed it (same size and time, one byte
    # flipped): what arrives no longer matches the checksum, and nothing is left at the target.
    stored = TEST_HOME / "artifacts" / "adapters" / job["id"] / f"attempt-{job['attempt']}.tar.gz"
    original, times = stored.read_bytes(), stored.stat()
    try:
        stored.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
        os.utime(stored, ns=(times.st_atime_ns, times.st_mtime_ns))
        again = followed["folder"] / "again.tar.gz"
        refused = tuneforge("models", "download", model, "-o", str(again), env=cli_env)
        assert refused.returncode == 1 and "SHA-256 differs" in refused.stderr, refused.stderr
        assert not again.exists() and not again.with_name("again.tar.gz.part").exists()
    finally:
        stored.write_bytes(original)
        os.utime(stored, ns=(times.st_atime_ns, times.st_mtime_ns))


def _auth(env: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {env['TUNEFORGE_API_KEY']}"}


def test_chat_streams_one_answer_or_a_conversation(followed: dict, cli_env: dict[str, str]) -> None:
    model = json.loads(ok(tuneforge("jobs", "get", followed["job"]["id"], "--json", env=cli_env)))[
        "fine_tuned_model"
    ]
    one = ok(
        tuneforge("chat", model, "What is 3 plus 3?", "--temperature", "0", "--max-tokens", "8", env=cli_env)
    )
    whole = httpx.post(
        f"{cli_env['TUNEFORGE_BASE_URL']}/v1/chat/completions",
        headers=_auth(cli_env),
        json={
            "model": model,
            "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
            "temperature": 0,
            "max_tokens": 8,
        },
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    assert one == whole + "\n", "the streamed answer is the model's whole answer"
    talk = ok(
        tuneforge("chat", model, "--max-tokens", "4", "--json", stdin="hello\nand again\n", env=cli_env)
    )
    answers = json.loads("[" + talk.replace("}\n{", "},{") + "]")
    assert [a["object"] for a in answers] == ["chat.completion"] * 2, "one answer per line read"
    as_json = json.loads(ok(tuneforge("chat", model, "hi", "--max-tokens", "3", "--json", env=cli_env)))
    assert as_json["object"] == "chat.completion"


def test_estimate_prints_the_plan(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_bytes(chat_jsonl(8))
    plan = ok(
        tuneforge(
            "estimate", "--model", "tiny-llama", "--training-file", str(tmp_path / "train.jsonl"),
            "--methods", "lora,full", "--device", "cpu", "--gpu-memory-gb", "1", env=cli_env,
        )
    )  # fmt: skip
    rows = {line.split("│")[1].strip(): line for line in plan.splitlines() if line.startswith("│ ")}
    assert set(rows) == {"lora", "full"} and "yes" in rows["lora"], plan
    assert "tiny-llama on cpu, 1 GiB" in plan


def test_login_saves_a_profile_the_commands_then_use(
    server: str, api_key: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles.toml"
    bare = {k: v for k, v in cli_env.items() if not k.startswith("TUNEFORGE_")} | {
        "TUNEFORGE_PROFILES": str(profiles)
    }
    refused = tuneforge("login", "--base-url", server, env=bare | {"TUNEFORGE_API_KEY": "tf-wrong"})
    assert refused.returncode == 1 and not profiles.exists(), "a key the server refuses is not saved"
    ok(
        tuneforge(
            "login", "--base-url", server, "--profile", "lab", env=bare | {"TUNEFORGE_API_KEY": api_key}
        )
    )
    assert profiles.stat().st_mode & 0o777 == 0o600, "the file holds a key: the user's alone"
    assert "tiny-llama" in ok(tuneforge("--profile", "lab", "models", "list", env=bare))
    assert "tiny-llama" in ok(tuneforge("models", "list", env=bare | {"TUNEFORGE_PROFILE": "lab"}))


@dataclass
class Relayed:
    """One connection through the relay: both sockets, the last request the client sent on it."""

    client: socket.socket
    upstream: socket.socket
    request: str = ""
    open: bool = True


class Cuttable:
    """A TCP relay to the server whose connections the test can cut, as a flaky network would."""

    def __init__(self, target: str) -> None:
        url = httpx.URL(target)
        self.target = (url.host, url.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[Relayed] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            relayed = Relayed(client, socket.create_connection(self.target))
            with self.lock:
                self.connections.append(relayed)
            threading.Thread(target=self._pipe, args=(relayed, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(relayed, False), daemon=True).start()

    @staticmethod
    def _pipe(relayed: Relayed, upward: bool) -> None:
        source, sink = (relayed.client, relayed.upstream) if upward else (relayed.upstream, relayed.client)
        try:
            while chunk := source.recv(65536):
                if upward and chunk[:4] in (b"GET ", b"POST"):
                    relayed.request = chunk.split(b"\r\n", 1)[0].decode()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            relayed.open = False
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def streaming(self) -> set[str]:
        """Which of the follower's two streams are open through the relay now."""
        with self.lock:
            requests = [c.request for c in self.connections if c.open]
        return {
            kind
            for kind, marker in (("events", "/events?stream=true"), ("log", "/logs?follow=true"))
            if any(marker in request for request in requests)
        }

    def cut(self) -> None:
        """Reset every open connection."""
        with self.lock:
            cut, self.connections = self.connections, []
        for relayed in cut:
            for end in (relayed.client, relayed.upstream):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                    end.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def relay(server: str) -> Iterator[Cuttable]:
    relay = Cuttable(server)
    yield relay
    relay.close()


def long_job(http: httpx.Client, epochs: int) -> str:
    training = upload(http, chat_jsonl(16))
    body = job_body(training["id"], n_epochs=epochs, batch_size=2, checkpoint_every_steps=10**6)
    return http.post("/v1/fine_tuning/jobs", json=body).json()["id"]


def test_follow_reconnects_when_the_connection_drops(
    http: httpx.Client, cli_env: dict[str, str], relay: Cuttable
) -> None:
    """Both of the follower's streams are cut twice mid-run; it reads on from where each stopped: every
    event and log line printed once, and the exit code is the job's."""
    job_id = long_job(http, epochs=30)  # 240 steps
    follow = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--base-url", relay.url, "jobs", "follow", job_id],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for step in (20, 100):
        wait_for_step(http, job_id, step)
        deadline = time.monotonic() + 30
        while relay.streaming() != {"events", "log"}:  # both (again, after the first cut)
            assert time.monotonic() < deadline, f"the follower's streams open: {relay.streaming()}"
            time.sleep(0.05)
        relay.cut()
    out, err = follow.communicate(timeout=180)
    assert follow.returncode == 0, err
    assert "reconnecting" in err, "the follower saw the stream drop"
    for step in range(1, 241):
        lines = [line for line in err.splitlines() if f"callbacks: Step {step}/240: training loss" in line]
        assert len(lines) == 1, (step, lines)
    assert err.count("The job has successfully completed.") == 1
    events = [line for line in err.splitlines() if line.startswith("Training on ")]  # the log's are timed
    assert len(events) == 1, "an event before the cuts is not printed again"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def test_follow_under_tmux_then_pause_resume_and_cancel(http: httpx.Client, cli_env: dict[str, str]) -> None:
    """`jobs follow` in a real terminal (tmux), its screen captured mid-run; the job paused, resumed and
    cancelled with the CLI; follow exits 3 on the cancel."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    job_id = long_job(http, epochs=50)  # 400 steps: far longer than the test lets it run
    session = f"tuneforge-follow-{job_id[-6:]}"
    exit_file = OUTPUT / "follow-exit-code.txt"
    exit_file.unlink(missing_ok=True)
    command = f"{sys.executable} -m app.cli jobs follow {job_id}; echo $? > {exit_file}; sleep 600"
    env_args = [arg for k, v in cli_env.items() if k.startswith("TUNEFORGE_") for arg in ("-e", f"{k}={v}")]
    tmux("new-session", "-d", "-s", session, "-x", "110", "-y", "24", "-c", os.getcwd(), *env_args, command)
    try:
        wait_for_step(http, job_id, 30)
        # The bar, as drawn once it has shown a step past 30: status, step/total, loss, speed, time left.
        drawn = re.compile(r"running .* (\d+)/400 steps  loss \d+\.\d{4}  \d+ tok/s \d+:\d\d:\d\d")
        deadline = time.monotonic() + 30
        while True:
            screen = tmux("capture-pane", "-p", "-t", session)
            bar = [found for line in screen.splitlines() if (found := drawn.search(line))]
            if bar and int(bar[-1].group(1)) >= 30:
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
        (OUTPUT / "follow-mid-run.txt").write_text(screen)
        assert "INFO worker.training.callbacks: Step " in screen, "log lines above the bar"

        paused = json.loads(ok(tuneforge("jobs", "pause", job_id, "--json", env=cli_env)))
        assert paused["status"] in ("paused", "running"), paused  # running until its step ends
        assert wait_for_status(http, job_id, {"paused"}, timeout=60)["status"] == "paused"
        assert "paused" in ok(tuneforge("jobs", "get", job_id, env=cli_env))
        resumed = json.loads(ok(tuneforge("jobs", "resume", job_id, "--json", env=cli_env)))
        assert resumed["status"] in ("queued", "running"), resumed
        wait_for_status(http, job_id, {"running"}, timeout=60)
        cancelled = ok(tuneforge("jobs", "cancel", job_id, env=cli_env))
        assert "cancelled" in cancelled
        deadline = time.monotonic() + 60
        while not exit_file.exists() or not exit_file.read_text().strip():
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", session)
            time.sleep(0.2)
        screen = tmux("capture-pane", "-p", "-t", session)
        (OUTPUT / "follow-cancelled.txt").write_text(screen)
        assert exit_file.read_text().strip() == "3", screen
        assert f"error: {job_id} cancelled" in screen and "Traceback" not in screen, screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_ctrl_c_stops_follow_with_130_and_no_traceback(http: httpx.Client, cli_env: dict[str, str]) -> None:
    job_id = long_job(http, epochs=50)
    follow = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "jobs", "follow", job_id],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a shell starts it: pytest-xdist's workers ignore SIGINT, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert follow.stderr is not None
        first = follow.stderr.readline()  # following: the job's first event is on the screen
        assert first.startswith("Created fine-tuning job"), first
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=30)
        assert follow.returncode == 130, err
        assert "Traceback" not in err and "Aborted" not in err, err
    finally:
        follow.kill()
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_a_failed_job_makes_follow_exit_1_with_the_error(http: httpx.Client, cli_env: dict[str, str]) -> None:
    from app.models.local import register_folder

    broken = TEST_HOME / "models" / "cli-broken-llama"
    shutil.copytree(TEST_HOME / "models" / "tiny-llama", broken, dirs_exist_ok=True)
    register_folder("cli-broken-llama", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    training = upload(http, chat_jsonl(8))
    body = job_body(training["id"]) | {"model": "cli-broken-llama"}
    job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    follow = tuneforge("jobs", "follow", job_id, env=cli_env, timeout=180)
    assert follow.returncode == 1, follow.stderr
    assert f"error: {job_id} failed: " in follow.stderr.splitlines()[-1]
    # The run's own traceback is in its log, shown above the bar; the CLI itself raised nothing.
    assert "Traceback" in follow.stderr and "app/cli/" not in follow.stderr


BAD_LINE = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    b'{"messages": 5}\n'
)
NO_SUCH_DB = "DB_nosuch"  # the test's database URL with another name: test_cli_nosuch
CREATE = ["jobs", "create", "--model", "tiny-llama", "--training-file"]
# id: (arguments, environment changes, what the one line says)
ERRORS = {
    "wrong-key": (["jobs", "list"], {"TUNEFORGE_API_KEY": "tf-not-a-key"}, "TUNEFORGE_API_KEY"),
    "no-server": (
        ["jobs", "list"],
        {"TUNEFORGE_BASE_URL": "http://127.0.0.1:9"},
        "cannot reach Tuneforge at http://127.0.0.1:9",
    ),
    "bad-url": (["jobs", "list"], {"TUNEFORGE_BASE_URL": "localhost:8000"}, "bad base URL 'localhost:8000'"),
    "no-key": (["jobs", "list"], {"TUNEFORGE_API_KEY": ""}, "no API key: set TUNEFORGE_API_KEY"),
    "no-profile": (["--profile", "nope", "jobs", "list"], {"TUNEFORGE_API_KEY": ""}, "no profile 'nope'"),
    "unknown-job": (["jobs", "get", "ftjob-0000"], {}, "No such fine-tuning job"),
    "missing-flag": (["jobs", "create", "--training-file", "file-x"], {}, "a job needs --model"),
    "bad-set": ([*CREATE, "file-x", "--set", "lora_r"], {}, "NAME=VALUE"),
    "unknown-file": ([*CREATE, "file-nope"], {}, "file-nope"),
    "invalid-upload": (["files", "upload", "BAD_FILE"], {}, "line 2"),
    "missing-upload": (["files", "upload", "/nonexistent.jsonl"], {}, "no such file: /nonexistent.jsonl"),
    "unknown-model": (["models", "download", "ft:nothing:here"], {}, "ft:nothing:here"),
    "no-broker": (
        ["up", "--port", "PORT"],
        {"TUNEFORGE_BROKER_URL": "redis://127.0.0.1:9/0"},
        "cannot reach the broker at redis://127.0.0.1:9/0",
    ),
    "no-database": (
        ["up", "--port", "PORT"],
        {"TUNEFORGE_DATABASE_URL": NO_SUCH_DB},
        'database "test_cli_nosuch" does not exist',
    ),
    "port-in-use": (["up", "--port", "BUSY"], {}, "something else uses that port"),
    "admin-no-database": (
        ["keys", "list"],
        {"TUNEFORGE_DATABASE_URL": NO_SUCH_DB},
        'database "test_cli_nosuch" does not exist',
    ),
    "admin-no-migration": (
        ["keys", "list"],
        {"TUNEFORGE_DATABASE_URL": "sqlite:///HOME/empty.db"},
        "`tuneforge db upgrade`",
    ),
    "worker-no-broker": (
        ["worker"],
        {"TUNEFORGE_BROKER_URL": "redis://127.0.0.1:9/0"},
        "cannot reach the broker at redis://127.0.0.1:9/0",
    ),
    "reconciler-no-database": (
        ["reconciler"],
        {"TUNEFORGE_DATABASE_URL": NO_SUCH_DB},
        'database "test_cli_nosuch" does not exist',
    ),
}


@pytest.mark.parametrize(("args", "env_changes", "says"), ERRORS.values(), ids=ERRORS.keys())
def test_each_error_is_one_line_that_says_what_to_fix(
    args: list[str], env_changes: dict[str, str], says: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "bad.jsonl").write_bytes(BAD_LINE)
    busy = socket.create_server(("127.0.0.1", 0))
    replace = {"BAD_FILE": str(tmp_path / "bad.jsonl"), "PORT": "0", "BUSY": str(busy.getsockname()[1])}
    args = [replace.get(a, a) for a in args]
    no_such = cli_env["TUNEFORGE_DATABASE_URL"].rsplit("/", 1)[0] + "/test_cli_nosuch"
    env = cli_env | {"TUNEFORGE_HOME": str(tmp_path / "home")}
    env |= {
        name: value.replace(NO_SUCH_DB, no_such).replace("HOME", str(tmp_path))
        for name, value in env_changes.items()
    }
    try:
        done = tuneforge(*args, env=env, timeout=60)
    finally:
        busy.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_wrong_key_message_is_the_servers(cli_env: dict[str, str]) -> None:
    """The server's own words come through, with what to set."""
    done = tuneforge("models", "list", env=cli_env | {"TUNEFORGE_API_KEY": make_key("x")[:-2] + "zz"})
    assert (
        done.returncode == 1
        and "Invalid or revoked API key." in done.stderr
        and "tuneforge login" in done.stderr
    )
