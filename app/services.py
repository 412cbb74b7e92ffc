"""Tuneforge's processes on one machine: the API, a worker, the reconciler and the inference server, as
`tuneforge up`, `tuneforge demo`, the tests and the benchmarks start them; and the checks `up` makes
before it starts anything (`preflight`), each failure one sentence that says what to fix.
"""

import errno
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.config import get_settings
from app.db import migrate

SERVICES = ("inference", "api", "worker", "reconciler")  # the order `up` reports them ready in


class ServiceError(Exception):
    """A service could not start or be reached; the message says what to fix."""


def free_port() -> int:
    """A TCP port nothing on this machine listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_command(name: str | None = None) -> list[str]:
    """The command line of one Celery worker on this machine."""
    settings = get_settings()
    node = name or f"worker-{uuid.uuid4().hex[:8]}@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app.queue:celery_app",
        "worker",
        "--pool=solo",
        "--loglevel=INFO",
        "-Q",
        settings.queue,
        "-n",
        node,
        "--without-gossip",
        "--without-mingle",
    ]


def api_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of the API server: one uvicorn process."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def inference_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of the inference server (needs torch)."""
    return [sys.executable, "-m", "worker.serving", "--host", host, "--port", str(port)]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: a database driver's own (SQLAlchemy wraps it), if any."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def redacted(url: str) -> str:
    """A database or broker URL without its password, to print."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: say it as given
        return url


def check_database() -> None:
    """Connect to the configured database once; ServiceError saying what is wrong if it cannot."""
    url = get_settings().resolved_database_url
    try:
        engine = create_engine(url)
    except Exception as exc:  # a malformed URL, or a driver that is not installed
        raise ServiceError(
            f"TUNEFORGE_DATABASE_URL {redacted(url)!r} is not a database URL Tuneforge can use: {exc}"
        ) from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        reason = first_line(exc)
        raise ServiceError(
            f"cannot reach the database at {redacted(url)}: {reason.rstrip('.')}. "
            "Check TUNEFORGE_DATABASE_URL."
        ) from None
    finally:
        engine.dispose()


def check_broker() -> None:
    """Connect to the configured broker once (no retries); ServiceError if it cannot."""
    from app import queue

    url = get_settings().resolved_broker_url
    try:
        with queue.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=3)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ServiceError(
            f"cannot reach the broker at {redacted(url)}: {reason.rstrip('.')}. Check TUNEFORGE_BROKER_URL."
        ) from None


def check_port_free(host: str, port: int) -> None:
    """ServiceError if a server could not listen on host:port, saying why."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServiceError(
            f"cannot listen on {host}: {exc.strerror}; pass --host with an address of this machine"
        ) from None
    with socket.socket(family, kind) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(
                    f"cannot listen on {host}:{port}: something else uses that port; pass --port or stop it."
                ) from None
            raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}.") from None


def local_url(host: str, port: int) -> str:
    """How this machine reaches a server listening on host:port (any address: over loopback)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def preflight(host: str, port: int, inference_port: int | None) -> None:
    """What `up` checks before it starts anything: the database, the broker and the ports."""
    get_settings().resolved_home.mkdir(parents=True, exist_ok=True)  # the embedded default's database
    check_database()
    check_broker()
    check_port_free(host, port)
    if inference_port:
        check_port_free("127.0.0.1", inference_port)


def start_services(
    port: int, host: str = "127.0.0.1", log_dir: Path | None = None, inference_port: int | None = None
) -> list[subprocess.Popen]:
    """Start the API, one worker, the reconciler and the inference server; with `log_dir`, each one's
    output goes to `<name>.log` there.

    The inference server listens on loopback only on `inference_port`, by default a free port, so several
    stacks on one machine never collide; the API is told where it is and shares a generated secret with it.
    When TUNEFORGE_INFERENCE_URL is set, the API uses that server and none is started here.
    """
    migrate.upgrade()
    env = _service_env()
    commands: dict[str, list[str]] = {}
    if not get_settings().inference_url:
        inference_port = inference_port or free_port()
        env["TUNEFORGE_INFERENCE_URL"] = f"http://127.0.0.1:{inference_port}"
        # The API and the server it starts share a secret of their own unless one is configured.
        env.setdefault("TUNEFORGE_INFERENCE_SECRET", secrets.token_urlsafe(32))
        commands["inference"] = inference_command(inference_port)  # first: it takes longest to start
    commands["api"] = api_command(port, host)
    commands["worker"] = worker_command()
    commands["reconciler"] = [sys.executable, "-m", "app.cli", "reconciler"]
    processes: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            processes.append(_start(command, env, _log(log_dir, name)))
    except BaseException:  # none left running when one could not start
        stop_services(processes)
        raise
    return processes


def _log(log_dir: Path | None, name: str) -> Path | None:
    return log_dir / f"{name}.log" if log_dir else None


def _service_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1"}


def _start(command: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    output = log.open("ab") if log else None
    try:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
    finally:
        if output:
            output.close()  # the child has its own descriptor


def name_of(process: subprocess.Popen) -> str:
    """Which service a process started by `start_services` is."""
    args = [str(a) for a in process.args] if isinstance(process.args, list) else [str(process.args)]
    if args[:6] == worker_command()[:6]:  # workers differ only in their node name, after these six
        return "worker"
    if "worker.serving" in args:
        return "inference"
    if "uvicorn" in args:
        return "api"
    return "reconciler" if "reconciler" in args else " ".join(args)


def wait_ready(base_url: str, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait for the API's /readyz, inference server included; fail fast if a service process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _none_died(processes)
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=3)
            # /readyz only reports the inference server; a stack that started one waits for it here.
            if response.status_code == 200 and response.json()["checks"].get("inference") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{base_url} was not ready after {timeout:.0f} s")


def _exited(process: subprocess.Popen, log_dir: Path | None) -> str:
    """The sentence for a service that exited, naming its log."""
    name = name_of(process)
    where = f"; its log: {_log(log_dir, name)}" if log_dir else ""
    return f"the {name} exited with code {process.returncode}{where}"


def _none_died(processes: list[subprocess.Popen], log_dir: Path | None = None) -> None:
    for process in processes:
        if process.poll() is not None:
            raise ServiceError(_exited(process, log_dir))


def wait_each_ready(
    base_url: str, processes: list[subprocess.Popen], log_dir: Path | None, timeout: float = 180
) -> Iterator[tuple[str, str]]:
    """Yield (service, how to reach it) as each service becomes ready: the API and the inference server by
    the API's /readyz, the worker by its heartbeat row, the reconciler once the others are (it has no
    signal of its own: it is up while its process runs). ServiceError if one dies or time runs out."""
    from app.db.session import session_scope
    from app.jobs.routing import live_workers

    worker_ids = {f"{socket.gethostname()}:{p.pid}" for p in processes if name_of(p) == "worker"}
    names = {name_of(p) for p in processes}
    pending = [n for n in SERVICES if n in names]
    deadline = time.monotonic() + timeout
    while pending:
        _none_died(processes, log_dir)
        if time.monotonic() > deadline:
            raise ServiceError(f"not ready after {timeout:.0f} s: {', '.join(pending)}")
        ready: dict[str, str] = {}
        try:
            checks = httpx.get(f"{base_url}/readyz", timeout=3).json().get("checks", {})
            ready["api"] = base_url
            if checks.get("inference") == "ok":
                ready["inference"] = _inference_url(processes)
        except (httpx.HTTPError, ValueError):
            pass
        with session_scope() as session:
            if worker_ids & {w.id for w in live_workers(session, get_settings().queue)}:
                ready["worker"] = f"queue {get_settings().queue}"
        if pending == ["reconciler"]:
            ready["reconciler"] = f"every {get_settings().reconcile_seconds:g} s"
        for name in list(pending):
            if name in ready:
                pending.remove(name)
                yield name, ready[name]
        if pending:
            time.sleep(0.3)


def _inference_url(processes: list[subprocess.Popen]) -> str:
    """Where the inference server `start_services` started listens (its port is chosen there)."""
    for process in processes:
        if name_of(process) == "inference":
            args = [str(a) for a in process.args]  # type: ignore[union-attr]
            return f"http://127.0.0.1:{args[args.index('--port') + 1]}"
    return get_settings().resolved_inference_url


def stop_services(processes: list[subprocess.Popen]) -> None:
    """Terminate them all, then wait for each (20 s, then kill)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def supervise(processes: list[subprocess.Popen], log_dir: Path | None = None) -> str | None:
    """Start a new worker in place of one that died (its job resumes elsewhere); if another service died,
    the sentence that says so (`up` stops then), else None."""
    for index, process in enumerate(processes):
        if process.poll() is None:
            continue
        if name_of(process) != "worker":
            return f"{_exited(process, log_dir)}; stopping"
        print(f"{_exited(process, log_dir)}; starting a new one", file=sys.stderr)
        processes[index] = _start(worker_command(), _service_env(), _log(log_dir, "worker"))
    return None
