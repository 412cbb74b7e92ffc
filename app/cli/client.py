"""How the client commands reach a Tuneforge server: over HTTP only, never its database.

Where the server is and which key to use, first found wins: the `--base-url` option, then the environment
(TUNEFORGE_BASE_URL, TUNEFORGE_API_KEY), then a profile in the profile file (`tuneforge login` writes it;
`--profile` or TUNEFORGE_PROFILE picks one, `default` otherwise), then http://127.0.0.1:8000, where
`tuneforge up` listens.

Every failure becomes a `CliError`, one sentence: the server's own message for an API error (OpenAI's
envelope), or what to check when the server cannot be reached.
"""

import json
import os
import sys
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Printing to stdout: tables and JSON. Messages about progress and errors go to stderr (`status`), so a
# script can pipe the output.
# Piped, tables keep their rows whole: no terminal width to fit.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
status = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """What went wrong, in one sentence the user can act on; the CLI prints it and exits `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1, *, transient: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.transient = transient  # the server could not be reached, or was briefly unavailable: try again


@dataclass
class Options:
    """The global options, set by the root command before any subcommand runs."""

    base_url: str | None = None
    profile: str | None = None
    json: bool = False


OPTIONS = Options()


def profile_path() -> Path:
    """Where `tuneforge login` keeps profiles (TUNEFORGE_PROFILES moves it)."""
    return Path(
        os.environ.get("TUNEFORGE_PROFILES") or Path.home() / ".config" / "tuneforge" / "profiles.toml"
    )


def read_profiles() -> dict[str, dict[str, str]]:
    """Every saved profile by name: its base_url and api_key."""
    path = profile_path()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"the profile file {path} is not valid TOML: {exc}") from None


def write_profile(name: str, base_url: str, api_key: str) -> Path:
    """Save profile `name` (readable by this user only: it holds a key)."""
    profiles = read_profiles() | {name: {"base_url": base_url, "api_key": api_key}}
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # TOML's basic strings are JSON's: json.dumps quotes and escapes them.
    lines = []
    for profile, values in profiles.items():
        lines.append(f"[{json.dumps(profile, ensure_ascii=False)}]")  # TOML has no surrogate escapes
        lines += [f"{key} = {json.dumps(str(value), ensure_ascii=False)}" for key, value in values.items()]
        lines.append("")
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join(lines))
    return path


def _profile() -> dict[str, str]:
    name = OPTIONS.profile or os.environ.get("TUNEFORGE_PROFILE")
    profiles = read_profiles()
    if name and name not in profiles:
        known = ", ".join(profiles) or "none yet"
        raise CliError(
            f"no profile {name!r} in {profile_path()} (profiles: {known}); `tuneforge login` adds one"
        )
    return profiles.get(name or "default", {})


def base_url() -> str:
    """The server to talk to (see the module for where it comes from)."""
    url = (
        OPTIONS.base_url
        or os.environ.get("TUNEFORGE_BASE_URL")
        or _profile().get("base_url")
        or DEFAULT_BASE_URL
    )
    parsed = httpx.URL(url) if "://" in url else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise CliError(f"bad base URL {url!r}: give the server's address, like {DEFAULT_BASE_URL}")
    return url.rstrip("/")


def api_key() -> str:
    """The key to send; CliError naming the ways to give one if there is none."""
    key = os.environ.get("TUNEFORGE_API_KEY") or _profile().get("api_key")
    if not key:
        raise CliError(
            "no API key: set TUNEFORGE_API_KEY or run `tuneforge login` "
            "(an operator creates keys with `tuneforge keys create --project NAME`)"
        )
    return key


def api_error(response: httpx.Response) -> CliError:
    """The server's message for a failed request: OpenAI's error envelope, or the status line."""
    try:
        error = response.json()["error"]
        message = str(error["message"])
        if error.get("param") and error["param"] not in message:
            message += f" (field: {error['param']})"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code} {response.reason_phrase}"
    if response.status_code == 401:
        message += ". Check TUNEFORGE_API_KEY or your profile (`tuneforge login`)"
    return CliError(message, transient=response.status_code in (429, 502, 503, 504))


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turn httpx's transport failures into one sentence naming the server."""
    try:
        yield
    except httpx.TimeoutException:
        raise CliError(f"{url} did not answer in time", transient=True) from None
    except httpx.TransportError as exc:
        reason = str(exc) or exc.__class__.__name__
        raise CliError(
            f"cannot reach Tuneforge at {url} ({reason}); is the server running? "
            "Set --base-url or TUNEFORGE_BASE_URL to where it is",
            transient=True,
        ) from None


class Client:
    """An httpx client for the configured server that raises CliError for any failed request."""

    def __init__(self, timeout: float = 60) -> None:
        self.url = base_url()
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key()}", "User-Agent": "tuneforge-cli"},
            timeout=timeout,
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with reaching(self.url):
            response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise api_error(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        with reaching(self.url), self.http.stream(method, path, **kwargs) as response:
            if response.is_error:
                response.read()
                raise api_error(response)
            yield response


def show(value: Any, table: Table | None = None) -> None:
    """Print `value` as JSON with --json, else `table` (or `value` as JSON when there is no table)."""
    if not OPTIONS.json and table is not None:
        out.print(table)
    elif sys.stdout.isatty():
        out.print_json(json.dumps(value))
    else:
        print(json.dumps(value, indent=2))


def say(text: str) -> None:
    """A message to stderr, printed as it is: it may hold brackets Rich would read as markup."""
    status.print(text, markup=False, highlight=False)


def when(seconds: int | None) -> str:
    """A Unix time as the tables show it (UTC)."""
    return "" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def transfer_bar() -> Progress:
    """A progress bar for an upload or download: bytes done and speed."""
    return Progress(
        *Progress.get_default_columns()[:2],
        DownloadColumn(),
        TransferSpeedColumn(),
        console=status,
        transient=True,
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> Table:
    """Rows under column headings; empty cells for None."""
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    view = Table(title=title, title_justify="left", header_style="bold")
    for index, column in enumerate(columns):
        # The first column names the row (an id to copy): whole, however narrow the terminal.
        widest = max((len(row[index]) for row in cells), default=0) if index == 0 else None
        view.add_column(column, no_wrap=index == 0, min_width=widest)
    for row in cells:
        view.add_row(*row)
    return view


def fields(pairs: Sequence[tuple[str, Any]]) -> Table:
    """A two-column table of names and values."""
    view = Table(show_header=False, box=None, pad_edge=False)
    view.add_column(style="bold")
    view.add_column(overflow="fold")
    for name, value in pairs:
        view.add_row(name, "" if value is None else str(value))
    return view
