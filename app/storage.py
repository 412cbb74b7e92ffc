"""Artifact store: training files, checkpoints and adapters, addressed by keys that come from the database."""

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from app.config import get_settings

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-.]+)*$")


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...
    def local_path(self, key: str) -> Path: ...
    def delete(self, key: str) -> None: ...


class LocalArtifactStore:
    """Artifacts under one folder; every write lands under a temp name and is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        # Keys are built by Tuneforge from ids in the database; refuse anything else outright.
        if not _SAFE_KEY.match(key) or ".." in key:
            raise ValueError(f"unsafe artifact key: {key!r}")
        return self.root / key

    def put_file(self, key: str, source: Path) -> None:
        """Copy `source` into the store under `key`, atomically."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def local_path(self, key: str) -> Path:
        """Where the artifact can be read on this machine."""
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def get_store() -> LocalArtifactStore:
    """The configured artifact store."""
    return LocalArtifactStore(get_settings().resolved_artifact_dir)
