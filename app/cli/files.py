"""`tuneforge files`: upload training data (with a progress bar) and list what is uploaded."""

from pathlib import Path
from typing import Annotated

import typer

from app.cli.client import Client, CliError, fields, show, table, transfer_bar, when

cli = typer.Typer(no_args_is_help=True, help="Training files.")


def upload_file(client: Client, path: Path, purpose: str = "fine-tune") -> dict:
    """Upload `path` with a progress bar; the file object. The server checks every line: its error names
    the one that was wrong."""
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    with path.open("rb") as raw, transfer_bar() as bar:
        # httpx reads the multipart file part in chunks: each read moves the bar.
        reader = bar.wrap_file(raw, total=path.stat().st_size, description=f"uploading {path.name}")
        files = {"file": (path.name, reader, "application/jsonl")}
        return client.post("/v1/files", files=files, data={"purpose": purpose})


@cli.command("upload")
def files_upload(
    path: Path,
    purpose: Annotated[
        str, typer.Option(help="fine-tune, or another purpose the API accepts.")
    ] = "fine-tune",
) -> None:
    """Upload a JSONL file; prints its id."""
    with Client(timeout=600) as client:
        uploaded = upload_file(client, path, purpose)
    show(
        uploaded,
        fields([("id", uploaded["id"]), ("file", uploaded["filename"]), ("bytes", uploaded["bytes"])]),
    )


@cli.command("list")
def files_list() -> None:
    """The files this key's project has uploaded, newest first."""
    with Client() as client:
        found = client.get("/v1/files")["data"]
    rows = [
        (
            f["id"],
            f["filename"],
            f["purpose"],
            f["bytes"],
            when(f["created_at"]),
        )
        for f in found
    ]
    show(found, table(("id", "file", "purpose", "bytes", "created"), rows))
