"""Artifact store: training files, checkpoints, adapters and run logs, addressed by keys from the database."""

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Protocol

from app.config import get_settings
from app.errors import ApiError

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-.]+)*$")


class ArtifactStore(Protocol):
    """What the rest of Tuneforge asks of a store: the local folder below, or app/object_store.py's S3."""

    def put_file(self, key: str, source: Path) -> None: ...
    def local_path(self, key: str) -> Path: ...
    def appendable(self, key: str) -> Path: ...
    def sync(self, key: str, *, done: bool = False) -> None: ...
    def evict(self, key: str) -> None: ...
    def read_from(self, key: str, offset: int) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def put_model_folder(self, name: str, folder: Path) -> str | None: ...
    def model_folder(self, key: str) -> Path: ...


def check_key(key: str) -> None:
    """Keys are built by Tuneforge from ids in the database; refuse anything else outright."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise ValueError(f"unsafe artifact key: {key!r}")


class LocalArtifactStore:
    """Artifacts under one folder; every write lands under a temp name and is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def put_file(self, key: str, source: Path) -> None:
        """Copy `source` into the store under `key`, atomically, and on disk before this returns.

        Callers write the database row that points at the artifact next: a crash after that commit must
        not find the row naming a file the kernel had not written yet. A failed copy (a full disk) leaves
        no temp file behind.
        """
        target = self._path(key)
        _make_folders(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            _fsync(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(target.parent)  # the rename itself

    def local_path(self, key: str) -> Path:
        """Where the artifact can be read on this machine."""
        return self._path(key)

    def appendable(self, key: str) -> Path:
        """A path a process may append to as it writes (a run's log): here the stored file itself, so
        each line is in the store once its write returns, whatever then happens to the writer."""
        path = self._path(key)
        _make_folders(path.parent)
        return path

    def sync(self, key: str, *, done: bool = False) -> None:
        """Nothing to do: an appendable file is the stored one."""

    def evict(self, key: str) -> None:
        """Nothing to do: the store's own file is the only copy."""

    def read_from(self, key: str, offset: int) -> bytes:
        """The artifact's bytes from `offset` on; empty when there are none (yet)."""
        try:
            with self._path(key).open("rb") as stream:
                stream.seek(offset)
                return stream.read()
        except FileNotFoundError:
            return b""

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def put_model_folder(self, name: str, folder: Path) -> None:
        """Nothing to upload: on one host a base model is read from the folder it was registered from."""

    def model_folder(self, key: str) -> Path:
        raise NotImplementedError("the local store keeps no base models; their rows name their folder")


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folders(folder: Path) -> None:
    """`mkdir -p`, each new folder flushed into its parent, so a crash cannot lose the path to a file."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync(new.parent)


def log_key(job_id: str, attempt: int) -> str:
    """Where the output (stdout and stderr) of a job's attempt is kept."""
    return f"logs/{job_id}/attempt-{attempt}.log"


def resume_state_key(checkpoint_key: str) -> str:
    """Where the rest of a checkpoint (optimizer, scheduler, RNG, trainer state) is kept for resume.

    Together with the model archive at `checkpoint_key` it is the whole checkpoint folder. It is a plain
    tar: optimizer states barely compress, and gzip would cost minutes on a large full fine-tune.
    """
    return checkpoint_key.removesuffix(".tar.gz") + ".state.tar"


@lru_cache
def get_store() -> ArtifactStore:
    """The configured artifact store: the local folder, or the object store at TUNEFORGE_ARTIFACT_URL."""
    settings = get_settings()
    if not settings.artifact_url:
        return LocalArtifactStore(settings.resolved_artifact_dir)
    from app.object_store import S3ArtifactStore, s3_client

    client = s3_client(
        settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id, settings.s3_secret_access_key
    )
    return S3ArtifactStore(
        settings.artifact_url, home=settings.resolved_home, client=client, part_mb=settings.s3_part_mb
    )


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

    def extract(into: Path) -> None:
        with tarfile.open(archive, "r:*") as tar:  # gzip for downloads, plain tar for resume states
            # Every member is checked before the first is written: a bad one last extracts nothing.
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                    problem = "an unsafe path"
                elif not (member.isfile() or member.isdir()):
                    problem = f"{_kind(member)}, where Tuneforge writes only regular files and folders,"
                else:
                    continue
                raise ApiError(
                    500,
                    f"The adapter archive of '{model_id}' holds {problem} at {member.name!r}.",
                    type="server_error",
                )
            tar.extractall(into, filter="data")  # a second guard: no paths out of the folder, no modes

    return publish_folder(folder, extract)


def publish_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """`folder`, filled by `fill` in a sibling temporary folder and renamed into place, so that readers
    (another process, another server) never see half of it; if another writer won the race, theirs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
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


def _kind(member: tarfile.TarInfo) -> str:
    """What a non-regular archive member is, in words."""
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    return f"an entry of type {member.type!r}"
