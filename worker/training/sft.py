"""Supervised fine-tuning recipe: setup -> fit -> save, on TRL's SFTTrainer.

Run by worker/train_job.py inside a child process; everything it needs arrives in a `RunSpec`.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from app.estimate import planner
from worker.training import distributed, fast_path, tracking
from worker.training.callbacks import JobReporter
from worker.training.data import PreparedData, prepare_file, split_off
from worker.training.memory import MemoryMeter
from worker.training.methods import MethodPlan, ModelInfo, freeze_all_but_top, plan_for, quantization_of
from worker.training.optimizers import trainer_optim

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tuneforge")


@dataclass
class RunSpec:
    """Everything one training run needs, resolved from the job row by the caller."""

    job_id: str
    attempt: int
    base_model: str  # the registered name
    base_model_path: Path
    linear_modules: list[str]
    profile: dict[str, Any]  # the base's shapes and counts, recorded at registration (inspect_model)
    hyperparameters: dict[str, Any]  # resolved: no 'auto' left
    method: dict[str, Any]
    seed: int
    training_file: Path
    training_file_id: str
    validation_file: Path | None
    validation_file_id: str | None
    workdir: Path
    resume_from: Path | None = None  # a checkpoint folder of an earlier attempt (worker/training/resume.py)
    report_to: list[str] = field(default_factory=list)  # the trackers whose runs opened (tracking.py)

    @property
    def resume_argument(self) -> str | None:
        """Trainer's `resume_from_checkpoint`: optimizer, scheduler, RNG and data position come back too."""
        return str(self.resume_from) if self.resume_from else None

    def steps_run(self, global_step: int) -> int:
        """Steps this attempt trained: the global step less the one it resumed from (`checkpoint-N`)."""
        resumed = int(self.resume_from.name.removeprefix("checkpoint-")) if self.resume_from else 0
        return max(global_step - resumed, 1)


@dataclass
class RunResult:
    output_dir: Path  # the folder to publish: adapter (or model), tokenizer, tuneforge.json
    trained_tokens: int
    metrics: dict[str, Any]
    cancelled: bool


def device_defaults() -> dict[str, Any]:
    """bf16 pays off on a GPU; on a CPU it slows training down (1.24x per step for SmolLM2-135M on a CPU
    with native bf16: bench/cpu_precision.py). Gradient checkpointing is the job's: checkpoints_blocks."""
    return {"bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}


def checkpoints_blocks(hp: dict[str, Any]) -> bool:
    """The job's `gradient_checkpointing` on this device, as the estimate plans it (`auto`, left by a job
    created before the API resolved it, is on with a GPU only)."""
    return planner.checkpoints_blocks(hp, "cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: RunSpec, plan: MethodPlan) -> Any:
    """The base model from its local folder (safetensors only), quantized and frozen as the method says."""
    dtype = torch.bfloat16 if device_defaults()["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_model_path,
        dtype=dtype,
        trust_remote_code=False,
        use_safetensors=True,
        quantization_config=plan.quantization,
    )
    if plan.quantization is not None:
        if not torch.cuda.is_available():
            release_checkpoint_file(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpoints_blocks(spec.hyperparameters)
        )
    if plan.trainable_layers is not None:
        freeze_all_but_top(model, layers=plan.trainable_layers, train_head=plan.train_head)
    return model


def release_checkpoint_file(model: Any) -> None:
    """Copy the unquantized tensors (embeddings, norms) of a quantized CPU model out of the checkpoint.

    On CPU they are zero-copy views of the memory-mapped safetensors file, which keeps the whole
    full-precision file mapped and resident after quantization read it: more memory than the 4-bit model.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()


def report_quantization(model: Any, reporter: JobReporter) -> dict[str, Any] | None:
    """Say in an event how bitsandbytes holds the loaded base (nothing for a full-precision one)."""
    quantization = quantization_of(model)
    if quantization is not None:
        reporter.event(
            f"Base model loaded in {quantization['bits']}-bit: {quantization['quantized_modules']} "
            f"{quantization['module_class']} layers.",
            {"quantization": quantization},
        )
    return quantization


def setup(spec: RunSpec, plan: MethodPlan) -> tuple[Any, Any, PreparedData, PreparedData | None]:
    """Load tokenizer and model and tokenize the data."""
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(spec, plan)
    max_len = spec.hyperparameters["max_seq_length"]
    on_inputs = spec.hyperparameters.get("train_on_inputs", False)
    train = prepare_file(tokenizer, spec.training_file, max_seq_length=max_len, train_on_inputs=on_inputs)
    if not train.rows:
        raise ValueError("no training example has any completion token left after truncation")
    valid = None
    if spec.validation_file:
        valid = prepare_file(
            tokenizer, spec.validation_file, max_seq_length=max_len, train_on_inputs=on_inputs
        )
    elif spec.hyperparameters.get("validation_split"):
        train, valid = split_off(train, spec.hyperparameters["validation_split"], seed=spec.seed)
    return tokenizer, model, train, valid


def training_arguments(spec: RunSpec, *, has_validation: bool) -> dict[str, Any]:
    """The TrainingArguments every task's recipe shares: schedule, checkpoints, evaluation, seed, device."""
    hp = spec.hyperparameters
    every = hp.get("checkpoint_every_steps")
    strategy = "steps" if every else "epoch"
    arguments = dict(
        output_dir=str(spec.workdir / "trainer"),
        num_train_epochs=hp["n_epochs"],
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        learning_rate=hp["learning_rate"],
        optim=trainer_optim(hp),
        warmup_steps=hp["warmup_ratio"],  # transformers reads a value below 1 as a fraction of all steps
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy=strategy,
        save_steps=every or 500,
        eval_strategy=strategy if has_validation else "no",
        eval_steps=every if has_validation and every else None,
        # The base model's validation loss, as step 0: the baseline a user reads the run's gain against. A
        # resumed attempt has it from the attempt that began the run.
        eval_on_start=has_validation and spec.resume_from is None,
        seed=spec.seed,
        data_seed=spec.seed,
        report_to=spec.report_to or "none",
        run_name=spec.job_id,  # each tracker's run is named after the job
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        gradient_checkpointing=checkpoints_blocks(hp),
        **device_defaults(),
    )
    return arguments | distributed.trainer_arguments(hp["peft"], checkpoints_blocks(hp))


def trainer_config(spec: RunSpec, *, has_validation: bool, padding_free: bool) -> SFTConfig:
    """SFTConfig from the job's resolved hyperparameters and the device."""
    hp = spec.hyperparameters
    packing = hp.get("packing", False)
    return SFTConfig(
        **training_arguments(spec, has_validation=has_validation),
        # prepare_file has truncated every example already; TRL needs the length only to pack rows.
        max_length=hp["max_seq_length"] if packing or not padding_free else None,
        packing=packing,
        padding_free=padding_free,
        completion_only_loss=True,
        # Liger's kernels for the layers only: TRL keeps its own fused head for the loss.
        use_liger_kernel=hp.get("liger_kernels", False),
    )


class ModelLossTrainer(SFTTrainer):
    """SFTTrainer on the model's own causal-LM loss, for PEFT methods without TRL's fused-head outputs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        outputs = model(**inputs)  # labels are already -100 outside the completion
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def fit(
    spec: RunSpec,
    plan: MethodPlan,
    tokenizer: Any,
    model: Any,
    train: PreparedData,
    valid: PreparedData | None,
    reporter: JobReporter,
) -> tuple[SFTTrainer, dict[str, Any]]:
    """Train with SFTTrainer; the reporter streams metrics and stops on cancel."""
    trainer_class = ModelLossTrainer if plan.model_loss else SFTTrainer
    padding_free, why = fast_path.use_padding_free(spec.hyperparameters, model)
    reporter.event(why, {"padding_free": padding_free})
    trainer = trainer_class(
        model=model,
        args=trainer_config(spec, has_validation=valid is not None, padding_free=padding_free),
        train_dataset=Dataset.from_list(train.rows),
        eval_dataset=Dataset.from_list(valid.rows) if valid else None,
        processing_class=tokenizer,
        peft_config=plan.peft_config,
        callbacks=[reporter],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    reporter.event(
        f"Method {spec.hyperparameters['peft']}: {trainable:,} of {total:,} parameters train.",
        {"trainable_parameters": trainable, "total_parameters": total},
    )
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=spec.resume_argument)
    metrics = {
        "train_loss": output.training_loss,
        "steps": output.global_step,
        "runtime_seconds": round(time.monotonic() - started, 2),
        "seconds_per_step": round((time.monotonic() - started) / spec.steps_run(output.global_step), 3),
        "steps_seconds": round(reporter.seconds_to_last_step(), 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        # As the run did it (the Trainer turns it on as training starts), not as it was asked for.
        "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
        # How many ranks trained, and whether they sharded the model (FSDP) or each held a copy (DDP).
        "ranks": distributed.world_size(),
        "sharded": bool(getattr(trainer, "is_fsdp_enabled", False)),
    }
    if valid is not None and not reporter.stopped:
        if reporter.last_eval_step != output.global_step:
            trainer.evaluate()
        metrics["valid_loss"] = reporter.last_metrics["valid_loss"]
    return trainer, metrics


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(
    spec: RunSpec, metrics: dict[str, Any], trained_tokens: int, *, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    """What makes the artifact explain itself: spec, data, base and its quantization, versions, metrics."""
    weights = sorted(spec.base_model_path.glob("*.safetensors"))
    return {
        "tuneforge_job_id": spec.job_id,
        "base_model": spec.base_model,
        "base_model_revision": hashlib.sha256("".join(_sha256(w) for w in weights).encode()).hexdigest(),
        "quantization": quantization,
        "method": spec.method,
        "training_file": spec.training_file_id,
        "training_data_sha256": _sha256(spec.training_file),
        "validation_file": spec.validation_file_id,
        "validation_data_sha256": _sha256(spec.validation_file) if spec.validation_file else None,
        "seed": spec.seed,
        "trained_tokens": trained_tokens,
        "metrics": metrics,
        "library_versions": {name: version(name) for name in LIBRARIES},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def save(spec: RunSpec, trainer: SFTTrainer, tokenizer: Any, info: dict[str, Any]) -> Path:
    """Write the adapter (or full model), tokenizer and manifest into one folder."""
    output_dir = spec.workdir / "final"
    trainer.save_model(str(output_dir))  # PEFT models save only the adapter, as safetensors
    if not distributed.is_leader():  # every rank takes part in the save (FSDP gathers); the leader writes
        return output_dir
    (output_dir / "training_args.bin").unlink(
        missing_ok=True
    )  # a pickle: artifacts ship safetensors and JSON only
    tokenizer.save_pretrained(output_dir)
    (output_dir / "tuneforge.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return output_dir


def run(spec: RunSpec) -> RunResult:
    """The whole recipe for one attempt of one job."""
    torch.manual_seed(spec.seed)
    config = AutoConfig.from_pretrained(spec.base_model_path, trust_remote_code=False)
    info = ModelInfo(linear_modules=spec.linear_modules, num_layers=config.num_hidden_layers)
    plan = plan_for(spec.hyperparameters, info)
    meter = MemoryMeter()
    meter.start(quantized=plan.quantization is not None)
    tokenizer, model, train, valid = setup(spec, plan)
    reporter = JobReporter(job_id=spec.job_id, attempt=spec.attempt)
    quantization = report_quantization(model, reporter)
    reporter.event(
        f"Training on {len(train.rows)} examples ({train.total_tokens} tokens, {train.truncated} truncated, "
        f"{train.dropped} without completion tokens dropped).",
        {"examples": len(train.rows), "tokens": train.total_tokens},
    )
    meter.training_starts()
    with tracking.tracked(spec, reporter) as spec:  # the same spec, reporting to the job's trackers
        trainer, metrics = fit(spec, plan, tokenizer, model, train, valid, reporter)
    metrics["peak_memory_mb"] = meter.peak_mb()
    reporter.event(
        f"Training finished after {metrics['steps']} steps ({metrics['seconds_per_step']} s a step, "
        f"peak memory {metrics['peak_memory_mb']} MiB).",
        metrics,
    )
    trained_tokens = train.total_tokens * spec.hyperparameters["n_epochs"]
    if reporter.stopped:
        return RunResult(spec.workdir, trained_tokens, metrics, cancelled=True)
    metrics |= {k: v for k, v in reporter.last_metrics.items() if k == "train_mean_token_accuracy"}
    output_dir = save(
        spec, trainer, tokenizer, manifest(spec, metrics, trained_tokens, quantization=quantization)
    )
    return RunResult(output_dir, trained_tokens, metrics, cancelled=False)
