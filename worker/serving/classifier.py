"""Classification models for POST /v1/classifications: texts in, labels and their probabilities out.

A classifier is either a whole model (full or freeze fine-tune, config architectures ending in
``ForSequenceClassification``) or a SEQ_CLS adapter whose folder's ``config.json`` names the labels and
whose ``modules_to_save`` carry the trained head. Loaded classifiers are kept in a small cache; they are
separate from the generation engine's models, so classifying never waits on a generation batch.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from pydantic import BaseModel, Field
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from app.errors import ApiError
from worker.serving.engine import Target

MAX_LOADED = 4
"""Classifiers kept loaded; the oldest is dropped beyond this (they are small encoders, usually)."""
MAX_INPUTS = 256
"""Most texts in one request, so one request cannot hold the server for minutes."""


class ClassificationRequest(BaseModel):
    model: str = Field(description="A classification model's id (a fine-tuning job's fine_tuned_model).")
    input: str | list[str] = Field(description="The text, or a list of texts, to classify.")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


@dataclass
class Classifier:
    tokenizer: Any
    model: Any
    labels: dict[int, str]
    max_length: int


_loaded: dict[str, Classifier] = {}
_lock = threading.Lock()


def not_a_classifier(model_id: str) -> ApiError:
    return ApiError(
        400,
        f"'{model_id}' is not a classification model. Fine-tune one with method.type 'classification'; "
        "generative models answer /v1/chat/completions.",
        param="model",
        code="not_a_classifier",
    )


def weights_folder(target: Target) -> tuple[Path, bool] | None:
    """(folder, is_adapter) when the target is a classifier, else None."""
    folder = target.adapter_path or target.base_path
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        task = json.loads(adapter_config.read_text()).get("task_type")
        return (folder, True) if task == "SEQ_CLS" else None
    config = folder / "config.json"
    if not config.exists():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or []
    return (folder, False) if any(a.endswith("ForSequenceClassification") for a in architectures) else None


def load(target: Target) -> Classifier:
    """The target's classifier, loaded once (float32 on the CPU: classifiers are small); 400 if none."""
    found = weights_folder(target)
    if found is None:
        raise not_a_classifier(target.model_id)
    with _lock:
        if target.model_id in _loaded:
            return _loaded[target.model_id]
        folder, is_adapter = found
        options: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}
        options["trust_remote_code"] = False
        if is_adapter:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # names the labels
            base = AutoModelForSequenceClassification.from_pretrained(
                target.base_path, config=config, **options
            )
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(folder, **options)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if tokenizer.pad_token is None:  # causal LM classifiers trained with eos as padding
            tokenizer.pad_token = tokenizer.eos_token
        positions = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        classifier = Classifier(
            tokenizer=tokenizer,
            model=model.eval(),
            labels={int(i): str(name) for i, name in model.config.id2label.items()},
            max_length=min(int(positions), int(tokenizer.model_max_length)),
        )
        while len(_loaded) >= MAX_LOADED:
            _loaded.pop(next(iter(_loaded)))
        _loaded[target.model_id] = classifier
        return classifier


def classify(target: Target, texts: list[str]) -> dict[str, Any]:
    """OpenAI-style list of {index, label, score, scores} for `texts`, with token usage."""
    if not texts or len(texts) > MAX_INPUTS:
        raise ApiError(400, f"'input' must hold 1 to {MAX_INPUTS} texts; got {len(texts)}.", param="input")
    classifier = load(target)
    inputs = classifier.tokenizer(
        texts, truncation=True, max_length=classifier.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probabilities = classifier.model(**inputs).logits.float().softmax(-1).tolist()
    data = []
    for index, row in enumerate(probabilities):
        best = max(range(len(row)), key=row.__getitem__)
        scores = {classifier.labels[i]: p for i, p in enumerate(row)}
        data.append({"index": index, "label": classifier.labels[best], "score": row[best], "scores": scores})
    tokens = int(inputs["attention_mask"].sum())
    return {
        "object": "list",
        "model": target.model_id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
