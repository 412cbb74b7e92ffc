"""The artifact store in an S3-compatible object store (TUNEFORGE_ARTIFACT_URL=s3://bucket/prefix).

Every host (API, workers, inference) reads and writes the same bucket and needs no folder another host
wrote. What a host reads it keeps in a local cache (home/cache/artifacts), shared by its processes:
a download lands under a temp name, is checked against the sha256 the uploader recorded in the object's
metadata, and is renamed into place under a file lock, so two processes never fetch the same object at
once and no reader sees half of one. Objects are never changed in place: a key is written once (logs,
rewritten as they grow, are the exception), so a cached copy is valid while its sha256 matches the
object's.

Uploads go through boto3's transfer manager: larger objects in parts, several at once. A base model
folder is uploaded once, file by file, with a manifest written last; a host fetches the whole folder
into its cache on first use (see `model_folder`).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.errors import ApiError

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactCorrupt(OSError):
    """A downloaded object's bytes do not match the sha256 recorded when it was uploaded."""


class StoreUnavailable(ApiError):
    """The object store could not be reached, or refused a request: a 503 for API callers."""

    def __init__(self, where: str, doing: str, error: Exception) -> None:
        super().__init__(
            503,
            f"The artifact store at {where} failed while {doing}: {error}. Nothing was stored; retry later.",
            type="server_error",
            code="artifact_store_unavailable",
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive lock among this host's processes (flock on `lock`), released when the block ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


class S3ArtifactStore:
    """Artifacts as objects under `s3://bucket/prefix/<key>`, with a local cache of what this host reads."""

    def __init__(self, url: str, *, home: Path, client: Any, part_mb: int) -> None:
        from boto3.s3.transfer import TransferConfig

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"TUNEFORGE_ARTIFACT_URL must look like s3://bucket/prefix, not {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.client = client
        self.where = f"{client.meta.endpoint_url}/{self.bucket}"
        self.cache = home / "cache" / "artifacts"
        self.spool = home / "spool"  # logs being written here, uploaded as they grow (see `sync`)
        self.transfer = TransferConfig(
            multipart_threshold=part_mb << 20, multipart_chunksize=part_mb << 20, max_concurrency=4
        )

    @contextlib.contextmanager
    def _talking(self, doing: str) -> Iterator[None]:
        """boto3's errors as StoreUnavailable, with the store and the request named."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise StoreUnavailable(self.where, doing, error) from error

    def _name(self, key: str) -> str:
        from app.storage import check_key

        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # The store's interface (app.storage.ArtifactStore) --------------------------------------------------

    def put_file(self, key: str, source: Path) -> None:
        """Upload `source` under `key` with its sha256; the object appears whole, or not at all."""
        name, sha256 = self._name(key), sha256_of(source)
        with self._talking(f"uploading {key}"):
            self.client.upload_file(
                str(source),
                self.bucket,
                name,
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=self.transfer,
            )

    def local_path(self, key: str) -> Path:
        """This host's checked copy of the object, fetched on first use; a path that does not exist when
        the store has no such object (as the local store's would not)."""
        cached = self.cache / key
        self._name(key)  # refuse an unsafe key before it becomes a path
        stored = self._sha256(key)
        if stored is None:
            _discard(cached)
            return cached
        with _locked(_lock_of(cached)):
            if _cached_sha256(cached) == stored and cached.is_file():
                return cached
            self._download(key, cached, stored)
        return cached

    def appendable(self, key: str) -> Path:
        """A local file a run appends its log to; `sync` puts it in the store as it grows."""
        self._name(key)
        path = self.spool / key
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def sync(self, key: str, *, done: bool = False) -> None:
        """Upload the spooled file of `key` (see `appendable`) if it has grown since its last upload; once
        the writer is `done`, the spooled copy goes."""
        path = self.spool / key
        size_file = path.with_name(f".{path.name}.uploaded")
        try:
            content = path.read_bytes()  # a snapshot: the writer may append while this uploads
        except FileNotFoundError:
            return
        if not (size_file.is_file() and size_file.read_text() == str(len(content))):
            self._put_bytes(key, content)
            size_file.write_text(str(len(content)))
        if done:
            path.unlink()
            size_file.unlink()

    def evict(self, key: str) -> None:
        """Drop this host's copy of an object it will not read again (a checkpoint it has resumed from)."""
        self._name(key)
        _discard(self.cache / key)

    def read_from(self, key: str, offset: int) -> bytes:
        """The object's bytes from `offset` on; empty when there are none (yet)."""
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._talking(f"reading {key}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={offset}-")
            except ClientError as error:
                if _code(error) in ("NoSuchKey", "InvalidRange", "404", "416"):
                    return b""
                raise
            return bytes(response["Body"].read())

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._talking(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=name)
        _discard(self.cache / key)

    # Base model folders ---------------------------------------------------------------------------------

    def put_model_folder(self, name: str, folder: Path) -> str:
        """Upload a base model's folder once; returns its key (a prefix), named by its content.

        Each file goes up with its sha256, then the manifest listing them: a folder whose manifest is in
        the store is complete. Registering the same folder again uploads nothing new.
        """
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        listing = {
            str(p.relative_to(folder)): {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in files
        }
        manifest = json.dumps(listing, sort_keys=True).encode()
        key = f"base-models/{name}/{hashlib.sha256(manifest).hexdigest()[:16]}"
        if self._sha256(f"{key}/{MANIFEST}") is None:
            for relative in listing:
                self.put_file(f"{key}/{relative}", folder / relative)
            self._put_bytes(f"{key}/{MANIFEST}", manifest)
        return key

    def model_folder(self, key: str) -> Path:
        """The base model folder at `key`, fetched whole into this host's cache on first use.

        The files are downloaded and checked into a temp folder that is renamed into place, so a process
        that finds the folder finds all of it; the lock makes the other processes of this host wait for
        the one fetching rather than fetch it too.
        """
        folder = self.cache / key
        with _locked(_lock_of(folder)):
            if folder.is_dir():
                return folder
            manifest = self.read_from(f"{key}/{MANIFEST}", 0)
            if not manifest:
                raise ApiError(
                    500, f"The base model at '{key}' is missing from the object store.", type="server_error"
                )
            if not key.endswith(hashlib.sha256(manifest).hexdigest()[:16]):  # the key names the content
                raise ArtifactCorrupt(f"the manifest of base model {key!r} fails its checksum")
            listing = json.loads(manifest)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
            try:
                for relative, entry in listing.items():
                    self._download(f"{key}/{relative}", tmp / relative, entry["sha256"])
                os.chmod(tmp, 0o755)
                os.rename(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return folder

    # ------------------------------------------------------------------------------------------------------

    def _sha256(self, key: str) -> str | None:
        """The sha256 recorded with the object, or None when there is no such object."""
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._talking(f"looking up {key}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as error:
                if _code(error) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return str(head.get("Metadata", {}).get("sha256", ""))

    def _put_bytes(self, key: str, content: bytes) -> None:
        name = self._name(key)
        with self._talking(f"uploading {key}"):
            self.client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=content,
                Metadata={"sha256": hashlib.sha256(content).hexdigest()},
            )

    def _download(self, key: str, target: Path, expected: str) -> None:
        """Fetch the object into `target` through a temp file, refusing bytes that fail the sha256."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with self._talking(f"downloading {key}"):
                self.client.download_file(self.bucket, self._name(key), tmp_name, Config=self.transfer)
            got = sha256_of(tmp)
            if got != expected:
                raise ArtifactCorrupt(
                    f"artifact {key!r} fails its checksum: sha256 {got}, uploaded as {expected}"
                )
            os.replace(tmp, target)
            _sha_file(target).write_text(expected)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _lock_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _sha_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def _cached_sha256(path: Path) -> str | None:
    try:
        return _sha_file(path).read_text()
    except FileNotFoundError:
        return None


def _discard(cached: Path) -> None:
    """Drop this host's copy of an object that is gone from the store."""
    cached.unlink(missing_ok=True)
    _sha_file(cached).unlink(missing_ok=True)


def s3_client(endpoint_url: str, region: str, access_key_id: str, secret_access_key: str) -> Any:
    import boto3
    from botocore.config import Config

    credentials = (
        {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key}
        if access_key_id
        else {}
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region,
        # Path-style addressing: MinIO and other self-hosted stores serve no per-bucket host names.
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        **credentials,
    )
