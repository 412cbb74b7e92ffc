"""Artifacts and base models in an S3-compatible object store: uploads in parts with their sha256, checked
copies cached per host, logs uploaded as they grow, base models uploaded once and fetched once per host,
and a clear 503 when the store is away.

The store is moto's standalone server (`python -m moto.server`), started on loopback by this module. It
is chosen because it comes from PyPI (MinIO's server is a Go binary that no registry this machine
reaches ships), runs as a process of its own as a real store does, and speaks the parts of S3 Tuneforge
uses: multipart uploads, user metadata, ranged reads. docker-compose.yml runs MinIO instead. The whole
job flow on several hosts sharing such a store is tests/test_multihost.py.
"""

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from sqlalchemy import create_engine, text

from app.object_store import ArtifactCorrupt, S3ArtifactStore, sha256_of
from tests.helpers import api_process, chat_jsonl
from tests.stack import wait_until

BUCKET = "tuneforge"


@dataclass
class ObjectStore:
    endpoint: str
    log: Path  # moto's request log: one line per request, e.g. "GET /tuneforge/<key> HTTP/1.1" 200

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def store(self, home: Path, prefix: str, part_mb: int = 64) -> S3ArtifactStore:
        """The artifact store of a process whose TUNEFORGE_HOME is `home`."""
        return S3ArtifactStore(f"s3://{BUCKET}/{prefix}", home=home, client=self.client(), part_mb=part_mb)

    def requests(self, method: str, key_part: str) -> int:
        """How many `method` requests for objects whose name holds `key_part` the store has answered."""
        lines = self.log.read_text().splitlines()
        return sum(f'"{method} /{BUCKET}/' in line and key_part in line for line in lines)


@pytest.fixture(scope="module")
def object_store() -> Iterator[ObjectStore]:
    from app.services import free_port

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tuneforge-s3-")) / "moto.log"
    with log.open("ab") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    result = ObjectStore(f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: _answers(result.endpoint), "moto's S3 server answers", 60)
        result.client().create_bucket(Bucket=BUCKET)
        yield result
    finally:
        server.kill()
        server.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_objects_go_up_in_parts_with_their_sha256_and_a_bad_copy_is_never_used(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 << 20))
    writer = object_store.store(tmp_path / "host-a", "parts", part_mb=5)
    writer.put_file("files/big.bin", source)

    client = object_store.client()
    head = client.head_object(Bucket=BUCKET, Key="parts/files/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), "12 MiB in parts of 5 MiB is a three-part upload"
    assert head["Metadata"]["sha256"] == sha256_of(source)

    reader = object_store.store(tmp_path / "host-b", "parts")
    copy = reader.local_path("files/big.bin")
    assert copy.read_bytes() == source.read_bytes() and copy.is_relative_to(tmp_path / "host-b")
    before = object_store.requests("GET", "parts/files/big.bin")
    assert reader.local_path("files/big.bin") == copy
    assert object_store.requests("GET", "parts/files/big.bin") == before, "a checked copy is fetched once"

    # The object's bytes change behind the store's back, its recorded sha256 not: no host uses them.
    client.put_object(Bucket=BUCKET, Key="parts/files/big.bin", Body=b"tampered", Metadata=head["Metadata"])
    third = object_store.store(tmp_path / "host-c", "parts")
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        third.local_path("files/big.bin")
    kept = [p.name for p in (tmp_path / "host-c").rglob("*") if p.name == "big.bin" or ".tmp-" in p.name]
    assert kept == [], "neither the bad copy nor its temp file is left"

    writer.delete("files/big.bin")
    assert not reader.local_path("files/big.bin").exists(), "a deleted object leaves no copy in use"


def test_logs_reach_the_store_as_they_grow(object_store: ObjectStore, tmp_path: Path) -> None:
    writer = object_store.store(tmp_path / "worker", "logs")
    reader = object_store.store(tmp_path / "api", "logs")
    key = "logs/ftjob-x/attempt-1.log"
    with writer.appendable(key).open("ab", buffering=0) as log:
        log.write(b"Step 1/2\n")
        assert reader.read_from(key, 0) == b"", "nothing is in the store before the first sync"
        writer.sync(key)
        log.write(b"Step 2/2\n")
        writer.sync(key)
    assert reader.read_from(key, 0) == b"Step 1/2\nStep 2/2\n"
    assert reader.read_from(key, 9) == b"Step 2/2\n" and reader.read_from(key, 18) == b""
    assert reader.local_path(key).read_bytes() == b"Step 1/2\nStep 2/2\n"


@pytest.fixture(scope="module")
def deployment(object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The settings of a deployment storing in the bucket: its database is SQLite on the registering
    host (only this module's CLI and API processes read it); every process gets a home of its own."""
    home = tmp_path_factory.mktemp("registry")
    return os.environ | {
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{home}/tuneforge.db",
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_ARTIFACT_URL": f"s3://{BUCKET}/deployment",
        "TUNEFORGE_S3_ENDPOINT_URL": object_store.endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def registered(env: dict[str, str], model: str) -> tuple[str, str]:
    """(storage_key, path) of a base model's row."""
    engine = create_engine(env["TUNEFORGE_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            query = text("SELECT storage_key, path FROM models WHERE id = :m")
            key, path = connection.execute(query, {"m": model}).one()
            return key, path
    finally:
        engine.dispose()


def test_a_base_model_goes_up_once_and_each_host_fetches_it_once(
    deployment: dict[str, str], object_store: ObjectStore, tmp_path: Path
) -> None:
    cli(deployment, "models", "make-tiny")
    key, path = registered(deployment, "tiny-llama")
    assert key.startswith("base-models/tiny-llama/")
    weights = f"deployment/{key}/model.safetensors"
    assert object_store.requests("PUT", weights) == 1
    cli(deployment, "models", "make-tiny")
    assert registered(deployment, "tiny-llama") == (key, path)
    assert object_store.requests("PUT", weights) == 1, "the same folder registered again uploads nothing"

    # Two processes of one new host ask for the model at once: one fetches, the other waits and reuses it.
    env = deployment | {"TUNEFORGE_HOME": str(tmp_path)}
    code = (
        "import hashlib, sys; from app.storage import get_store; "
        "folder = get_store().model_folder(sys.argv[1]); "
        "print(folder, hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest())"
    )
    fetchers = [
        subprocess.Popen([sys.executable, "-c", code, key], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = {fetcher.communicate(timeout=120)[0].strip() for fetcher in fetchers}
    assert all(fetcher.returncode == 0 for fetcher in fetchers)
    [output] = outputs
    folder, digest = output.split()
    assert Path(folder).is_relative_to(tmp_path)
    assert digest == sha256_of(Path(path) / "model.safetensors")
    assert object_store.requests("GET", weights) == 1, "one host fetches a model once"


def test_an_unreachable_store_is_a_503_that_names_it_and_keeps_nothing(deployment: dict[str, str]) -> None:
    """An API whose object store is away refuses an upload with a 503 naming the store, and no file is
    recorded for the upload."""
    from app.services import free_port

    key = cli(deployment, "keys", "create", "--project", "s3").strip().splitlines()[-1]
    away = f"http://127.0.0.1:{free_port()}"
    with api_process(deployment | {"TUNEFORGE_S3_ENDPOINT_URL": away}, "api-cut-off.log") as (url, _):
        headers = {"Authorization": f"Bearer {key}"}
        response = httpx.post(
            f"{url}/v1/files",
            headers=headers,
            files={"file": ("train.jsonl", chat_jsonl(4))},
            data={"purpose": "fine-tune"},
            timeout=120,
        )
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "artifact_store_unavailable" and away in error["message"], error
        assert httpx.get(f"{url}/v1/files", headers=headers).json()["data"] == []
