"""Optimizer states and peak memory on a CPU, each optimizer against AdamW, next to the estimate.

    .venv/bin/python bench/optimizers.py [--model smollm2|small-llama] [--methods full,lora] [--steps 3]

For full fine-tuning and LoRA, each optimizer that runs without CUDA (adamw, adamw_8bit, adafactor) trains
--steps steps of the SFT recipe (its model loading, method plan and training arguments; chatterbot-corpus
chats, batch 4 x 128 tokens) in a fresh process of its own, so each peak is its own. Per run:
- states: bytes the optimizer holds after the last step, the sum of `nbytes` over the tensors in
  `optimizer.state` (a storage shared between tensors counted once);
- peak: the run's peak resident memory as the worker measures it (worker/training/memory.py: VmHWM from
  before the model loads, shared libraries left out);
- plan: the estimate's `optimizer_states` and total for device "cpu" (app/estimate/planner.py).
Ratios are against AdamW of the same method in the same invocation. Paged optimizers are left out: they
need CUDA, and on a CPU bitsandbytes would run them unpaged (the API refuses them there).
"""

import argparse
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import supervised_spec  # noqa: E402

from app.estimate import planner  # noqa: E402
from app.jobs.schemas import CUDA_ONLY_OPTIMIZERS, OPTIMIZERS, SupervisedHyperparameters  # noqa: E402

CPU_OPTIMIZERS = [o for o in OPTIMIZERS if o not in CUDA_ONLY_OPTIMIZERS]
MiB = 2**20


def base_model(which: str, home: Path) -> Path:
    from worker.training.base_models import import_gguf, make_tiny_llama, smollm2_gguf_path

    folder = home / which
    if which == "smollm2":
        import_gguf(smollm2_gguf_path(), folder)
    else:
        make_tiny_llama(folder, hidden_size=1024, num_layers=2, intermediate_size=2816)
    return folder


def state_bytes(optimizer: Any) -> int:
    """Bytes held in the optimizer's state tensors, each storage once."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer Trainer built
    storages = {}
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def train(folder: Path, profile: dict, hp: dict, rows: list[dict], steps: int, workdir: Path) -> dict:
    """One run, in its own process: `steps` steps of the SFT recipe; its optimizer's states and peak."""
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from worker.training.memory import MemoryMeter
    from worker.training.methods import ModelInfo, plan_for
    from worker.training.sft import load_model, training_arguments

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # training_file is unused: the rows are tokenized already
    spec = supervised_spec(folder, profile, hp, training_file=folder, workdir=workdir)
    plan = plan_for(hp, ModelInfo(profile["linear_modules"], profile["num_layers"]))
    meter = MemoryMeter()
    meter.start(quantized=True)  # bitsandbytes imported first: its libraries are not the run's memory
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(spec, plan)
    meter.training_starts()
    arguments = training_arguments(spec, has_validation=False) | {"max_steps": steps, "save_strategy": "no"}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**arguments, max_length=hp["max_seq_length"], completion_only_loss=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=plan.peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        "states": state_bytes(trainer.optimizer),
        "peak_mb": meter.peak_mb(),
        "class": f"{type(inner).__module__}.{type(inner).__name__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "small-llama"], default="smollm2")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from worker.demo_data import build_demo_data
    from worker.training.base_models import inspect_model
    from worker.training.data import prepare_file

    home = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    folder = base_model(args.model, home)
    profile = inspect_model(folder)
    data = build_demo_data(home / "data")
    rows = prepare_file(AutoTokenizer.from_pretrained(folder), data.train_path, max_seq_length=128).rows
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per run: each peak is its own
    results = []
    for peft in args.methods.split(","):
        for optimizer in CPU_OPTIMIZERS:
            hp = SupervisedHyperparameters(
                peft=peft,  # type: ignore[arg-type]
                optimizer=optimizer,  # type: ignore[arg-type]
                batch_size=4,
                max_seq_length=128,
            )
            resolved = hp.resolved().model_dump()
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                run = pool.submit(train, folder, profile, resolved, rows, args.steps, home / "work").result()
            plan = planner.plan_method(profile, resolved, peft=peft, device="cpu")
            results.append(run | {"peft": peft, "optimizer": optimizer, "plan": plan})
            print(results[-1] | {"plan": plan.optimizer_states}, flush=True)
    print(
        f"\nmodel {args.model} ({profile['total_parameters']:,} parameters), batch 4 x 128 tokens, "
        f"{args.steps} steps, fp32 on CPU\n"
    )
    print(
        "| method | optimizer | states MiB (x AdamW) | plan states MiB (measured / plan) "
        "| peak MiB (x AdamW) | plan total MiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        adamw = next(a for a in results if a["peft"] == r["peft"] and a["optimizer"] == "adamw")
        states, plan = r["states"], r["plan"]
        print(
            f"| {r['peft']} | {r['optimizer']} | {states / MiB:.1f} ({states / adamw['states']:.3f}x) "
            f"| {plan.optimizer_states / MiB:.1f} ({states / plan.optimizer_states:.3f}) "
            f"| {r['peak_mb']:.0f} ({r['peak_mb'] / adamw['peak_mb']:.2f}x) | {plan.total / MiB:.0f} |"
        )


if __name__ == "__main__":
    main()
