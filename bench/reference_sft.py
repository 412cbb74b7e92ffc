"""The plain script a user would write instead of Tuneforge: TRL's SFTTrainer and PEFT's LoraConfig, as
their documentation shows, on a chat JSONL file. The training benchmarks (bench/training.py) run it in a
process of its own and compare a Tuneforge job with it.

    .venv/bin/python bench/reference_sft.py MODEL_DIR TRAIN.jsonl --method lora --out result.json

Each chat example becomes a conversational prompt/completion pair (the last assistant message is the
completion), so TRL masks the prompt itself (completion-only loss). On a CPU bf16 and gradient
checkpointing are switched off, as TRL's error message asks; everything else is TRL's default, including
padded batches. It writes the per-step losses, the training time, the tokens trained and the peak memory.
"""

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


class StepLog(TrainerCallback):
    """Each step's loss, as Trainer logs it, and the seconds from the start of training to the last one."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.began = self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.began = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.last = time.perf_counter()


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    kib = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(kib.group(1)) / 1024 if kib else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("train_file")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.train_file).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )
    on_gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(Path(args.out).with_suffix("")) + "-trainer",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=on_gpu,
        gradient_checkpointing=on_gpu,
    )
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules.split(","),
            task_type="CAUSAL_LM",
        )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    steps = StepLog()
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, peft_config=peft_config, callbacks=[steps]
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    # Tokens trained: the examples as TRL tokenized and truncated them, without the padding.
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset) * args.epochs
    result = {
        "losses": steps.losses,
        "train_seconds": seconds,
        "steps_seconds": steps.last - steps.began,
        "tokens": tokens,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
