"""Artifact store: training files, checkpoints and adapters, addressed by keys that come from the database."""

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol

from app.config import get_settings
from app.errors import ApiError

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


def cache_folder(area: str, model_id: str) -> Path:
    """Where `area` ('serving', 'vllm') keeps the adapter of `model_id` unpacked; ids are not path-safe."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)
    return get_settings().resolved_home / area / "adapters" / f"{safe}-{digest}"


def unpack_once(archive: Path, folder: Path, *, model_id: str) -> Path:
    """An adapter archive unpacked into `folder`, once; atomically, so readers never see half of it."""
    if folder.is_dir():
        return folder
    if not archive.is_file():
        raise ApiError(
            500, f"The adapter of '{model_id}' is missing from the artifact store.", type="server_error"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:  # gzip for downloads, plain tar for resume states
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                    raise ApiError(
                        500,
                        f"The adapter archive of '{model_id}' holds an unsafe path: {member.name!r}.",
                        type="server_error",
                    )
            tar.extractall(tmp, filter="data")  # also refuses links out of the folder and devices
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a server running as another user may read it
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # another request may have won the race; otherwise it is a real failure
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
