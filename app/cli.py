"""The `tuneforge` command: run the service, manage keys and base models, migrate, and run the demo.

tuneforge up --port 8000            # API + worker + inference server on the embedded default
tuneforge serve --port 8001         # the inference server alone (needs torch)
tuneforge keys create --project me  # prints a new API key as its last line
tuneforge models make-tiny          # registers `tiny-llama`
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import httpx
import typer

from app.config import get_settings
from app.db import migrate
from app.db.session import session_scope
from app.keys import service as key_service
from app.models import service as model_service
from app.storage import get_store

cli = typer.Typer(no_args_is_help=True, help="Tuneforge: self-hosted, OpenAI-compatible fine-tuning.")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys.")
models_cli = typer.Typer(no_args_is_help=True, help="Base models.")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(models_cli, name="models")
cli.add_typer(db_cli, name="db")


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION."""
    migrate.upgrade(revision=revision)
    typer.echo(f"database at {revision}")


@keys_cli.command("create")
def keys_create(project: str = typer.Option(..., help="Project the key belongs to.")) -> None:
    """Create an API key; the key itself is the last line printed."""
    migrate.upgrade()
    with session_scope() as session:
        key, token = key_service.create_key(session, project=project)
    typer.echo(f"created {key.id} for project {project}")
    typer.echo(token)


@keys_cli.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id."""
    with session_scope() as session:
        if not key_service.revoke_key(session, key_id=key_id):
            raise typer.BadParameter(f"no live key {key_id}")
    typer.echo(f"revoked {key_id}")


@keys_cli.command("list")
def keys_list(project: str | None = None) -> None:
    """List keys (ids and prefixes, never the keys)."""
    with session_scope() as session:
        for key in key_service.list_keys(session, project=project):
            state = "revoked" if key.revoked_at else "live"
            typer.echo(f"{key.id}  {key.project}  {key.prefix}...  {state}")


def register_folder(name: str, folder: Path) -> None:
    """Register a local model folder as base model NAME."""
    from worker.training.base_models import inspect_model

    profile = inspect_model(folder)
    migrate.upgrade()
    # In an object store, the folder goes up once and every host fetches it from there; else it is read
    # where it is.
    storage_key = get_store().put_model_folder(name, folder)
    with session_scope() as session:
        model_service.register_base_model(
            session, name=name, path=folder.resolve(), profile=profile, storage_key=storage_key
        )
    where = f"uploaded to {storage_key}" if storage_key else f"at {folder}"
    typer.echo(f"registered base model {name} ({profile['architecture']}) {where}")


@models_cli.command("make-tiny")
def models_make_tiny(
    name: str = "tiny-llama",
    seed: int = 0,
    hidden_size: Annotated[int, typer.Option(help="Width; 1024 with 4 layers gives ~49M parameters.")] = 64,
    layers: Annotated[int, typer.Option(help="Decoder blocks.")] = 2,
    intermediate_size: Annotated[int, typer.Option(help="MLP width.")] = 128,
) -> None:
    """Build a small random Llama with a chat template locally and register it."""
    from worker.training.base_models import make_tiny_llama

    folder = get_settings().resolved_model_dir / name
    if not (folder / "config.json").exists():
        make_tiny_llama(
            folder, seed=seed, hidden_size=hidden_size, num_layers=layers, intermediate_size=intermediate_size
        )
    register_folder(name, folder)


@models_cli.command("import-gguf")
def models_import_gguf(file: Path, name: str = typer.Option(..., help="Model id to register.")) -> None:
    """Convert a GGUF file into a safetensors model folder and register it."""
    from worker.training.base_models import import_gguf

    folder = get_settings().resolved_model_dir / name
    if not (folder / "config.json").exists():
        import_gguf(file, folder)
    register_folder(name, folder)


@models_cli.command("import")
def models_import(folder: Path, name: str = typer.Option(..., help="Model id to register.")) -> None:
    """Register an existing Hugging Face model folder (safetensors) as a base model."""
    try:
        register_folder(name, folder)
    except ValueError as exc:  # e.g. pickle weights only: the message says what to do
        raise typer.BadParameter(str(exc)) from None


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


@cli.command()
def worker() -> None:
    """Run one worker in the foreground."""
    migrate.upgrade()
    os.execv(sys.executable, worker_command())


@cli.command()
def reconciler() -> None:
    """Run the reconciler loop (exactly one per deployment)."""
    from app import logs
    from app.reconciler import run_forever

    logs.configure()
    run_forever()


def free_port() -> int:
    """A TCP port nothing on this machine listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    return [sys.executable, "-m", "worker.serving", "--host", host, "--port", str(port)]


def start_services(
    port: int, host: str = "127.0.0.1", log_dir: Path | None = None, inference_port: int | None = None
) -> list[subprocess.Popen]:
    """Start the API, one worker, the reconciler and the inference server; with `log_dir`, output goes there.

    The inference server listens on loopback only on `inference_port`, by default a free port, so several
    stacks on one machine never collide; the API is told where it is and shares a generated secret with it.
    When TUNEFORGE_INFERENCE_URL is set, the API uses that server and none is started here.
    """
    migrate.upgrade()
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
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
    processes = []
    for name, command in commands.items():
        output = (log_dir / f"{name}.log").open("ab") if log_dir else None
        processes.append(
            subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
        )
    return processes


def wait_ready(base_url: str, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait for the API's /readyz, inference server included; fail fast if a service process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=3)
            # /readyz only reports the inference server; a stack that started one waits for it here.
            if response.status_code == 200 and response.json()["checks"].get("inference") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout} s")


def stop_services(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@cli.command()
def up(
    port: int = 8000,
    host: str = "127.0.0.1",
    inference_port: Annotated[
        int | None, typer.Option(help="Port of the inference server (loopback only); default a free one.")
    ] = None,
) -> None:
    """Run the API, a worker, the reconciler and the inference server in the foreground until Ctrl-C."""
    processes = start_services(port, host, inference_port=inference_port)
    typer.echo(f"Tuneforge on http://{host}:{port} (home {get_settings().resolved_home}); Ctrl-C stops it")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1)
            if not supervise(processes):
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop_services(processes)


def supervise(processes: list[subprocess.Popen]) -> bool:
    """Start a new worker in place of one that died (its job resumes elsewhere); False if another died."""
    for index, process in enumerate(processes):
        if process.poll() is None:
            continue
        is_worker = isinstance(process.args, list) and process.args[:6] == worker_command()[:6]
        if not is_worker:  # (workers differ only in their node name, after these six arguments)
            typer.echo(f"{process.args!r} exited with {process.returncode}; stopping", err=True)
            return False
        typer.echo(f"the worker exited with {process.returncode}; starting a new one", err=True)
        processes[index] = subprocess.Popen(worker_command(), env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return True


@cli.command()
def serve(
    host: str = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Default: TUNEFORGE_INFERENCE_PORT (8001).")] = None,
) -> None:
    """Run the inference server alone (needs torch); the API forwards chat and completions to it."""
    from worker.serving.app import run_server

    migrate.upgrade()
    run_server(host, port or get_settings().inference_port)


@cli.command()
def demo(port: int = 8765, epochs: int = 2) -> None:
    """Import SmolLM2, fine-tune it with LoRA on chat data, and compare answers before and after."""
    from app.demo import run_demo

    run_demo(port=port, epochs=epochs)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli()


if __name__ == "__main__":
    main()
