"""The API package imports, and serves, without torch or any training library."""

import subprocess
import sys

TRAINING_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_app_imports_with_training_libraries_absent() -> None:
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in TRAINING_LIBRARIES)
    code = (
        f"import sys; {blocked}\n"
        "import app.main, app.cli, app.demo, app.jobs.lifecycle, app.queue\n"
        "from fastapi.testclient import TestClient\n"
        "print(TestClient(app.main.app).get('/livez').json())\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "'ok'" in result.stdout


def test_importing_the_api_loads_no_training_library() -> None:
    code = (
        "import sys, app.main, app.cli\n"
        f"print(sorted(m for m in {TRAINING_LIBRARIES!r} if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
