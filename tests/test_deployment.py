"""The deployment files: docker-compose.yml runs what `tuneforge up` runs, and the Dockerfiles lint clean.

There is no Docker engine here, so nothing is built or started. The compose file is validated against
the compose-spec JSON schema that check-jsonschema vendors, the Dockerfiles with hadolint (both from
PyPI, offline), and the rest is read from the files as YAML: services, persistence, GPU pinning, the
inference secret, the worker's healthcheck (worker/health.py, run here as real processes).
"""

import ast
import fnmatch
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import pytest
import yaml

from app import services

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "Dockerfile.api", ROOT / "Dockerfile.gpu"]
BIN = Path(sys.executable).parent
SECRET_REQUIRED = re.compile(r"^\$\{TUNEFORGE_INFERENCE_SECRET:\?(?P<message>[^}]+)\}$")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def run(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )


def compose_spec_check(path: Path) -> subprocess.CompletedProcess:
    return run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    # `info` is hadolint's lowest level: every finding fails; an accepted one is ignored in place, with why.
    return run(BIN / "hadolint", "--no-color", "--failure-threshold", "info", *paths)


def with_defaults(value: str) -> str:
    """`value` as compose interpolates it when none of its variables is set."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def services_tuneforge_up_starts() -> set[str]:
    """The names `start_services` gives its processes (`commands["api"] = ...`), read from its source."""
    tree = ast.parse(inspect.getsource(services.start_services))
    return {
        node.slice.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "commands"
        and isinstance(node.slice, ast.Constant)
    }


def test_compose_file_matches_the_compose_spec() -> None:
    result = compose_spec_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("good", "bad", "named"),
    [
        ("    healthcheck:", "    healtcheck:", "healtcheck"),
        ('shm_size: "8gb"', "shm_size: [8]", "shm_size"),
    ],
    ids=["misspelled-key", "wrong-type"],
)
def test_the_schema_check_catches_mistakes(tmp_path: Path, good: str, bad: str, named: str) -> None:
    text = COMPOSE.read_text()
    assert good in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(good, bad, 1))
    result = compose_spec_check(broken)
    assert result.returncode != 0 and named in result.stdout, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint() -> None:
    result = hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_what_it_should(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nUSER app\nCMD python -m http.server\n")
    result = hadolint(dockerfile)
    assert result.returncode != 0
    assert "DL3025" in result.stdout and "DL3066" in result.stdout, result.stdout


def test_compose_runs_every_service_tuneforge_up_starts() -> None:
    services = compose()["services"]
    started = services_tuneforge_up_starts()
    assert {"api", "worker", "reconciler", "inference"} <= started, started  # the source was read right
    assert started | {"postgres", "redis", "migrate"} <= services.keys()
    assert services["reconciler"]["command"] == ["tuneforge", "reconciler"]
    assert services["migrate"]["command"] == ["tuneforge", "db", "upgrade"]


def test_redis_keeps_its_queue_on_a_volume() -> None:
    spec = compose()
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert "--appendonly yes" in (command if isinstance(command, str) else " ".join(command))
    volumes = {volume.split(":")[1]: volume.split(":")[0] for volume in redis.get("volumes") or []}
    assert volumes.get("/data") in spec["volumes"], "redis needs a named volume on /data"


def test_each_gpu_service_has_a_gpu_of_its_own() -> None:
    gpus: dict[str, list[str]] = {}
    for name, service in compose()["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        for device in devices:
            if "gpu" in device.get("capabilities", []):
                assert "count" not in device, f"{name}: pin a GPU with device_ids, not count"
                gpus[name] = [with_defaults(device_id) for device_id in device["device_ids"]]
    assert {"worker", "inference", "worker-2", "worker-multi", "vllm"} <= gpus.keys()
    ids = [device_id for device_ids in gpus.values() for device_id in device_ids]
    assert len(ids) == len(set(ids)), f"GPU services share a GPU by default: {gpus}"


def test_inference_secret_is_required_and_inference_unpublished() -> None:
    services = compose()["services"]
    for name in ("api", "inference"):
        value = services[name]["environment"].get("TUNEFORGE_INFERENCE_SECRET", "")
        assert SECRET_REQUIRED.match(value), f"{name}: TUNEFORGE_INFERENCE_SECRET must be ${{...:?message}}"
    assert [name for name, service in services.items() if "ports" in service] == ["api"]
    for name, service in services.items():
        assert "TUNEFORGE_DEV_MODE" not in service.get("environment", {}), name


def test_services_share_an_object_store_and_no_folder() -> None:
    """Every Tuneforge service keeps artifacts in the MinIO bucket (made before they start), so any of them
    may run on another host: no volume is mounted by two services."""
    services = compose()["services"]
    tuneforge = {"api", "worker", "reconciler", "inference", "migrate"}
    bucket = services["bucket"]
    for name in tuneforge:
        env = services[name]["environment"]
        url = env["TUNEFORGE_ARTIFACT_URL"]
        assert url.startswith("s3://") and env["TUNEFORGE_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert f"mb --ignore-existing store/{url.removeprefix('s3://').split('/')[0]}" in bucket["command"][0]
        assert re.match(r"^\$\{MINIO_ROOT_PASSWORD:\?.+\}$", env["TUNEFORGE_S3_SECRET_ACCESS_KEY"]), name
        if name != "migrate":
            assert services[name]["depends_on"]["bucket"] == {"condition": "service_completed_successfully"}
    assert services["bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "healthcheck" in services["minio"] and "ports" not in services["minio"]
    mounted: dict[str, list[str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            mounted.setdefault(volume.split(":")[0], []).append(name)
    shared = {volume: names for volume, names in mounted.items() if len(names) > 1}
    assert shared == {"vllm-adapters": ["api", "vllm"]}, "only vLLM reads a folder of another service"


def test_healthchecks_fit_each_service() -> None:
    services = compose()["services"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.health"]
    # They run the API's image, whose HEALTHCHECK probes a port they do not serve.
    for name in ("migrate", "reconciler"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: it or a folder above it matches, last wins.

    fnmatch's `*` also crosses `/`, unlike Docker's; for these checks that only errs towards "ignored".
    """
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        candidates = [pattern, pattern.removeprefix("**/")]  # `**/` also matches no folder at all
        if any(fnmatch.fnmatchcase(prefix, candidate) for prefix in prefixes for candidate in candidates):
            ignored = not negated
    return ignored


def copied_sources() -> list[str]:
    """What the Dockerfiles COPY from the build context."""
    sources = []
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                sources += [arg for arg in line.split()[1:-1] if not arg.startswith("--")]
    return sources


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        ".tuneforge/tuneforge.db",
        ".env",
        "__pycache__",
        "worker/serving/__pycache__",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/app",
        ".ruff_cache/content",
        "tuneforge.egg-info/PKG-INFO",
    ]:
        assert dockerignored(path, patterns), path
    sources = copied_sources()
    assert {"pyproject.toml", "app", "worker", "migrations"} <= set(sources)
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py")
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignored(relative, patterns), f"COPY needs {relative}; .dockerignore drops it"


# The worker's healthcheck, as the container runs it: `python -m worker.health`.


def health_check(home: Path, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "worker.health", *args, env=os.environ | {"TUNEFORGE_HOME": str(home)})


def test_health_check_passes_only_on_a_fresh_heartbeat(tmp_path: Path) -> None:
    beat = tmp_path / "worker.heartbeat"
    missing = health_check(tmp_path, "--file", str(beat))
    assert missing.returncode == 1 and "no worker heartbeat" in missing.stdout, missing.stderr

    # Half an hour of allowed age against a file an hour old: no start-up of the check's process, however
    # slow, can turn one answer into the other.
    beat.touch()
    fresh = health_check(tmp_path, "--file", str(beat), "--max-age", "1800")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr

    hour_ago = time.time() - 3600
    os.utime(beat, (hour_ago, hour_ago))
    stale = health_check(tmp_path, "--file", str(beat), "--max-age", "1800")
    reported = re.search(r"is (\d+) s old \(max 1800\)", stale.stdout)
    assert stale.returncode == 1 and reported, stale.stdout + stale.stderr
    assert int(reported[1]) >= 3600


def touched_since(beat: Path, stamp: float, timeout: float = 30) -> bool:
    """Whether something sets `beat`'s mtime past `stamp` (the heartbeat thread's next touch) in `timeout` s.

    The timeout only bounds a failure; a live heartbeat ends the wait at its next beat.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if beat.stat().st_mtime > stamp:
            return True
        time.sleep(0.05)
    return False


def test_heartbeat_keeps_the_file_fresh_until_the_worker_dies(tmp_path: Path) -> None:
    """A process that started the heartbeat renews a stale file by itself; once it is gone, checks fail."""
    env = os.environ | {"TUNEFORGE_HOME": str(tmp_path)}
    code = (
        "import sys, time\n"
        "from worker.health import start_heartbeat\n"
        "start_heartbeat(interval=0.2)\n"
        "print('torch' in sys.modules, flush=True)\n"
        "time.sleep(600)\n"
    )
    command = [sys.executable, "-c", code]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "False", "worker.health must not import torch"
        assert health_check(tmp_path).returncode == 0  # start_heartbeat touched it before returning
        beat = next((tmp_path / "health").glob("worker-*.heartbeat"))
        hour_ago = time.time() - 3600
        os.utime(beat, (hour_ago, hour_ago))
        assert touched_since(beat, hour_ago), "the heartbeat thread did not renew a stale file"
        result = health_check(tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        worker.kill()
        worker.wait()
    # The process is gone, its heartbeat thread with it: nothing renews an old file, which fails the check.
    os.utime(beat, (hour_ago, hour_ago))
    result = health_check(tmp_path)
    assert result.returncode == 1 and "stuck" in result.stdout, result.stdout + result.stderr
