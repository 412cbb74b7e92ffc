"""Preference (DPO) recipe: setup -> fit -> save, on TRL's DPOTrainer.

OpenAI's preference examples become TRL's conversational preference rows: prompt = `input.messages`,
chosen = `preferred_output`, rejected = `non_preferred_output`; TRL renders them with the model's chat
template. With an adapter method the reference policy is the base model with the adapter switched off
(TRL's choice when it gets a `peft_config` and no `ref_model`), so one copy of the weights serves both.
`full` trains every weight, so TRL loads a frozen second copy as the reference.

Run by worker/train_job.py inside a child process, like sft.py, whose loaders, manifest and save it reuses.
"""

import time
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from app.files.validation import load_examples
from worker.training import sft, tracking
from worker.training.callbacks import JobReporter
from worker.training.data import split_rows
from worker.training.memory import MemoryMeter
from worker.training.methods import MethodPlan, ModelInfo, plan_for
from worker.training.sft import RunResult, RunSpec

# TRL's preference metrics that the final event and manifest carry (training ones averaged over the last
# epoch); checkpoints carry every valid_* metric TRL logs.
REWARD_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
FINAL_VALID_METRICS = ("valid_loss", "valid_rewards/accuracies", "valid_rewards/margins")


def _message(message: dict) -> dict[str, str]:
    """Role and text only: OpenAI's content parts joined, and `weight`, which DPO has no use for, dropped."""
    content = message["content"]
    if isinstance(content, list):
        content = "".join(part["text"] for part in content)
    return {"role": message["role"], "content": content}


def preference_row(example: dict) -> dict[str, list[dict[str, str]]]:
    """One validated OpenAI preference example as a TRL conversational preference row."""
    return {
        "prompt": [_message(m) for m in example["input"]["messages"]],
        "chosen": [_message(m) for m in example["preferred_output"]],
        "rejected": [_message(m) for m in example["non_preferred_output"]],
    }


def load_pairs(path: Any) -> list[dict]:
    return [preference_row(example) for example in load_examples(path.read_bytes())]


def setup(spec: RunSpec, plan: MethodPlan) -> tuple[Any, Any, list[dict], list[dict] | None]:
    """Load tokenizer and model and read the preference pairs."""
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = sft.load_model(spec, plan)
    train, valid = load_pairs(spec.training_file), None
    if spec.validation_file:
        valid = load_pairs(spec.validation_file)
    elif spec.hyperparameters.get("validation_split"):
        train, valid = split_rows(train, spec.hyperparameters["validation_split"], seed=spec.seed)
    return tokenizer, model, train, valid


def trainer_config(spec: RunSpec, *, has_validation: bool) -> DPOConfig:
    """DPOConfig from the job's resolved hyperparameters and the device; checkpoints as in SFT."""
    hp = spec.hyperparameters
    return DPOConfig(
        **sft.training_arguments(spec, has_validation=has_validation),
        beta=hp["beta"],
        max_length=hp["max_seq_length"],
    )


def build_trainer(
    spec: RunSpec,
    plan: MethodPlan,
    tokenizer: Any,
    model: Any,
    train: list[dict],
    valid: list[dict] | None,
    callbacks: list[TrainerCallback],
) -> DPOTrainer:
    """DPOTrainer with no ref_model: TRL then disables the adapter for the reference, or copies the model."""
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=trainer_config(spec, has_validation=valid is not None),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(valid) if valid else None,
        processing_class=tokenizer,
        peft_config=plan.peft_config,
        callbacks=callbacks,
    )


def reference_of(trainer: DPOTrainer) -> tuple[str, dict[str, Any]]:
    """How the trainer gets its reference log-probs, as an event message and data."""
    if trainer.ref_model is None and is_peft_model(trainer.model):
        return "Reference model: the base with the adapter disabled (one copy of the weights).", {
            "reference_model": "base_with_adapters_disabled"
        }
    return "Full DPO keeps a frozen reference copy of the model: twice the weight memory.", {
        "reference_model": "frozen_copy"
    }


def pair_tokens(dataset: Any) -> int:
    """Tokens one pass over a prepared dataset feeds the policy: the prompt once for each completion."""
    return sum(
        2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in dataset
    )


def final_epoch_means(log_history: list[dict], n_epochs: int) -> dict[str, float]:
    """TRL's reward metrics averaged over the training logs of the last epoch (one step is too noisy)."""
    last = [log for log in log_history if "loss" in log and log.get("epoch", 0) > n_epochs - 1]
    return {
        "train_" + key: round(sum(log[key] for log in last) / len(last), 4)
        for key in REWARD_METRICS
        if last and all(key in log for log in last)
    }


def fit(
    spec: RunSpec, trainer: DPOTrainer, valid: list[dict] | None, reporter: JobReporter
) -> dict[str, Any]:
    """Train; the reporter streams metrics and checkpoints and stops on cancel."""
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    reporter.event(
        f"Method {spec.hyperparameters['peft']}: {trainable:,} of {total:,} parameters train.",
        {"trainable_parameters": trainable, "total_parameters": total},
    )
    reporter.event(*reference_of(trainer))
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=spec.resume_argument)
    elapsed = time.monotonic() - started
    metrics: dict[str, Any] = {
        "train_loss": output.training_loss,
        "steps": output.global_step,
        "runtime_seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / spec.steps_run(output.global_step), 3),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "beta": spec.hyperparameters["beta"],
    }
    metrics |= final_epoch_means(trainer.state.log_history, spec.hyperparameters["n_epochs"])
    if valid is not None and not reporter.stopped:
        if reporter.last_eval_step != output.global_step:
            trainer.evaluate()
        metrics |= {k: v for k, v in reporter.last_metrics.items() if k in FINAL_VALID_METRICS}
    return metrics


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
    quantization = sft.report_quantization(model, reporter)
    with tracking.tracked(spec, reporter) as spec:  # the same spec, reporting to the job's trackers
        trainer = build_trainer(spec, plan, tokenizer, model, train, valid, [reporter])
        kept = len(trainer.train_dataset)
        if not kept:
            raise ValueError(
                "every preference pair's prompt is longer than max_seq_length; raise max_seq_length"
            )
        tokens = pair_tokens(trainer.train_dataset)
        reporter.event(
            f"Training on {kept} preference pairs ({tokens} tokens, {len(train) - kept} dropped: prompt "
            f"longer than max_seq_length).",
            {"examples": kept, "tokens": tokens},
        )
        meter.training_starts()
        metrics = fit(spec, trainer, valid, reporter)
    metrics["peak_memory_mb"] = meter.peak_mb()
    reporter.event(
        f"Training finished after {metrics['steps']} steps ({metrics['seconds_per_step']} s a step, "
        f"peak memory {metrics['peak_memory_mb']} MiB).",
        metrics,
    )
    trained_tokens = tokens * spec.hyperparameters["n_epochs"]
    if reporter.stopped:
        return RunResult(spec.workdir, trained_tokens, metrics, cancelled=True)
    info_json = sft.manifest(spec, metrics, trained_tokens, quantization=quantization)
    output_dir = sft.save(spec, trainer, tokenizer, info_json)
    return RunResult(output_dir, trained_tokens, metrics, cancelled=False)
