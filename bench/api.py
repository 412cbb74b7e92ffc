"""The API's speed: job-status GETs against raw Starlette, and how soon a POSTed job is `running`.

    .venv/bin/python bench/api.py                                   # both parts, SQLite and Postgres
    .venv/bin/python bench/api.py get --backends sqlite --rounds 5 --seconds 4
    .venv/bin/python bench/api.py dispatch --backends postgres --jobs 12
    (--postgres URL, default a database of its own, tuneforge_bench, created if missing; --redis URL,
    default Redis db 13)

get: `GET /v1/fine_tuning/jobs/{id}` with a real API key for a real (queued) job, served by Tuneforge's
    API (`uvicorn app.main:app`, one process, started as `tuneforge up` starts it) and by two raw
    Starlette apps, one uvicorn process each with the same options:
      memory  the same JSON bytes, held in memory: the framework's floor;
      row     the same row read through SQLAlchemy (plain engine, ORM `session.get`) from the same
              database and serialized with json.dumps: what a minimal hand-written service does, short of
              checking the key. The 0.8x goal is judged against this one: serving a job's status without
              reading it is not the same work.
    Every server is pinned to CPU 0 and the load generator, a process of its own, to CPU 1: wrk (one
    thread, 64 keep-alive connections; `apt-get install wrk`) or, without it, a small httpx script (64
    users, a client and connection each). httpx costs ~0.7 ms of CPU a request, and caps what it can show
    near 1,500 req/s; wrk serves the in-memory server over 8,000 req/s, so neither server compared is
    limited by it. The database's own processes are not pinned. The API runs with a rate limit too high
    to reach, so its limiter still counts every request. Each round runs every server (order rotating),
    each after a warm-up of its own; a ratio is taken within a round, printed as min / median / max over
    the rounds; p50/p99 and the server's CPU time per request (from /proc) are medians over the rounds.
dispatch: POST /v1/fine_tuning/jobs, then GET the job every 10 ms until it reads `running`, with one idle
    worker (`tuneforge worker`) and the tiny model; each job is cancelled once running and the next one
    waits until the worker has finished with it. One job warms the worker up first and is not counted.

Backends: `sqlite` is the embedded default (a fresh TUNEFORGE_HOME, SQLite, kombu's filesystem transport);
`postgres` is the --postgres database (its public schema is dropped and recreated) with Redis --redis.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from common import spread

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/tuneforge_bench"
REDIS = "redis://127.0.0.1:6379/13"
JOB_PATH = "/v1/fine_tuning/jobs"
SERVER_CPU, LOAD_CPU = "0", "1"
UNREACHABLE_RATE_LIMIT = str(10**9)  # per minute: counted on every request, never refused


# --- the reference servers (uvicorn imports this file as `api` and calls one of these factories) ---


def memory_reference():  # type: ignore[no-untyped-def]
    """Raw Starlette serving the job's JSON bytes, read once at start."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = Path(os.environ["BENCH_JOB_JSON"]).read_bytes()

    async def job(request):  # type: ignore[no-untyped-def]
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route(JOB_PATH + "/{job_id}", job)])


def row_reference():  # type: ignore[no-untyped-def]
    """Raw Starlette reading the job's row through SQLAlchemy at each request and serializing it."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from app.config import get_settings
    from app.db.tables import Job

    url = get_settings().resolved_database_url
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"check_same_thread": False} if sqlite else {})

    def job(request):  # type: ignore[no-untyped-def]  # sync: Starlette runs it in its thread pool
        with Session(engine) as session:
            row = session.get(Job, request.path_params["job_id"])
            if row is None:
                return JSONResponse({"error": {"message": "no such job"}}, status_code=404)
            return Response(json.dumps(_job_json(row)), media_type="application/json")

    return Starlette(routes=[Route(JOB_PATH + "/{job_id}", job)])


def _seconds(value):  # type: ignore[no-untyped-def]
    return int(value.timestamp()) if value else None


def _job_json(job) -> dict:  # type: ignore[no-untyped-def]
    """A job row as OpenAI's job object, written out by hand as a small service would."""
    hyperparameters = job.method[job.method["type"]]["hyperparameters"]
    progress = {"step": job.step, "total_steps": job.total_steps} if job.step and job.total_steps else None
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _seconds(job.created_at),
        "finished_at": _seconds(job.finished_at),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.project,
        "status": job.status,
        "error": job.error,
        "hyperparameters": {
            k: hyperparameters.get(k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
        },
        "method": job.method,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "result_files": job.result_files or [],
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "suffix": job.suffix,
        "user_provided_suffix": job.suffix,
        "metadata": job.metadata_,
        "integrations": job.integrations or [],
        "estimated_finish": _seconds(job.estimated_finish) if job.status == "running" else None,
        "progress": progress,
        "attempt": job.attempt,
    }


# --- the load generator (a process of its own, pinned to LOAD_CPU) ---


async def _load(url: str, key: str, seconds: float, concurrency: int) -> dict:
    """`concurrency` users, each on a keep-alive connection of its own, GETting `url` back to back."""
    import httpx

    # A client per user: one client sharing 64 connections spends milliseconds per request in its
    # connection pool's bookkeeping, and would measure itself rather than the server.
    clients = [
        httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=httpx.Limits(max_connections=1))
        for _ in range(concurrency)
    ]
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal errors
        async with client:
            while (began := time.perf_counter()) < end:
                response = await client.get(url)
                latencies.append(time.perf_counter() - began)
                errors += response.status_code != 200

    await asyncio.gather(*(user(client) for client in clients))
    return {"requests": len(latencies), "seconds": seconds, "errors": errors, "latencies": latencies}


def run_load(client: str, url: str, key: str, seconds: int, concurrency: int) -> dict:
    """Load `url` for `seconds` from a process of its own pinned to LOAD_CPU: requests, errors, p50/p99."""
    if client == "wrk":
        return _wrk(url, key, seconds, concurrency)
    command = [
        *_pinned(LOAD_CPU),
        sys.executable,
        __file__,
        "_load",
        url,
        key,
        str(seconds),
        str(concurrency),
    ]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    latencies = result.pop("latencies")
    return result | {"p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}


def _wrk(url: str, key: str, seconds: int, concurrency: int) -> dict:
    command = [
        *_pinned(LOAD_CPU),
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {key}",
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    assert done, out
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    percentile = {q: re.search(rf"\s{q}%\s+([\d.]+\w+)", out) for q in (50, 99)}
    return {
        "requests": int(done.group(1)),
        "seconds": _wrk_seconds(done.group(2)),
        "errors": (int(failed.group(1)) if failed else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
        "p50": _wrk_seconds(percentile[50].group(1)),  # type: ignore[union-attr]
        "p99": _wrk_seconds(percentile[99].group(1)),  # type: ignore[union-attr]
    }


def _wrk_seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pinned(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if os.cpu_count() and os.cpu_count() > 1 else []  # type: ignore[operator]


# --- stacks on one backend ---


class Stack:
    """A backend's settings and the processes started on it."""

    def __init__(self, backend: str, args: argparse.Namespace, model_dir: Path) -> None:
        self.backend = backend
        self.home = Path(tempfile.mkdtemp(prefix=f"tuneforge-bench-api-{backend}-"))
        self.env = os.environ | {
            "TUNEFORGE_HOME": str(self.home),
            "TUNEFORGE_MODEL_DIR": str(model_dir),
            "TUNEFORGE_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
            "TUNEFORGE_RATE_LIMIT_PER_MINUTE": UNREACHABLE_RATE_LIMIT,
            "TUNEFORGE_INFERENCE_URL": "http://127.0.0.1:9",  # no inference server: not needed here
            "HF_HUB_OFFLINE": "1",
        }
        if backend == "postgres":
            self.env |= {"TUNEFORGE_DATABASE_URL": args.postgres, "TUNEFORGE_BROKER_URL": args.redis}
            _reset_postgres(args.postgres)
        self.processes: list[subprocess.Popen] = []
        self.cli("db", "upgrade")
        self.cli("models", "make-tiny")
        self.key = self.cli("keys", "create", "--project", "bench").strip().splitlines()[-1]

    def cli(self, *args: str) -> str:
        command = [sys.executable, "-m", "app.cli", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True).stdout

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.home / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, env=self.env | (env or {}), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def serve(
        self, name: str, target: list[str], env: dict[str, str] | None = None
    ) -> tuple[str, subprocess.Popen]:
        """Start a uvicorn server on CPU 0 with the API's own options; its URL once it answers."""
        from app.services import api_command, free_port

        port = free_port()
        command = api_command(port)
        command[command.index("app.main:app")] = target[0]
        process = self.start(name, [*_pinned(SERVER_CPU), *command, *target[1:]], env)
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: _answers(url + JOB_PATH + "/x"), process, name)
        return url, process

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine, make_url, text

    server = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        name = make_url(url).database
        if not connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    server.dispose()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def _answers(url: str) -> bool:
    """Whether a server listens at `url` (any status will do)."""
    import httpx

    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def _wait_until(condition, process: subprocess.Popen | None, what: str, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _client(url: str, key: str):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _chat_file(count: int = 16) -> bytes:
    def example(i: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"{i}+{i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }

    return "".join(json.dumps(example(i)) + "\n" for i in range(count)).encode()


def _upload(http) -> str:  # type: ignore[no-untyped-def]
    response = http.post(
        "/v1/files", files={"file": ("train.jsonl", _chat_file())}, data={"purpose": "fine-tune"}
    )
    response.raise_for_status()
    return response.json()["id"]


def _job_body(file_id: str) -> dict:
    hyperparameters = {"n_epochs": 1, "batch_size": 4}
    return {
        "model": "tiny-llama",
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }


# --- part (a): status GET throughput ---


def bench_get(stack: Stack, args: argparse.Namespace) -> None:
    api = stack.serve("api", ["app.main:app"])
    with _client(api[0], stack.key) as http:
        response = http.post(JOB_PATH, json=_job_body(_upload(http)))  # no worker: it stays queued
        response.raise_for_status()
        job_id = response.json()["id"]
        served = http.get(f"{JOB_PATH}/{job_id}").content
    (stack.home / "job.json").write_bytes(served)
    env = {"BENCH_JOB_JSON": str(stack.home / "job.json")}
    servers = {
        "api": api,
        "row": stack.serve("row", ["api:row_reference", "--factory", "--app-dir", "bench"], env),
        "memory": stack.serve("memory", ["api:memory_reference", "--factory", "--app-dir", "bench"], env),
    }
    for name, (url, _) in servers.items():  # the same JSON from each
        with _client(url, stack.key) as http:
            got = http.get(f"{JOB_PATH}/{job_id}")
        assert got.status_code == 200 and got.json() == json.loads(served), (name, got.text, served)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    loads = [os.getloadavg()[0]]
    order = list(servers)
    for round_ in range(args.rounds):
        for name in order[round_ % 3 :] + order[: round_ % 3]:  # each server first in turn
            url, process = servers[name]
            url = f"{url}{JOB_PATH}/{job_id}"
            run_load(args.client, url, stack.key, args.warmup, args.concurrency)
            cpu = _cpu_seconds(process.pid)
            result = run_load(args.client, url, stack.key, args.seconds, args.concurrency)
            result["cpu_per_request"] = (_cpu_seconds(process.pid) - cpu) / max(result["requests"], 1)
            results[name].append(result)
        loads.append(os.getloadavg()[0])
    stack.stop()
    _print_get(stack.backend, args, results, loads)


def _rate(result: dict) -> float:
    return result["requests"] / result["seconds"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _print_get(
    backend: str, args: argparse.Namespace, results: dict[str, list[dict]], loads: list[float]
) -> None:
    print(
        f"\n[get, {backend}] {args.rounds} rounds x {args.seconds} s per server, {args.concurrency} "
        f"connections, load from {args.client}; 1-min load average {' '.join(f'{v:.2f}' for v in loads)}"
    )
    for name, rounds in results.items():
        median = {k: statistics.median(r[k] for r in rounds) for k in ("p50", "p99", "cpu_per_request")}
        print(
            f"  {name:7} {statistics.median(_rate(r) for r in rounds):6.0f} req/s  "
            f"p50 {median['p50'] * 1000:6.1f} ms  p99 {median['p99'] * 1000:6.1f} ms  "
            f"server CPU {median['cpu_per_request'] * 1e6:5.0f} us/request  "
            f"errors {sum(r['errors'] for r in rounds)}  (req/s by round: "
            f"{' '.join(f'{_rate(r):.0f}' for r in rounds)})"
        )
    for reference in ("row", "memory"):
        pairs = list(zip(results["api"], results[reference], strict=True))
        ratios = [_rate(a) / _rate(r) for a, r in pairs]
        cpu = [a["cpu_per_request"] / r["cpu_per_request"] for a, r in pairs]
        goal = "  (goal >= 0.80x)" if reference == "row" else ""
        print(
            f"  api / {reference:6} throughput {spread(ratios)}{goal}; server CPU per request {spread(cpu)}"
        )


# --- part (b): POST to running ---


def bench_dispatch(stack: Stack, args: argparse.Namespace) -> None:
    api, _ = stack.serve("api", ["app.main:app"])
    worker_log = stack.home / "worker.log"
    stack.start("worker", [sys.executable, "-m", "app.cli", "worker"])  # `tuneforge worker`
    latencies, posts = [], []
    loads = [os.getloadavg()[0]]
    with _client(api, stack.key) as http:
        file_id = _upload(http)
        for index in range(args.jobs + 1):  # the first warms the worker up (template imports)
            time.sleep(random.uniform(0.5, 1.5))  # idle, and at no fixed phase of its broker polling
            began = time.perf_counter()
            response = http.post(JOB_PATH, json=_job_body(file_id))
            posted = time.perf_counter()
            response.raise_for_status()
            job_id = response.json()["id"]
            while http.get(f"{JOB_PATH}/{job_id}").json()["status"] != "running":
                if time.perf_counter() - began > 180:
                    raise TimeoutError(f"{job_id} not running after 180 s; see {worker_log}")
                time.sleep(0.01)
            running = time.perf_counter()
            http.post(f"{JOB_PATH}/{job_id}/cancel").raise_for_status()
            ended = f"of job {job_id} ended"
            _wait_until(lambda: ended in worker_log.read_text(errors="replace"), None, f"{job_id} to end")  # noqa: B023
            if index:
                latencies.append(running - began)
                posts.append(posted - began)
            loads.append(os.getloadavg()[0])
    stack.stop()
    broker = "filesystem transport" if stack.backend == "sqlite" else "Redis"
    print(
        f"\n[dispatch, {stack.backend} + {broker}] {args.jobs} jobs, idle worker; "
        f"1-min load average {min(loads):.2f} to {max(loads):.2f}"
    )
    for name, values in (("POST to running", latencies), ("POST itself", posts)):
        p50, p90 = _percentile(values, 0.5), _percentile(values, 0.9)
        print(
            f"  {name:15} p50 {p50 * 1000:6.0f} ms  p90 {p90 * 1000:6.0f} ms  "
            f"max {max(values) * 1000:6.0f} ms"
        )
    print(f"  all (ms): {' '.join(f'{v * 1000:.0f}' for v in latencies)}")


@contextlib.contextmanager
def _stack(backend: str, args: argparse.Namespace, model_dir: Path) -> Iterator[Stack]:
    stack = Stack(backend, args, model_dir)
    try:
        yield stack
    finally:
        stack.stop()


def main() -> None:
    if sys.argv[1:2] == ["_load"]:
        url, key, seconds, concurrency = sys.argv[2:6]
        print(json.dumps(asyncio.run(_load(url, key, float(seconds), int(concurrency)))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", nargs="?", choices=["get", "dispatch", "all"], default="all")
    parser.add_argument(
        "--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--postgres", default=POSTGRES, help="Database for the postgres backend (reset!).")
    parser.add_argument("--redis", default=REDIS, help="Broker for the postgres backend.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="Measured seconds per server per round.")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured seconds before each.")
    parser.add_argument(
        "--client",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="Load generator (default wrk when installed: `apt-get install wrk`). httpx is slower per "
        "request, and can limit what the faster servers show.",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("TUNEFORGE_HOME", tempfile.mkdtemp(prefix="tuneforge-bench-api-"))
    sys.path.insert(0, str(ROOT))
    model_dir = Path(tempfile.mkdtemp(prefix="tuneforge-bench-api-models-"))
    print(f"{os.cpu_count()} CPUs; 1-min load average at start {os.getloadavg()[0]:.2f}")
    for backend in args.backends:
        if args.part in ("get", "all"):
            with _stack(backend, args, model_dir) as stack:
                bench_get(stack, args)
        if args.part in ("dispatch", "all"):
            with _stack(backend, args, model_dir) as stack:
                bench_dispatch(stack, args)


if __name__ == "__main__":
    main()
