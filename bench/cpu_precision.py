"""What bf16 and gradient checkpointing, the GPU defaults, cost a training step on a CPU.

    .venv/bin/python bench/cpu_precision.py [--model smollm2|small-llama] [--steps 4] [--rounds 2]

Without a GPU the worker trains in fp32 with no gradient checkpointing (`device_defaults` and
`checkpoints_blocks` in worker/training/sft.py). This runs the same LoRA training under each setting in
turn, `--rounds` times interleaved, with the recipe's own data preparation, method plan and training
arguments (only the two device settings, and the model's dtype that follows bf16, differ). It prints the
median seconds per step of each setting, the first step of every run left out as warm-up, and its ratio
to the CPU default.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from common import supervised_spec
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from app.jobs.schemas import SupervisedHyperparameters
from worker.demo_data import build_demo_data
from worker.training.base_models import import_gguf, inspect_model, make_tiny_llama, smollm2_gguf_path
from worker.training.data import prepare_file
from worker.training.methods import ModelInfo, plan_for
from worker.training.sft import RunSpec, training_arguments

SETTINGS = {  # name -> (bf16, gradient checkpointing)
    "fp32 (the CPU default)": (False, False),
    "bf16": (True, False),
    "bf16 + checkpointing (the GPU default)": (True, True),
}


class StepTimer(TrainerCallback):
    """Seconds each optimizer step took."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.seconds.append(time.perf_counter() - self.began)


def base_model(which: str, home: Path) -> Path:
    folder = home / which
    if which == "smollm2":
        import_gguf(smollm2_gguf_path(), folder)
    else:
        make_tiny_llama(folder, hidden_size=1024, num_layers=2, intermediate_size=2816)
    return folder


def step_seconds(
    spec: RunSpec, rows: list[dict], *, bf16: bool, checkpointing: bool, steps: int
) -> list[float]:
    """Train `steps` steps under one setting; the seconds of each step after the first."""
    plan = plan_for(spec.hyperparameters, ModelInfo(spec.linear_modules, spec.profile["num_layers"]))
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    dtype = torch.bfloat16 if bf16 else torch.float32  # as load_model picks it from device_defaults
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype, use_safetensors=True)
    max_length = spec.hyperparameters["max_seq_length"]
    arguments = training_arguments(spec, has_validation=False) | {
        "bf16": bf16,
        "gradient_checkpointing": checkpointing,
        "use_cpu": True,  # transformers takes bf16 without a GPU only when told the run is on the CPU
        "max_steps": steps,
        "save_strategy": "no",
    }
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**arguments, max_length=max_length, completion_only_loss=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=plan.peft_config,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # its per-step log lines would bury the figures
    trainer.train()
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "small-llama"], default="smollm2")
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first one a warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    home = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    folder = base_model(args.model, home)
    profile = inspect_model(folder)
    hp = SupervisedHyperparameters(peft="lora", batch_size=4, max_seq_length=128).resolved().model_dump()
    data = build_demo_data(home / "data")
    spec = supervised_spec(
        folder, profile, hp, training_file=data.train_path, workdir=home / "work", base_model=args.model
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = prepare_file(tokenizer, data.train_path, max_seq_length=hp["max_seq_length"]).rows
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (bf16, checkpointing) in SETTINGS.items():
            run = step_seconds(spec, rows, bf16=bf16, checkpointing=checkpointing, steps=args.steps)
            seconds[name] += run
            print(f"{name}: {', '.join(f'{s:.2f}' for s in seconds[name])} s", flush=True)
    print(
        f"\nmodel {args.model} ({profile['total_parameters']:,} parameters), LoRA, "
        f"batch {hp['batch_size']} x {hp['max_seq_length']} tokens, {torch.get_num_threads()} threads; "
        "median s/step of "
        f"{args.rounds} x {args.steps - 1} steps"
    )
    reference = statistics.median(seconds[next(iter(SETTINGS))])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:40} {median:7.2f} s/step  {median / reference:5.2f}x")


if __name__ == "__main__":
    main()
