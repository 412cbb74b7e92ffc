"""Checksums of the archives Tuneforge serves, as RFC 9530's `Repr-Digest` header (`sha-256=:<base64>:`),
so a client can check that what it saved is what the server holds (`tuneforge models download` does)."""

import base64
import functools
import hashlib
from pathlib import Path

HEADER = "Repr-Digest"


def archive_name(model_id: str, *, merged: bool = False) -> str:
    """The file name a model's archive is served under: its id, with the characters a file name cannot
    hold (':' and '/') as '_'."""
    return model_id.replace(":", "_").replace("/", "_") + ("-merged" if merged else "") + ".tar.gz"


def repr_digest(path: Path) -> str:
    """The header's value for the file at `path`; computed once per version of the file."""
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file hashes anew
    with open(path, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256")
    return f"sha-256=:{base64.b64encode(sha.digest()).decode()}:"


def sha256_of(header: str | None) -> bytes | None:
    """The SHA-256 a `Repr-Digest` value names, or None when it names none."""
    for member in (header or "").split(","):
        algorithm, _, value = member.strip().partition("=")
        if algorithm.strip().lower() == "sha-256" and value.startswith(":") and value.endswith(":"):
            try:
                return base64.b64decode(value[1:-1], validate=True)
            except ValueError:
                return None
    return None
