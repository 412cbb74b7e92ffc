"""Security over real HTTP: path traversal, upload size limits, pickles (weights, messages, resume states)."""

import http.client
import io
import json
import os
import pickle
import select
import shutil
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa

from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import Checkpoint
from app.models.local import register_folder
from app.queue import RUN_JOB, celery_app, job_queue
from app.storage import LocalArtifactStore, get_store, resume_state_key
from tests.helpers import (
    TEST_HOME,
    api_process,
    chat_jsonl,
    checkpoint_steps,
    job_body,
    process_mb,
    upload,
    wait_for_event,
    wait_for_status,
    wait_for_step,
)
from worker.training.base_models import inspect_model
from worker.training.resume import last_checkpoint

SECRET = b"tuneforge-secret-outside-the-store"

# As they appear in the URL. Once uvicorn has decoded them, these hold a '.' or '..' segment or a control
# character (NUL): app/main.py refuses them before routing, on every route, with 400 `invalid_path`.
DOT_OR_CONTROL_IDS = [
    "../../secret.txt",
    "..%2f..%2fsecret.txt",
    "%2e%2e%2f%2e%2e%2fsecret.txt",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "file-abc%00.jsonl",
    "%00",
    "files/..%2f..%2f..%2fsecret.txt",
]
# Decoded, these have no dot segment: each reaches its route as an id nothing has, and is unknown there.
UNKNOWN_IDS = ["..%252f..%252fsecret.txt", "..%5c..%5csecret.txt"]
# Absolute: no file or job route takes a path with an empty segment; model ids may hold '/', so the model
# routes look it up, and find nothing.
ABSOLUTE_IDS = ["/etc/passwd", "%2fetc%2fpasswd"]
BAD_IDS = DOT_OR_CONTROL_IDS + UNKNOWN_IDS + ABSOLUTE_IDS

# Every route that takes an id: (method, path template, the code of its 404 for an unknown id).
ID_ROUTES = [
    ("GET", "/v1/files/{}", "file_not_found"),
    ("GET", "/v1/files/{}/content", "file_not_found"),
    ("DELETE", "/v1/files/{}", "file_not_found"),
    ("GET", "/v1/fine_tuning/jobs/{}", "fine-tuning_job_not_found"),
    ("GET", "/v1/fine_tuning/jobs/{}/events", "fine-tuning_job_not_found"),
    ("GET", "/v1/fine_tuning/jobs/{}/checkpoints", "fine-tuning_job_not_found"),
    ("POST", "/v1/fine_tuning/jobs/{}/cancel", "fine-tuning_job_not_found"),
    ("POST", "/v1/fine_tuning/jobs/{}/pause", "fine-tuning_job_not_found"),
    ("POST", "/v1/fine_tuning/jobs/{}/resume", "fine-tuning_job_not_found"),
    ("GET", "/v1/models/{}", "model_not_found"),
    ("GET", "/v1/models/{}/adapter", "model_not_found"),
    ("DELETE", "/v1/models/{}", "model_not_found"),
    ("GET", "/v1/models/{}/merged", "model_not_found"),
]


def refusal(bad_id: str, template: str, unknown: str) -> tuple[int, str]:
    """The status and error code a bad id must get on the route `template`."""
    if bad_id in DOT_OR_CONTROL_IDS:
        return 400, "invalid_path"
    if bad_id in ABSOLUTE_IDS and not template.startswith("/v1/models/"):
        return 404, "not_found"  # no route matched
    return 404, unknown


def raw_request(base_url: str, method: str, path: str, key: str) -> tuple[int, bytes]:
    """Send `path` exactly as written: httpx would resolve the dot segments before sending."""
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {key}")
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def secret_outside_store(server: str) -> Path:
    """A file next to the artifact store, where '../' from a stored key would land."""
    secret = get_settings().resolved_artifact_dir.parent / "secret.txt"
    secret.write_bytes(SECRET)
    return secret


@pytest.mark.parametrize(("method", "template", "unknown"), ID_ROUTES)
def test_traversal_ids_never_reach_the_filesystem(
    method: str, template: str, unknown: str, server: str, api_key: str, secret_outside_store: Path
) -> None:
    for bad_id in BAD_IDS:
        status, body = raw_request(server, method, template.format(bad_id), api_key)
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (status, error["code"]) == refusal(bad_id, template, unknown), (method, template, bad_id, body)
        assert SECRET not in body and b"root:" not in body


def test_traversal_next_to_a_real_file_id(server: str, api_key: str, http: httpx.Client) -> None:
    """A real id with a traversal tail: the route does not match, nothing is served."""
    file_id = upload(http, chat_jsonl(4))["id"]
    for tail in ("/../../secret.txt", "%2f..%2f..%2fsecret.txt", "/content/../../../secret.txt"):
        status, body = raw_request(server, "GET", f"/v1/files/{file_id}{tail}", api_key)
        assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_path"), (tail, body[:300])
        assert SECRET not in body


def test_nul_in_queries_and_bodies_is_a_client_error(http: httpx.Client) -> None:
    """Postgres refuses NUL in text: it must be caught before it gets there (a 4xx, not a 500)."""
    for path, params in (
        ("/v1/fine_tuning/jobs", {"after": "job-\x00"}),
        ("/v1/files", {"purpose": "fine-\x00tune"}),
    ):
        response = http.get(path, params=params)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_path")
    for body, param, code in (
        ({"model": "tiny-llama", "training_file": "file-\x00"}, "training_file", "file_not_found"),
        ({"model": "tiny\x00llama", "training_file": "file-x"}, "model", "model_not_found"),
    ):
        for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"):
            response = http.post(path, json=body)
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert (error["param"], error["code"]) == (param, code)
    response = http.post(
        "/v1/files", files={"file": ("train\x00.jsonl", chat_jsonl(4))}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    assert "\x00" not in response.json()["filename"]


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "files/../../x", "files/x\x00.jsonl", "files\\..\\x", "", "files/"]
)
def test_the_store_refuses_unsafe_keys(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsafe artifact key"):
        LocalArtifactStore(tmp_path).local_path(key)


# --- upload size limit, enforced while the body streams in ---------------------------------------------

LIMIT_MB = 1


@pytest.fixture(scope="module")
def limited_api(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """An API process with a 1 MB upload limit and a temp folder of its own (to look for leftovers)."""
    tmp = tmp_path_factory.mktemp("api-tmp")
    env = os.environ | {"TUNEFORGE_MAX_UPLOAD_MB": str(LIMIT_MB), "TMPDIR": str(tmp)}
    with api_process(env, "small-limit-api.log") as (base_url, process):
        yield base_url, tmp, process.pid


@pytest.fixture(scope="module")
def small_limit_api(limited_api: tuple[str, Path, int]) -> tuple[str, Path]:
    return limited_api[:2]


def multipart_head(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def stream_upload(base_url: str, key: str, *, content_length: int | None, total: int) -> tuple[bytes, int]:
    """POST a multipart upload of about `total` bytes in chunks, stopping as soon as the server answers."""
    boundary = uuid.uuid4().hex
    return stream_post(
        base_url,
        "/v1/files",
        {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
        first=multipart_head(boundary),
        filler=b'{"messages": []}\n' * 2048,
        content_length=content_length,
        total=total,
    )


def stream_post(
    base_url: str,
    path: str,
    headers: dict[str, str],
    *,
    first: bytes,
    filler: bytes,
    content_length: int | None,
    total: int,
) -> tuple[bytes, int]:
    """POST `first` then `filler` repeatedly, up to about `total` bytes, stopping once the server answers.

    Returns the start of the response and how many body bytes were sent before it came.
    """
    url = urlsplit(base_url)
    length = (
        f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    )
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n{lines}{length}\r\n\r\n".encode()
    chunked = content_length is None
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        select.select([sock], [], [], 1)  # a server that refuses on the headers alone answers now
        pieces = [first]
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if not writable:
                continue
            piece = pieces.pop() if pieces else filler
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
                if b"\r\n\r\n" in response and response.rstrip().endswith(b"}"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return response, sent


def first_answer(response: bytes) -> tuple[int, dict]:
    """The status and error of the first response read off a raw socket.

    Bytes the client kept sending after the server answered may read as a request of their own, and get
    an answer of their own after this one.
    """
    status_line, _, rest = response.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2].decode()
    return int(status_line.split()[1]), json.JSONDecoder().raw_decode(body)[0]["error"]


def assert_413(response: bytes, code: str = "file_too_large", limit: str = f"{LIMIT_MB} MB") -> None:
    status, error = first_answer(response)
    assert status == 413, response[:500]
    assert error["code"] == code
    assert limit in error["message"]


def test_upload_just_over_the_limit_is_413_and_leaves_no_temp_files(
    small_limit_api: tuple[str, Path], api_key: str
) -> None:
    base_url, tmp = small_limit_api
    data = b"x" * ((LIMIT_MB << 20) + 1)
    response = httpx.post(
        f"{base_url}/v1/files",
        files={"file": ("big.jsonl", data)},
        data={"purpose": "fine-tune"},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "file_too_large"
    assert list(tmp.iterdir()) == []
    # just under the limit is a valid file
    ok = chat_jsonl(4)
    ok += b" " * ((LIMIT_MB << 20) - len(ok) - 1) + b"\n"
    response = httpx.post(
        f"{base_url}/v1/files",
        files={"file": ("ok.jsonl", ok)},
        data={"purpose": "fine-tune"},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert response.status_code == 200, response.text
    assert list(tmp.iterdir()) == []


def test_declared_length_over_the_limit_is_refused_before_the_body(
    small_limit_api: tuple[str, Path], api_key: str
) -> None:
    base_url, tmp = small_limit_api
    response, sent = stream_upload(base_url, api_key, content_length=200 << 20, total=200 << 20)
    assert_413(response)
    assert sent == 0  # answered on the headers alone
    assert list(tmp.iterdir()) == []


def test_chunked_body_without_length_is_cut_off_at_the_limit(
    small_limit_api: tuple[str, Path], api_key: str
) -> None:
    base_url, tmp = small_limit_api
    response, sent = stream_upload(base_url, api_key, content_length=None, total=200 << 20)
    assert_413(response)
    assert sent < 32 << 20  # cut off long before the 200 MB the client would have sent (socket buffers aside)
    assert list(tmp.iterdir()) == []


def test_lying_content_length_reads_no_more_than_declared(
    small_limit_api: tuple[str, Path], api_key: str
) -> None:
    """A small declared length with a huge body: the server reads what was declared and refuses it."""
    base_url, tmp = small_limit_api
    response, sent = stream_upload(base_url, api_key, content_length=4096, total=200 << 20)
    status, error = first_answer(response)
    # The 4 KB declared end inside the file's part: no whole file arrived.
    assert (status, error["param"], error["code"]) == (400, "file", "invalid_value"), response[:500]
    assert sent < 32 << 20
    assert list(tmp.iterdir()) == []


# --- models: safetensors only -----------------------------------------------------------------------------


@pytest.fixture
def pickle_only_folder(tiny_model: str, tmp_path: Path) -> Path:
    source = get_settings().resolved_model_dir / tiny_model
    folder = tmp_path / "pickled-model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [0.0]}))
    return folder


def test_pickle_only_base_model_is_refused(pickle_only_folder: Path) -> None:
    for register in (inspect_model, lambda folder: register_folder("pickled", folder)):
        with pytest.raises(ValueError) as refused:
            register(pickle_only_folder)
        message = str(refused.value)
        assert str(pickle_only_folder) in message
        assert "pytorch_model.bin" in message and "safetensors" in message


def test_folder_with_safetensors_is_accepted(tiny_model: str) -> None:
    assert inspect_model(get_settings().resolved_model_dir / tiny_model)["architecture"] == "LlamaForCausalLM"


# --- Celery: JSON only ----------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that a pickle payload was deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_worker_refuses_pickle_messages(server: str, tmp_path: Path) -> None:
    """A pickle-serialized run_job message reaches the real worker, which refuses to deserialize it."""
    marker = tmp_path / "unpickled"
    log = TEST_HOME / "worker.log"
    before = log.stat().st_size if log.exists() else 0
    jobs = job_queue(get_settings().queue)
    celery_app.send_task(
        RUN_JOB, args=[_TouchOnUnpickle(marker)], queue=jobs, declare=[jobs], serializer="pickle"
    )
    deadline = time.monotonic() + 120
    refused = b""
    while time.monotonic() < deadline and b"pickle" not in refused:
        time.sleep(0.5)
        with log.open("rb") as handle:
            handle.seek(before)
            refused = b"\n".join(line for line in handle if b"untrusted content" in line)
    assert b"Refusing to deserialize untrusted content of type pickle" in refused
    assert not marker.exists()


# --- resume: what a checkpoint holds is never unpickled ------------------------------------------------


def with_members(archive: Path, members: dict[str, bytes]) -> None:
    """Rewrite the stored tar `archive` with `members` added, or in place of those of the same name."""
    planted = archive.with_name(archive.name + ".planted")
    with tarfile.open(archive) as old, tarfile.open(planted, "w") as new:
        for info in old.getmembers():
            if info.name not in members:
                new.addfile(info, old.extractfile(info))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    os.replace(planted, archive)


def test_resume_never_unpickles_what_a_checkpoint_holds(http: httpx.Client, tmp_path: Path) -> None:
    """A paused job's stored resume state gets pickles that create a file when loaded; none ever runs.

    Trainer's own `training_args.bin` is refused by name before anything is loaded; planted optimizer,
    scheduler and RNG states reach Trainer, which loads them with `torch.load(weights_only=True)` and
    refuses the first: the resumed job fails saying why, and no marker file appears.
    """
    training = upload(http, chat_jsonl(40))
    job_id = http.post(
        "/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=20, batch_size=2)
    ).json()["id"]
    wait_for_step(http, job_id, 2)
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    paused_at = wait_for_event(http, job_id, "Job paused at step")["data"]["step"]
    deadline = time.monotonic() + 120
    while paused_at not in checkpoint_steps(http, job_id):
        assert time.monotonic() < deadline, "the paused run saved no checkpoint"
        time.sleep(0.3)
    with session_scope() as session:
        key = session.scalars(
            sa.select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id, Checkpoint.step == paused_at)
        ).one()
    state = get_store().local_path(resume_state_key(key))
    original = state.read_bytes()

    # Trainer's arguments: refused by the function the resumed run calls first, before anything is loaded.
    marker = tmp_path / "training_args-unpickled"
    with_members(state, {"training_args.bin": pickle.dumps(_TouchOnUnpickle(marker))})
    with pytest.raises(ValueError, match=f"checkpoint at step {paused_at} holds .*training_args.bin"):
        last_checkpoint(job_id, tmp_path / "attempt")
    assert not marker.exists()

    # Trainer's states: the real resume, through the worker.
    marker = tmp_path / "state-unpickled"
    state.write_bytes(original)
    evil = pickle.dumps(_TouchOnUnpickle(marker))
    with_members(state, {"optimizer.pt": evil, "scheduler.pt": evil, "rng_state.pth": evil})
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    job = wait_for_status(http, job_id, {"succeeded", "failed"})
    assert not marker.exists(), "the resumed run unpickled a planted state"
    assert (
        wait_for_event(http, job_id, "Resuming from the checkpoint")["data"]["resumed_from_step"] == paused_at
    )
    assert (job["status"], job["error"]["code"]) == ("failed", "training_error"), job
    # Real states load with weights_only too (every other resume does): the planted ones are refused.
    assert job["error"]["message"].startswith("UnpicklingError: Weights only load failed"), job["error"]


# --- every JSON body is bounded before it is parsed or its key checked ----------------------------------


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/chat/completions", "/v1/fine_tuning/estimate"])
@pytest.mark.parametrize("key", [None, "valid"])
def test_a_200_mb_json_body_is_413_before_parsing_or_auth(
    limited_api: tuple[str, Path, int], api_key: str, path: str, key: str | None
) -> None:
    base_url, _, pid = limited_api
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if key else {})
    before = process_mb(pid, "VmRSS")
    filler = b'{"messages": [{"role": "user", "content": "' + b"x" * 65000 + b'"}]}, '
    for content_length in (200 << 20, None):  # declared, then chunked with no length
        response, sent = stream_post(
            base_url,
            path,
            headers,
            first=b'{"model": "tiny-llama", "training_file": [',
            filler=filler,
            content_length=content_length,
            total=200 << 20,
        )
        assert_413(response, code="request_too_large", limit=f"{get_settings().max_json_body_kb} KB")
        assert sent < 32 << 20  # cut off long before the 200 MB (socket buffers aside)
    grown = process_mb(pid, "VmRSS") - before
    assert grown < 50, f"the API grew by {grown:.0f} MB reading a body it refuses"
