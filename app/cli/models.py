"""`tuneforge models`: list the models a key sees and download fine-tuned ones (HTTP); register base models
(on the server's machine)."""

import hashlib
import re
from pathlib import Path
from typing import Annotated

import typer

from app.cli.client import Client, CliError, show, table, transfer_bar, when
from app.digest import HEADER, archive_name, sha256_of

cli = typer.Typer(
    no_args_is_help=True, help="Models: list and download (client); register base models (server)."
)


@cli.command("list")
def models_list() -> None:
    """The base and fine-tuned models this key can use."""
    with Client() as client:
        models = client.get("/v1/models")["data"]
    rows = [(m["id"], m.get("owned_by"), when(m["created"])) for m in models]
    show(models, table(("id", "owned by", "created"), rows))


def _file_name(disposition: str | None, model: str, merged: bool) -> str:
    """The server's file name for the archive, never a path it chose; ours if it sent none usable."""
    found = re.search(r'filename="?([^";/]+)"?', disposition or "")
    name = Path(found.group(1)).name if found else ""
    return name if name not in ("", ".", "..") else archive_name(model, merged=merged)


@cli.command("download")
def models_download(
    model: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write; default the server's file name.")
    ] = None,
    merged: Annotated[bool, typer.Option("--merged", help="The base with the adapter merged in.")] = False,
) -> None:
    """Download a fine-tuned model's adapter (or merged weights) as a .tar.gz, checking its SHA-256."""
    path = f"/v1/models/{model}/merged" if merged else f"/v1/models/{model}/adapter"
    sha = hashlib.sha256()
    # A merged export is built on the server first: allow it time.
    with Client(timeout=600) as client, client.stream("GET", path) as response:
        expected = sha256_of(response.headers.get(HEADER))
        if expected is None:  # before any byte is written: nothing could check them
            raise CliError(f"the server sent no {HEADER} header, so a download could not be checked")
        target = output or Path(_file_name(response.headers.get("content-disposition"), model, merged))
        total = int(response.headers.get("content-length", 0)) or None
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as handle, transfer_bar() as bar:
                task = bar.add_task(model, total=total)
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
                    sha.update(chunk)
                    bar.advance(task, len(chunk))
            written = partial.stat().st_size
            if total is not None and written != total:
                raise CliError(f"the download stopped after {written} of {total} bytes; run it again")
            if sha.digest() != expected:
                raise CliError("the downloaded file's SHA-256 differs from the server's; run it again")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    result = {"model": model, "path": str(target), "bytes": written, "sha256": sha.hexdigest()}
    show(result, table(("saved", "bytes", "sha256 (checked)"), [(target, written, sha.hexdigest())]))


@cli.command("make-tiny")
def models_make_tiny(
    name: str = "tiny-llama",
    seed: int = 0,
    hidden_size: Annotated[int, typer.Option(help="Width; 1024 with 4 layers gives ~49M parameters.")] = 64,
    layers: Annotated[int, typer.Option(help="Decoder blocks.")] = 2,
    intermediate_size: Annotated[int, typer.Option(help="MLP width.")] = 128,
) -> None:
    """Build a small random Llama with a chat template locally and register it (server side)."""
    from app.models.local import make_tiny

    typer.echo(make_tiny(name, seed, hidden_size, layers, intermediate_size))


@cli.command("import-gguf")
def models_import_gguf(file: Path, name: str = typer.Option(..., help="Model id to register.")) -> None:
    """Convert a GGUF file into a safetensors model folder and register it (server side)."""
    from app.models.local import import_gguf

    typer.echo(import_gguf(file, name))


@cli.command("import")
def models_import(folder: Path, name: str = typer.Option(..., help="Model id to register.")) -> None:
    """Register an existing Hugging Face model folder (safetensors) as a base model (server side)."""
    from app.models.local import register_folder

    try:
        typer.echo(register_folder(name, folder))
    except ValueError as exc:  # e.g. pickle weights only: the message says what to do
        raise CliError(str(exc)) from None
