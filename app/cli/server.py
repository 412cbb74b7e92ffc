"""Commands that run on the server's machine with its settings: run the services, keys, the schema, the
demo; and `login`, which saves where a server is for the client commands."""

import os
import signal
import sys
import time
from typing import Annotated

import typer

from app.cli.client import DEFAULT_BASE_URL, OPTIONS, Client, CliError, say, write_profile
from app.config import get_settings

keys_cli = typer.Typer(no_args_is_help=True, help="API keys (on the server's machine).")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema (on the server's machine).")


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION."""
    from app.db import migrate

    migrate.upgrade(revision=revision)
    typer.echo(f"database at {revision}")


@keys_cli.command("create")
def keys_create(project: str = typer.Option(..., help="Project the key belongs to.")) -> None:
    """Create an API key; the key itself is the last line printed."""
    from app.db import migrate
    from app.db.session import session_scope
    from app.keys import service as key_service

    migrate.upgrade()
    with session_scope() as session:
        key, token = key_service.create_key(session, project=project)
    typer.echo(f"created {key.id} for project {project}")
    typer.echo(token)


@keys_cli.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id."""
    from app.db.session import session_scope
    from app.keys import service as key_service

    with session_scope() as session:
        if not key_service.revoke_key(session, key_id=key_id):
            raise CliError(f"no live key {key_id}")
    typer.echo(f"revoked {key_id}")


@keys_cli.command("list")
def keys_list(project: str | None = None) -> None:
    """List keys (ids and prefixes, never the keys)."""
    from app.db.session import session_scope
    from app.keys import service as key_service

    with session_scope() as session:
        for key in key_service.list_keys(session, project=project):
            state = "revoked" if key.revoked_at else "live"
            typer.echo(f"{key.id}  {key.project}  {key.prefix}...  {state}")


def login(
    base_url: Annotated[str, typer.Option(help="The server.")] = DEFAULT_BASE_URL,
    profile: Annotated[str, typer.Option(help="Save as this profile.")] = "default",
) -> None:
    """Save a server and its API key (TUNEFORGE_API_KEY, or asked for) as a profile, once the server
    accepts the key."""
    key = os.environ.get("TUNEFORGE_API_KEY") or typer.prompt("API key", hide_input=True)
    OPTIONS.base_url = base_url
    os.environ["TUNEFORGE_API_KEY"] = key  # this process's Client uses it; the profile keeps it
    with Client() as client:
        client.get("/v1/models")  # a wrong key or URL fails here, before anything is saved
        url = client.url
    path = write_profile(profile, url, key)
    say(f"saved profile {profile!r} for {url} in {path}")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def up(
    port: int = 8000,
    host: str = "127.0.0.1",
    inference_port: Annotated[
        int | None, typer.Option(help="Port of the inference server (loopback only); default a free one.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the services' own logs live.")] = False,
) -> None:
    """Run the API, a worker, the reconciler and the inference server in the foreground until Ctrl-C.

    The database and the broker are checked first; each service's output goes to TUNEFORGE_HOME/logs."""
    from app.services import local_url, preflight, start_services, stop_services, supervise, wait_each_ready

    # First: a stop while starting still stops what started.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    preflight(host, port, inference_port)
    log_dir = None if verbose else get_settings().resolved_home / "logs"
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    processes: list = []
    stopped_because = None
    url = local_url(host, port)
    try:
        processes += start_services(port, host, log_dir=log_dir, inference_port=inference_port)
        for name, where in wait_each_ready(url, processes, log_dir):
            say(f"{name:<11} ready  {where}")
        say(f"Tuneforge is up on {url}" + (f"; logs in {log_dir}" if log_dir else "") + ". Ctrl-C stops it.")
        while stopped_because is None:
            time.sleep(1)
            stopped_because = supervise(processes, log_dir)
    except KeyboardInterrupt:
        pass
    finally:
        stop_services(processes)
    if stopped_because:
        raise CliError(stopped_because)


def worker() -> None:
    """Run one worker in the foreground."""
    from app.db import migrate
    from app.services import check_broker, check_database, worker_command

    check_database()  # one line now, rather than Celery retrying a broker that is not there
    check_broker()
    migrate.upgrade()
    os.execv(sys.executable, worker_command())


def reconciler() -> None:
    """Run the reconciler loop (exactly one per deployment)."""
    from app import logs
    from app.reconciler import run_forever
    from app.services import check_broker, check_database

    check_database()
    check_broker()
    logs.configure()
    run_forever()


def serve(
    host: str = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Default: TUNEFORGE_INFERENCE_PORT (8001).")] = None,
) -> None:
    """Run the inference server alone (needs torch); the API forwards chat and completions to it."""
    from app.db import migrate
    from worker.serving.app import run_server

    migrate.upgrade()
    run_server(host, port or get_settings().inference_port)


def demo(port: int = 8765, epochs: int = 2) -> None:
    """Import SmolLM2, fine-tune it with LoRA on chat data, and compare answers before and after."""
    from app.demo import run_demo

    run_demo(port=port, epochs=epochs)
