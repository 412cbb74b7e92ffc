"""Tuneforge's training against the plain TRL script a user would write (bench/reference_sft.py).

    .venv/bin/python bench/training.py parity          # per-step losses, training time, job overhead

parity: the same model (SmolLM2-135M-Instruct), data (chatterbot chat examples), seed, batch, sequence
length and method, trained by the reference script in a process of its own and by a Tuneforge job
submitted through the API on the embedded default. Runs interleave (reference, job, reference, job...)
because this machine's speed drifts; each ratio is taken within a round and printed as min / median /
max over the rounds. Both sides use the reference's settings (padded batches), so the losses must agree.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TUNEFORGE_HOME", tempfile.mkdtemp(prefix="tuneforge-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from common import spread  # noqa: E402
from httpx_sse import connect_sse  # noqa: E402

from app.config import get_settings  # noqa: E402
from app.db import migrate  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.keys import service as key_service  # noqa: E402

MODEL = "smollm2-135m-instruct"
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATES = {"lora": 2e-4, "full": 2e-5}


def chat_file(folder: Path, count: int) -> Path:
    """`count` chat examples from chatterbot-corpus (the demo's own data)."""
    from worker.demo_data import build_demo_data

    return build_demo_data(folder, train_count=count).train_path


class Stack:
    """The API, a worker and the reconciler on the embedded default, driven over HTTP."""

    def __init__(self, port: int, base: Path | None = None) -> None:
        from app.models.local import import_gguf, register_folder
        from worker.training.base_models import smollm2_gguf_path

        migrate.upgrade()
        if base:  # a model folder of its own (bench/random_base.py on a GPU machine), under MODEL's name
            register_folder(MODEL, base)
            self.model_dir = base
        else:
            import_gguf(smollm2_gguf_path(), name=MODEL)
            self.model_dir = get_settings().resolved_home / "models" / MODEL
        with session_scope() as session:
            token = key_service.create_key(session, project="bench")[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.port = port
        self.client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )
        self.processes: list = []

    def __enter__(self) -> "Stack":
        from app.services import start_services, wait_ready

        self.processes = start_services(self.port, log_dir=get_settings().resolved_home)
        wait_ready(self.base_url, self.processes)
        return self

    def __exit__(self, *exc: object) -> None:
        from app.services import stop_services

        self.client.close()
        stop_services(self.processes)

    def upload(self, path: Path) -> str:
        with path.open("rb") as handle:
            response = self.client.post(
                "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}
            )
        response.raise_for_status()
        return response.json()["id"]

    def plan_mb(self, file_id: str, hyperparameters: dict, device: str) -> float:
        """The estimate's total for this job on `device`, in MiB."""
        body = {"model": MODEL, "training_file": file_id, "device": device}
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        estimate = self.client.post("/v1/fine_tuning/estimate", json=body)
        estimate.raise_for_status()
        return estimate.json()["estimates"][0]["bytes"]["total"] / 2**20

    def train(self, file_id: str, hyperparameters: dict, seed: int) -> dict:
        """Submit a job, wait for its adapter to be downloadable; its losses, times and memory."""
        body = {
            "model": MODEL,
            "training_file": file_id,
            "seed": seed,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        }
        submitted = time.perf_counter()
        job = self.client.post("/v1/fine_tuning/jobs", json=body)
        job.raise_for_status()
        job_id = job.json()["id"]
        # The event stream ends with the job's final status: no polling load beside the training run.
        with connect_sse(self.client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true") as stream:
            for _ in stream.iter_sse():
                pass
        status = self.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if status["status"] != "succeeded":
            raise SystemExit(f"job {job_id} ended {status['status']}: {status['error']}")
        model = status["fine_tuned_model"]
        self.client.get(f"/v1/models/{model}/adapter").raise_for_status()  # a full fine-tune's weights too
        end_to_end = time.perf_counter() - submitted
        events = self.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
        finished = next(e["data"] for e in events["data"] if e["message"].startswith("Training finished"))
        rows = self.client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
        return {
            "losses": [row["train_loss"] for row in rows if row.get("train_loss") is not None],
            "train_seconds": finished["runtime_seconds"],
            # training's start to its last step's log: without what Trainer does after the last step
            "steps_seconds": finished["steps_seconds"],
            "end_to_end_seconds": end_to_end,
            "peak_mb": finished["peak_memory_mb"],
            "tokens": status["trained_tokens"],
            "step_seconds": finished["steps_seconds"] / finished["steps"],
        }


def reference(model_dir: Path, train_path: Path, method: str, settings: dict, out: Path) -> dict:
    """bench/reference_sft.py in a process of its own."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "reference_sft.py"),
        str(model_dir),
        str(train_path),
        "--method",
        method,
        "--batch-size",
        str(settings["batch_size"]),
        "--max-length",
        str(settings["max_seq_length"]),
        "--epochs",
        str(settings["n_epochs"]),
        "--learning-rate",
        str(LEARNING_RATES[method]),
        "--seed",
        str(settings["seed"]),
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads(out.read_text())


def hyperparameters(method: str, settings: dict, **options: object) -> dict:
    """The job's hyperparameters for the reference's settings."""
    return {
        "peft": method,
        "batch_size": settings["batch_size"],
        "max_seq_length": settings["max_seq_length"],
        "n_epochs": settings["n_epochs"],
        "learning_rate": LEARNING_RATES[method],
        **(LORA if method == "lora" else {}),
        **options,
    }


def largest_difference(reference_losses: list[float], job_losses: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(reference_losses, job_losses, strict=True))


def compare(
    stack: Stack, train_path: Path, settings: dict, variants: dict[str, dict[str, dict]], rounds: int
) -> dict[tuple[str, str], list[tuple[dict, dict]]]:
    """Rounds of, for each method in turn: the reference, then a job for each of the method's variants (its
    extra hyperparameters), back to back. Every method runs in every round, so ratios between methods can be
    taken within a round, as ratios against the reference are."""
    file_id = stack.upload(train_path)
    results: dict[tuple[str, str], list[tuple[dict, dict]]] = {
        (method, name): [] for method, named in variants.items() for name in named
    }
    for round_ in range(rounds):
        for method, named in variants.items():
            out = train_path.parent / f"{method}-{round_}.json"
            ref = reference(stack.model_dir, train_path, method, settings, out)
            print(f"  {method} round {round_}: reference {ref['train_seconds']:.2f} s", flush=True)
            for name, options in named.items():
                job = stack.train(file_id, hyperparameters(method, settings, **options), settings["seed"])
                results[(method, name)].append((ref, job))
                # Each run as it ends: a benchmark stopped at a time limit has still printed what it measured.
                print(
                    f"  {method} round {round_}: {name} {job['train_seconds']:.2f} s (end to end "
                    f"{job['end_to_end_seconds']:.2f} s, {job['tokens']} tokens, peak {job['peak_mb']:.0f} "
                    f"MiB, {job['step_seconds']:.3f} s a step, loss difference "
                    f"{largest_difference(ref['losses'], job['losses']):.1e})",
                    flush=True,
                )
    return results


def parity(stack: Stack, args: argparse.Namespace) -> None:
    """Training time and losses of a job against the reference, what the job costs beside training, and
    LoRA's step time against full fine-tuning's."""
    train_path = chat_file(get_settings().resolved_home / "parity", args.examples)
    settings = {"batch_size": 4, "max_seq_length": 128, "n_epochs": 1, "seed": 42}
    # A job checkpoints at the end of each epoch (transformers saves after the last step whatever the
    # interval), the reference saves nothing: the steps alone (training's start to the last step's log, on
    # both sides) are the same work; the whole of train() is shown beside them. The job on padded batches
    # does the reference's own work; it runs for LoRA only, where it costs 15 s a round (a full
    # fine-tune's job costs a minute, most of it the last checkpoint).
    methods = args.methods.split(",")
    variants = {
        m: {"job": {}} | ({"job (padding_free off)": {"padding_free": False}} if m == "lora" else {})
        for m in methods
    }
    print(f"parity: {args.examples} chat examples, {settings}, {args.rounds} rounds", flush=True)
    results = compare(stack, train_path, settings, variants, args.rounds)
    for (method, name), pairs in results.items():
        steps = [job["steps_seconds"] / ref["steps_seconds"] for ref, job in pairs]
        whole = [job["train_seconds"] / ref["train_seconds"] for ref, job in pairs]
        overheads = [job["end_to_end_seconds"] - job["steps_seconds"] for _, job in pairs]
        difference = max(largest_difference(ref["losses"], job["losses"]) for ref, job in pairs)
        print(
            f"{method}, {name}: steps' time / reference {spread(steps)} (goal <= 1.05), all of train() "
            f"{spread(whole)}; overhead (submit to downloadable, minus the steps) "
            f"{statistics.median(overheads):.2f} s median ({min(overheads):.2f}-{max(overheads):.2f}); "
            f"largest loss difference {difference:.1e} over {len(pairs[0][1]['losses'])} steps "
            "(goal < 5e-5)",
            flush=True,
        )
    if {"lora", "full"} <= set(methods):
        # Steps only (step_seconds): a full fine-tune's checkpoint after the last step is no step's work.
        ratios = [
            lora["step_seconds"] / full["step_seconds"]
            for (_, lora), (_, full) in zip(results[("lora", "job")], results[("full", "job")], strict=True)
        ]
        print(f"LoRA / full step time, each round's jobs: {spread(ratios)} (goal <= 0.75)", flush=True)


def long_tailed_file(folder: Path, count: int, seed: int = 0, median_words: int = 24) -> Path:
    """Chat examples whose answers have log-normally distributed lengths (a median, and a long tail).

    The answers are chatterbot sentences strung together to the drawn length, so the text stays language.
    """
    from worker.demo_data import SYSTEM_PROMPT, load_pairs

    rng = random.Random(seed)
    pairs = [pair for category in load_pairs().values() for pair in category]
    sentences = [answer for _, answer in pairs]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "long_tailed.jsonl"
    with path.open("w") as handle:
        for _ in range(count):
            question = rng.choice(pairs)[0]
            words = min(int(rng.lognormvariate(math.log(median_words), 1.0)) + 1, 20 * median_words)
            answer: list[str] = []
            while len(answer) < words:
                answer += rng.choice(sentences).split()
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": " ".join(answer[:words])},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def fast_path(stack: Stack, args: argparse.Namespace) -> None:
    """Tokens per second of a job on its defaults against the reference's padded batches."""
    work = get_settings().resolved_home / "fast_path"
    mixes = {
        "chatterbot Q/A": (chat_file(work / "chatterbot", args.examples * 2), 128),
        "long-tailed mix": (long_tailed_file(work / "long_tailed", args.examples), 512),
    }
    for mix, (train_path, max_seq_length) in mixes.items():
        settings = {"batch_size": 4, "max_seq_length": max_seq_length, "n_epochs": 1, "seed": 42}
        print(f"fast path, {mix}: {settings}, {args.rounds} rounds", flush=True)
        variants = {method: {"job": {}} for method in args.methods.split(",")}
        results = compare(stack, train_path, settings, variants, args.rounds)
        for (method, _), pairs in results.items():
            tokens = {job["tokens"] for _, job in pairs} | {ref["tokens"] for ref, _ in pairs}
            speedups = [
                (job["tokens"] / job["train_seconds"]) / (ref["tokens"] / ref["train_seconds"])
                for ref, job in pairs
            ]
            difference = max(largest_difference(ref["losses"], job["losses"]) for ref, job in pairs)
            job_rate = statistics.median(job["tokens"] / job["train_seconds"] for _, job in pairs)
            ref_rate = statistics.median(ref["tokens"] / ref["train_seconds"] for ref, _ in pairs)
            print(
                f"{mix}, {method}: {job_rate:.0f} tokens/s against the reference's {ref_rate:.0f}: "
                f"{spread(speedups)} (goal >= 1.5x); tokens trained {sorted(tokens)}; largest per-step loss "
                f"difference {difference:.1e} over {len(pairs[0][1]['losses'])} steps",
                flush=True,
            )


def memory(stack: Stack, args: argparse.Namespace) -> None:
    """Measured peak memory against the estimate's plan, and the demo's own job against the model's size."""
    from app.demo import DEMO_HYPERPARAMETERS
    from worker.demo_data import build_demo_data

    work = get_settings().resolved_home / "memory"
    # Every row runs past max_seq_length, so each batch is batch_size x max_seq_length tokens, as planned.
    long_rows = long_tailed_file(work / "long", 24, median_words=2000)
    settings = {"batch_size": 4, "max_seq_length": 256, "n_epochs": 1, "seed": 42}
    file_id = stack.upload(long_rows)
    print(f"memory against the plan: {settings}, rows of max_seq_length tokens", flush=True)
    for method in args.methods.split(","):
        hp = hyperparameters("lora" if method == "qlora" else method, settings) | {"peft": method}
        planned = stack.plan_mb(file_id, hp, "cpu")
        job = stack.train(file_id, hp, settings["seed"])
        print(
            f"{method}: measured peak {job['peak_mb']:.0f} MiB, plan {planned:.0f} MiB: measured / plan "
            f"{job['peak_mb'] / planned:.2f} (goal 0.85-1.15)",
            flush=True,
        )
    demo = stack.upload(build_demo_data(work / "demo", train_count=200).train_path)
    model_mb = sum(f.stat().st_size for f in stack.model_dir.glob("*.safetensors")) / 2**20
    print(f"the demo's LoRA job against the model's {model_mb:.0f} MiB of fp32 weights (goal <= 2.5x):")
    runs = {}
    for name, extra in (("default", {}), ("gradient_checkpointing", {"gradient_checkpointing": True})):
        hp = DEMO_HYPERPARAMETERS | {"n_epochs": 1} | extra
        planned = stack.plan_mb(demo, hp, "cpu")
        runs[name] = job = stack.train(demo, hp, 0)
        print(
            f"  {name}: peak {job['peak_mb']:.0f} MiB, {job['peak_mb'] / model_mb:.2f}x the model (plan for "
            f"full rows {planned:.0f} MiB); {job['step_seconds']:.2f} s a step; "
            f"last loss {job['losses'][-1]:.4f}",
            flush=True,
        )
    default, checkpointed = runs["default"], runs["gradient_checkpointing"]
    gap = max(abs(a - b) for a, b in zip(default["losses"], checkpointed["losses"], strict=True))
    print(
        f"  gradient_checkpointing / default: peak {checkpointed['peak_mb'] / default['peak_mb']:.2f}x, "
        f"step time {checkpointed['step_seconds'] / default['step_seconds']:.2f}x, largest loss difference "
        f"{gap:.1e}",
        flush=True,
    )


# NVIDIA's datasheet figure for dense bf16 on an H100 or H200 SXM; utilisation is quoted against it.
BF16_PEAK_FLOPS = 989e12


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            for name in weights.keys():
                count += math.prod(weights.get_slice(name).get_shape())
    return count


def gpu(stack: Stack, args: argparse.Namespace) -> None:
    """On a GPU: tokens/s and model FLOPs utilisation of jobs against the reference, peak memory against the
    plan, Liger kernels, QLoRA against LoRA and the paged optimizers; both sides bf16 with SDPA."""
    import torch

    device = torch.cuda.get_device_name()
    params = parameter_count(stack.model_dir)
    train_path = long_tailed_file(get_settings().resolved_home / "gpu", args.examples, median_words=96)
    settings = {"batch_size": 8, "max_seq_length": 1024, "n_epochs": 1, "seed": 42}
    file_id = stack.upload(train_path)
    print(f"gpu: {device}, {params / 1e6:.0f}M parameters, long-tailed mix, {settings}", flush=True)
    # Model FLOPs per trained token: forward 2N, backward 2N for the activations' gradients, and 2N more
    # for the weights' gradients where all weights train (Kaplan et al.); attention left out.
    flops_per_token = {"lora": 4 * params, "qlora": 4 * params, "full": 6 * params}

    def utilisation(rate: float, method: str) -> str:
        share = rate * flops_per_token[method] / BF16_PEAK_FLOPS
        return f"{share:.1%} of {BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s"

    def report(method: str, name: str, run: dict, hp: dict) -> float:
        rate = run["tokens"] / run["train_seconds"]
        peak, planned = run["peak_mb"], stack.plan_mb(file_id, hp, "cuda")
        print(
            f"  {method}, {name}: {rate:.0f} tokens/s, utilisation {utilisation(rate, method)}; peak "
            f"{peak:.0f} MiB, plan {planned:.0f} MiB (measured / plan {peak / planned:.2f})",
            flush=True,
        )
        return rate

    paged_8bit = {"optimizer": "paged_adamw_8bit"}
    variants = {
        "lora": {
            "job": {},
            "job, Liger kernels": {"liger_kernels": True},
            "job, paged_adamw_8bit": paged_8bit,
            "job, paged_adamw_32bit": {"optimizer": "paged_adamw_32bit"},
        },
        "full": {"job": {}},
        "qlora": {"job": {}, "job, paged_adamw_8bit": paged_8bit},  # no reference: the script is LoRA or full
    }
    for method in args.methods.split(","):
        if method == "qlora":
            for name, options in variants[method].items():
                hp = hyperparameters("lora", settings, peft="qlora", **options)
                report(method, name, stack.train(file_id, hp, settings["seed"]), hp)
            continue
        pairs = compare(stack, train_path, method, settings, variants[method], args.rounds)
        ref = pairs["job"][0][0]
        ref_rate = ref["tokens"] / ref["train_seconds"]
        print(
            f"  {method}, reference: {ref_rate:.0f} tokens/s, utilisation {utilisation(ref_rate, method)}; "
            f"peak {ref['peak_gpu_mb']:.0f} MiB",
            flush=True,
        )
        for name, runs in pairs.items():
            hp = hyperparameters(method, settings, **variants[method][name])
            rate = report(method, name, runs[0][1], hp)
            print(f"  {method}, {name}: tokens/s against the reference {rate / ref_rate:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=list(BENCHMARKS))
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--base", type=Path, help="a model folder to train instead of SmolLM2-135M-Instruct")
    args = parser.parse_args()
    with Stack(args.port, args.base) as stack:
        BENCHMARKS[args.benchmark](stack, args)


BENCHMARKS = {"parity": parity, "fast-path": fast_path, "memory": memory, "gpu": gpu}

if __name__ == "__main__":
    main()
