"""Sequence-classification recipe: setup -> fit -> save, on transformers' Trainer.

`{"text", "label"}` examples train a new classification head on the base model (an encoder such as
MiniLM, or a causal LM), with the job's method deciding which other weights train: an adapter (LoRA and
its family, PEFT task SEQ_CLS, so the head ships in the adapter's `modules_to_save`), the top blocks
(`freeze`) or everything (`full`). The labels are the training file's distinct label strings, sorted;
their names go into the model config (`id2label`), so the artifact says what each logit means.

With validation data the base head is evaluated before training (its accuracy is the level fine-tuning
must beat), then at every checkpoint and at the end: loss, accuracy, macro F1 and each label's F1.

Run by worker/train_job.py inside a child process, like sft.py, whose spec, manifest and save it reuses.
"""

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from app.files.validation import load_examples
from worker.training import sft, tracking
from worker.training.callbacks import JobReporter
from worker.training.data import split_rows
from worker.training.memory import MemoryMeter
from worker.training.methods import MethodPlan, ModelInfo, freeze_all_but_top, plan_for
from worker.training.sft import RunResult, RunSpec

# The head a classifier trains from scratch: PEFT's names for the new layer, and BERT's pooler feeding it.
HEAD_MODULES = ("classifier", "score", "pooler")


def read_examples(path: Path) -> list[dict]:
    return load_examples(path.read_bytes())


def label_names(examples: list[dict]) -> list[str]:
    """The distinct labels of the training file, as sorted strings (integer labels become their digits)."""
    return sorted({str(example["label"]) for example in examples})


def label_ids(examples: list[dict], labels: list[str], *, source: str) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for number, example in enumerate(examples, start=1):
        name = str(example["label"])
        if name not in index:
            raise ValueError(
                f"{source} example {number}: label '{name[:40]}' does not occur in the training file, "
                f"whose labels are {labels[:20]}; the head can only predict labels it trained on"
            )
        ids.append(index[name])
    return ids


def tokenize(tokenizer: Any, examples: list[dict], ids: list[int], max_len: int) -> Dataset:
    encoded = tokenizer([example["text"] for example in examples], truncation=True, max_length=max_len)
    return Dataset.from_dict(dict(encoded) | {"labels": ids})


def classification_metrics(predicted: np.ndarray, actual: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Accuracy, each label's F1 and their mean (macro F1), over the labels that were predicted or true.

    A label neither predicted nor present has no F1 (0/0); leaving it out, as scikit-learn does by
    default, keeps a validation set that lacks a rare label from dragging macro F1 down.
    """
    scores = {"accuracy": float(np.mean(predicted == actual))}
    f1 = {}
    for index, name in enumerate(labels):
        true_positive = np.sum((predicted == index) & (actual == index))
        wrong = np.sum((predicted == index) != (actual == index))  # false positives plus false negatives
        if true_positive + wrong:
            f1[f"f1_{name}"] = float(2 * true_positive / (2 * true_positive + wrong))
    scores["macro_f1"] = float(np.mean(list(f1.values()))) if f1 else 0.0
    return scores | f1


def load_model(spec: RunSpec, plan: MethodPlan, labels: list[str], pad_token_id: int) -> Any:
    """The base model with a new head of len(labels) outputs, wrapped or frozen as the method says."""
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.base_model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=pad_token_id,  # causal LMs classify from the last non-pad token
        dtype=torch.bfloat16 if sft.device_defaults()["bf16"] else torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
        quantization_config=plan.quantization,
    )
    if plan.quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=sft.checkpoints_blocks(spec.hyperparameters)
        )
    if plan.trainable_layers is not None:
        freeze_all_but_top(model, layers=plan.trainable_layers, train_head=False)
        # The head is new and random: frozen, it would be useless, so it trains whatever train_head says.
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in HEAD_MODULES:
                module.requires_grad_(True)
    if plan.peft_config is not None:
        model = get_peft_model(model, plan.peft_config)
    return model


def setup(spec: RunSpec, plan: MethodPlan) -> tuple[Any, Any, list[str], Dataset, Dataset | None]:
    """Read the labels, load tokenizer and model, and tokenize the data."""
    hp = spec.hyperparameters
    train_examples, valid_examples = read_examples(spec.training_file), None
    if spec.validation_file:
        valid_examples = read_examples(spec.validation_file)
    elif hp.get("validation_split"):
        train_examples, valid_examples = split_rows(train_examples, hp["validation_split"], seed=spec.seed)
    labels = label_names(train_examples)
    if len(labels) < 2:
        raise ValueError(f"the training file has one label ({labels[0]!r}); a classifier needs at least two")
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(spec, plan, labels, tokenizer.pad_token_id)
    max_len = hp["max_seq_length"]
    train = tokenize(tokenizer, train_examples, label_ids(train_examples, labels, source="training"), max_len)
    valid = None
    if valid_examples is not None:
        ids = label_ids(valid_examples, labels, source="validation")
        valid = tokenize(tokenizer, valid_examples, ids, max_len)
    return tokenizer, model, labels, train, valid


def trainer_config(spec: RunSpec, *, has_validation: bool) -> TrainingArguments:
    """TrainingArguments from the job's resolved hyperparameters and the device; checkpoints as in SFT."""
    arguments = sft.training_arguments(spec, has_validation=has_validation)
    # evaluate_base has scored the base model already, as base_valid_*: a second pass would repeat it.
    return TrainingArguments(**arguments | {"eval_on_start": False})


def build_trainer(
    spec: RunSpec, tokenizer: Any, model: Any, labels: list[str], train: Dataset, valid: Dataset | None
) -> Trainer:
    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits  # some models return more than logits
        return classification_metrics(np.argmax(logits, axis=-1), prediction.label_ids, labels)

    return Trainer(
        model=model,
        args=trainer_config(spec, has_validation=valid is not None),
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,  # pads each batch to its longest text
        compute_metrics=compute_metrics,
    )


def evaluate_base(trainer: Trainer, reporter: JobReporter) -> dict[str, float]:
    """The untrained head's validation metrics, as base_valid_*: the level fine-tuning has to beat."""
    scores = trainer.evaluate(metric_key_prefix="base_valid")
    base = {
        key: round(value, 4)
        for key, value in scores.items()
        if key.removeprefix("base_valid_") in ("loss", "accuracy", "macro_f1") or "_f1_" in key
    }
    reporter.event(
        f"Before training: validation loss={base['base_valid_loss']:.4f}, "
        f"accuracy={base['base_valid_accuracy']:.4f} (the base model with a new, untrained head).",
        base,
    )
    return base


def fit(spec: RunSpec, trainer: Trainer, reporter: JobReporter) -> dict[str, Any]:
    """Train; the reporter streams metrics and checkpoints and stops on cancel."""
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    reporter.event(
        f"Method {spec.hyperparameters['peft']}: {trainable:,} of {total:,} parameters train.",
        {"trainable_parameters": trainable, "total_parameters": total},
    )
    metrics: dict[str, Any] = {}
    if trainer.eval_dataset is not None:
        metrics |= evaluate_base(trainer, reporter)
    trainer.add_callback(reporter)  # after the base evaluation, which is no checkpoint's metric
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=spec.resume_argument)
    elapsed = time.monotonic() - started
    metrics |= {
        "train_loss": output.training_loss,
        "steps": output.global_step,
        "runtime_seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / spec.steps_run(output.global_step), 3),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    if trainer.eval_dataset is not None and not reporter.stopped:
        if reporter.last_eval_step != output.global_step:
            trainer.evaluate()
        # Trainer times its first model preparation (here: the base evaluation's) into every later eval.
        kept = {k: v for k, v in reporter.last_metrics.items() if k.startswith("valid_")}
        metrics |= {k: v for k, v in kept.items() if k != "valid_model_preparation_time"}
    return metrics


def save(spec: RunSpec, trainer: Trainer, tokenizer: Any, info: dict[str, Any]) -> Path:
    """sft.save's folder; an adapter also gets the classifier's config, which names its labels."""
    output_dir = sft.save(spec, trainer, tokenizer, info)
    model = trainer.model
    if hasattr(model, "get_base_model"):  # a PeftModel: save_model wrote the adapter only
        base = model.get_base_model()
        base.config.architectures = [type(base).__name__]
        base.config.save_pretrained(output_dir)
    return output_dir


def run(spec: RunSpec) -> RunResult:
    """The whole recipe for one attempt of one job."""
    torch.manual_seed(spec.seed)  # the new head's initial weights come from this seed
    config = AutoConfig.from_pretrained(spec.base_model_path, trust_remote_code=False)
    info = ModelInfo(linear_modules=spec.linear_modules, num_layers=config.num_hidden_layers)
    plan = plan_for(spec.hyperparameters, info, task_type="SEQ_CLS")
    meter = MemoryMeter()
    meter.start(quantized=plan.quantization is not None)
    tokenizer, model, labels, train, valid = setup(spec, plan)
    reporter = JobReporter(job_id=spec.job_id, attempt=spec.attempt)
    quantization = sft.report_quantization(model, reporter)
    tokens = sum(len(ids) for ids in train["input_ids"])
    truncated = sum(len(ids) == spec.hyperparameters["max_seq_length"] for ids in train["input_ids"])
    reporter.event(
        f"Training on {len(train)} examples ({tokens} tokens, {truncated} at max_seq_length) with "
        f"{len(labels)} labels: {', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''}.",
        {"examples": len(train), "tokens": tokens, "labels": labels},
    )
    with tracking.tracked(spec, reporter) as spec:  # the same spec, reporting to the job's trackers
        trainer = build_trainer(spec, tokenizer, model, labels, train, valid)
        meter.training_starts()
        metrics = fit(spec, trainer, reporter)
    metrics["peak_memory_mb"] = meter.peak_mb()
    accuracy = f", validation accuracy {metrics['valid_accuracy']:.4f}" if "valid_accuracy" in metrics else ""
    reporter.event(
        f"Training finished after {metrics['steps']} steps ({metrics['seconds_per_step']} s a step, "
        f"peak memory {metrics['peak_memory_mb']} MiB{accuracy}).",
        metrics,
    )
    trained_tokens = tokens * spec.hyperparameters["n_epochs"]
    if reporter.stopped:
        return RunResult(spec.workdir, trained_tokens, metrics, cancelled=True)
    info_json = sft.manifest(spec, metrics, trained_tokens, quantization=quantization) | {"labels": labels}
    output_dir = save(spec, trainer, tokenizer, info_json)
    return RunResult(output_dir, trained_tokens, metrics, cancelled=False)
