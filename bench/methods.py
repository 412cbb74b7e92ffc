"""Every fine-tuning method on the same small task: trainable parameters, peak memory, step time, final loss.

    .venv/bin/python bench/methods.py [--model smollm2|small-llama] [--methods lora,qlora,full]

Runs on the embedded default in a fresh temp home (SQLite, filesystem broker, one worker), through the API
like any client. The task: 32 chat examples from chatterbot-corpus, 1 epoch at batch 4 (8 optimizer
steps), max_seq_length 128, each method at its own default learning rate, validation loss on 16 other
examples. Peak memory is what the worker measured (worker/training/memory.py); the plan is
POST /v1/fine_tuning/estimate with device "cpu". Ratios are against LoRA in the same run, because step
times on a shared machine drift between runs.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TUNEFORGE_HOME", tempfile.mkdtemp(prefix="tuneforge-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from app.config import get_settings  # noqa: E402
from app.db import migrate  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.jobs.schemas import PEFT_METHODS  # noqa: E402
from app.keys import service as key_service  # noqa: E402

HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 128}
TRAIN, VALID = 32, 16
TERMINAL = {"succeeded", "failed", "cancelled"}


def register_model(which: str) -> str:
    from app.models.local import import_gguf, make_tiny
    from worker.training.base_models import smollm2_gguf_path

    if which == "smollm2":
        import_gguf(smollm2_gguf_path(), name="smollm2-135m-instruct")
        return "smollm2-135m-instruct"
    make_tiny(name="small-llama", hidden_size=1024, layers=2, intermediate_size=2816)
    return "small-llama"


def task_files(client: httpx.Client) -> tuple[str, str]:
    """TRAIN training and VALID validation chat examples from chatterbot-corpus."""
    from worker.demo_data import build_demo_data

    data = build_demo_data(get_settings().resolved_home / "bench", train_count=TRAIN + VALID)
    rows = data.train_path.read_bytes().splitlines(keepends=True)
    ids = []
    for name, chunk in (("train.jsonl", rows[:TRAIN]), ("valid.jsonl", rows[TRAIN : TRAIN + VALID])):
        files = {"file": (name, b"".join(chunk))}
        response = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids[0], ids[1]


def run_method(client: httpx.Client, model: str, train: str, valid: str, peft: str) -> dict:
    body = {
        "model": model,
        "training_file": train,
        "validation_file": valid,
        "seed": 0,
        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS | {"peft": peft}}},
    }
    estimate = client.post("/v1/fine_tuning/estimate", json=body | {"device": "cpu"})
    estimate.raise_for_status()
    planned = estimate.json()["estimates"][0]
    job = client.post("/v1/fine_tuning/jobs", json=body)
    job.raise_for_status()
    job_id = job.json()["id"]
    while (status := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in TERMINAL:
        time.sleep(1)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    finished = next((e["data"] for e in events if e["message"].startswith("Training finished")), None)
    if status["status"] != "succeeded" or finished is None:
        return {"peft": peft, "error": status.get("error")}
    return {
        "peft": peft,
        "trainable": finished["trainable_parameters"],
        "peak_mb": finished["peak_memory_mb"],
        "planned_mb": round(planned["bytes"]["total"] / 2**20, 1),
        "step_s": finished["seconds_per_step"],
        "valid_loss": finished.get("valid_loss"),
        "train_loss": finished["train_loss"],
    }


def print_table(rows: list[dict]) -> None:
    reference = next((r for r in rows if r["peft"] == "lora" and "error" not in r), None)
    print(
        "| method | trainable params | peak memory MiB (x LoRA) | plan MiB | s/step (x LoRA) "
        "| train loss | valid loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['peft']} | failed: {r['error']} | | | | | |")
            continue
        mem_ratio = f" ({r['peak_mb'] / reference['peak_mb']:.2f}x)" if reference else ""
        step_ratio = f" ({r['step_s'] / reference['step_s']:.2f}x)" if reference else ""
        print(
            f"| {r['peft']} | {r['trainable']:,} | {r['peak_mb']:.0f}{mem_ratio} | {r['planned_mb']:.0f} | "
            f"{r['step_s']:.2f}{step_ratio} | {r['train_loss']:.3f} | {r['valid_loss']:.3f} |"
        )


def main() -> None:
    from app.services import start_services, stop_services, wait_ready

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "small-llama"], default="smollm2")
    parser.add_argument("--methods", default=",".join(PEFT_METHODS))
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    migrate.upgrade()
    model = register_model(args.model)
    with session_scope() as session:
        token = key_service.create_key(session, project="bench")[1]
    base_url = f"http://127.0.0.1:{args.port}"
    processes = start_services(args.port, log_dir=get_settings().resolved_home)
    rows = []
    try:
        wait_ready(base_url, processes)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
            train, valid = task_files(client)
            for peft in args.methods.split(","):
                rows.append(run_method(client, model, train, valid, peft))
                # Step times follow the machine's load: say what it was as each method finished.
                print(rows[-1] | {"load_1min": os.getloadavg()[0]}, flush=True)
    finally:
        stop_services(processes)
    print(f"\nmodel {model}, {HYPERPARAMETERS}, {TRAIN} train / {VALID} validation examples\n")
    print_table(rows)


if __name__ == "__main__":
    main()
