"""The `tuneforge` command: a client of a Tuneforge server, and the tools that run one.

Client commands speak HTTP to a server (`--base-url`, TUNEFORGE_API_KEY or a profile: app/cli/client.py):

    tuneforge login --base-url http://gpu-box:8000        # saves the server and key as a profile
    tuneforge files upload train.jsonl                    # progress bar; prints the file id
    tuneforge jobs create --model tiny-llama --training-file file-... --method lora
    tuneforge jobs follow ftjob-...                        # progress, loss, log; exits 0 on success
    tuneforge chat ft:tiny-llama:...                       # streams; interactive without a prompt

Server commands run on the server's machine, with its settings (TUNEFORGE_DATABASE_URL, ...):

    tuneforge up --port 8000            # API + worker + reconciler + inference server
    tuneforge keys create --project me  # prints a new API key as its last line
    tuneforge models make-tiny          # registers `tiny-llama`

Any failure prints one line that says what to fix, never a traceback, and exits non-zero.
"""

import os
import sys
from typing import Annotated

import typer

from app.cli import chat, estimate, files, jobs, models, server
from app.cli.client import OPTIONS, CliError, status

cli = typer.Typer(
    no_args_is_help=True,
    help="Tuneforge: self-hosted, OpenAI-compatible fine-tuning.",
    pretty_exceptions_enable=False,  # errors are one line (main), never a traceback
    rich_markup_mode=None,
)


@cli.callback()
def options(
    base_url: Annotated[
        str | None, typer.Option(help="The server, e.g. http://127.0.0.1:8000 (or TUNEFORGE_BASE_URL).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="A profile saved by `tuneforge login` (or TUNEFORGE_PROFILE).")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    OPTIONS.base_url, OPTIONS.profile, OPTIONS.json = base_url, profile, json


cli.add_typer(files.cli, name="files")
cli.add_typer(jobs.cli, name="jobs")
cli.add_typer(models.cli, name="models")
cli.add_typer(server.keys_cli, name="keys")
cli.add_typer(server.db_cli, name="db")
cli.command("chat")(chat.chat)
cli.command("estimate")(estimate.estimate)
cli.command("login")(server.login)
for command in (server.up, server.worker, server.reconciler, server.serve, server.demo):
    cli.command()(command)


def explain(exc: Exception) -> str:
    """One line for an error the commands did not expect: what it is, and for the usual ones, what to do."""
    from app.services import ServiceError, first_line, redacted

    if isinstance(exc, CliError | ServiceError):
        return str(exc)
    library = type(exc).__module__.split(".")[0]
    if library == "sqlalchemy":
        from app.config import get_settings

        url = redacted(get_settings().resolved_database_url)
        return (
            f"database error at {url}: {first_line(exc)}. Check TUNEFORGE_DATABASE_URL, then "
            "`tuneforge db upgrade`"
        )
    if library == "alembic":
        return (
            f"database schema: {exc}. `tuneforge db upgrade` applies missing migrations; a database newer "
            "than this Tuneforge needs Tuneforge upgraded"
        )
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A root option, accepted after the command too: `tuneforge jobs get X --json`.
    if "--json" in sys.argv[2:]:
        sys.argv.remove("--json")
        sys.argv.insert(1, "--json")
    try:
        cli()  # Ctrl-C: typer exits 130 without a traceback
    except CliError as exc:
        status.print(f"error: {exc}", style="red", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:  # never a traceback: one line that says what to fix
        status.print(f"error: {explain(exc)}", style="red", markup=False, highlight=False)
        sys.exit(1)
