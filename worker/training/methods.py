"""The method registry: each entry turns resolved hyperparameters into how the model is loaded and wrapped.

QLoRA is LoRA plus a 4-bit quantization config; DoRA is LoRA with `use_dora`. `full` and `freeze` use
no PEFT config: `freeze` trains only the top `n_trainable_layers` blocks (and the head, if asked).
`quantization_of` reads back what bitsandbytes did to the loaded model, so a run can show it.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from peft import (
    AdaptionPromptConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from transformers import BitsAndBytesConfig

# The estimate plans with the same defaults the worker trains with: they are defined once, in the API.
from app.estimate.counts import IA3_FEEDFORWARD, IA3_MODULES, default_target_modules


@dataclass(frozen=True)
class ModelInfo:
    """What a method needs to know of the base model before loading it."""

    linear_modules: list[str]
    num_layers: int


@dataclass(frozen=True)
class MethodPlan:
    """How one method loads and wraps the base model."""

    peft_config: PeftConfig | None = None
    quantization: BitsAndBytesConfig | None = None
    trainable_layers: int | None = None  # freeze: how many top blocks train
    train_head: bool = False  # freeze: whether the output head trains
    model_loss: bool = False  # train on the model's own loss: PEFT's adaption prompt lacks TRL's fused head


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _lora(hp: dict[str, Any], info: ModelInfo, **extra: Any) -> MethodPlan:
    return MethodPlan(
        LoraConfig(
            r=hp["lora_r"],
            lora_alpha=hp["lora_alpha"],
            lora_dropout=hp["lora_dropout"],
            target_modules=_modules_for(hp, info),
            use_rslora=hp.get("use_rslora", False),
            task_type="CAUSAL_LM",
            **extra,
        )
    )


def _qlora(hp: dict[str, Any], info: ModelInfo) -> MethodPlan:
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )
    return replace(_lora(hp, info), quantization=nf4)


def _lora_8bit(hp: dict[str, Any], info: ModelInfo) -> MethodPlan:
    return replace(_lora(hp, info), quantization=BitsAndBytesConfig(load_in_8bit=True))


def _modules_for(hp: dict[str, Any], info: ModelInfo) -> list[str] | str:
    return hp["target_modules"] or default_target_modules(info.linear_modules)


def _llama_adapter(hp: dict[str, Any], info: ModelInfo) -> MethodPlan:
    # LLaMA-Adapter: learned prompts gated into the attention of every block.
    config = AdaptionPromptConfig(
        adapter_len=hp["num_virtual_tokens"], adapter_layers=info.num_layers, task_type="CAUSAL_LM"
    )
    return MethodPlan(config, model_loss=True)


METHODS: dict[str, Callable[[dict[str, Any], ModelInfo], MethodPlan]] = {
    "lora": _lora,
    "dora": lambda hp, info: _lora(hp, info, use_dora=True),
    "qlora": _qlora,
    "lora_8bit": _lora_8bit,
    "full": lambda hp, info: MethodPlan(),
    "freeze": lambda hp, info: MethodPlan(
        trainable_layers=hp["n_trainable_layers"], train_head=hp["train_head"]
    ),
    "prefix_tuning": lambda hp, info: MethodPlan(
        PrefixTuningConfig(num_virtual_tokens=hp["num_virtual_tokens"], task_type="CAUSAL_LM")
    ),
    "prompt_tuning": lambda hp, info: MethodPlan(
        PromptTuningConfig(num_virtual_tokens=hp["num_virtual_tokens"], task_type="CAUSAL_LM")
    ),
    "p_tuning": lambda hp, info: MethodPlan(
        PromptEncoderConfig(num_virtual_tokens=hp["num_virtual_tokens"], task_type="CAUSAL_LM")
    ),
    "ia3": lambda hp, info: MethodPlan(
        IA3Config(
            target_modules=[m for m in IA3_MODULES if m in info.linear_modules] or "all-linear",
            feedforward_modules=[m for m in IA3_FEEDFORWARD if m in info.linear_modules],
            task_type="CAUSAL_LM",
        )
    ),
    "loha": lambda hp, info: MethodPlan(
        LoHaConfig(
            r=hp["lora_r"],
            alpha=hp["lora_alpha"],
            target_modules=_modules_for(hp, info),
            task_type="CAUSAL_LM",
        )
    ),
    "lokr": lambda hp, info: MethodPlan(
        LoKrConfig(
            r=hp["lora_r"],
            alpha=hp["lora_alpha"],
            target_modules=_modules_for(hp, info),
            task_type="CAUSAL_LM",
        )
    ),
    "llama_adapter": _llama_adapter,
}


def plan_for(hp: dict[str, Any], info: ModelInfo, *, task_type: str = "CAUSAL_LM") -> MethodPlan:
    """The plan of the job's method; `task_type` is PEFT's name of the model's head (SEQ_CLS: classifier)."""
    plan = METHODS[hp["peft"]](hp, info)
    if plan.peft_config is not None:
        # The config is built fresh for this call; PEFT reads task_type only when it wraps the model.
        plan.peft_config.task_type = task_type
    if plan.quantization is not None and task_type == "SEQ_CLS":
        # A new classification head starts random and trains: bitsandbytes cannot quantize weights the
        # checkpoint lacks (BERT's `classifier` would be a 4-bit layer holding float weights), so it stays
        # in full precision, as the output head of a causal LM does.
        plan.quantization.llm_int8_skip_modules = list(SEQ_CLS_HEAD_NAMES)
    return plan


def quantization_of(model: Any) -> dict[str, Any] | None:
    """How many of the model's layers bitsandbytes holds quantized, in how many bits; None if none.

    Counted from the weights themselves: a layer of a bitsandbytes class whose weight was never quantized
    (it was missing from the checkpoint) does not count.
    """
    layers = [
        module
        for module in model.modules()
        if (isinstance(module, Linear4bit) and getattr(module.weight, "quant_state", None) is not None)
        or (isinstance(module, Linear8bitLt) and module.weight.dtype == torch.int8)
    ]
    if not layers:
        return None
    first = layers[0]  # one quantization config per model: one kind of layer
    return {
        "bits": 4 if isinstance(first, Linear4bit) else 8,
        "quantized_modules": len(layers),
        "module_class": type(first).__name__,
    }


def freeze_all_but_top(model: Any, *, layers: int, train_head: bool) -> None:
    """Partial fine-tuning: only the top `layers` decoder blocks (and optionally the head) keep gradients."""
    blocks = next(
        (
            m
            for m in model.modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers
        ),
        None,
    )
    if blocks is None:
        raise ValueError("cannot find the model's stack of decoder blocks to unfreeze")
    if layers > len(blocks):
        raise ValueError(f"n_trainable_layers={layers} but the model has only {len(blocks)} blocks")
    for parameter in model.parameters():
        parameter.requires_grad = False
    for block in blocks[len(blocks) - layers :]:
        for parameter in block.parameters():
            parameter.requires_grad = True
    if train_head:
        for parameter in model.get_output_embeddings().parameters():
            parameter.requires_grad = True
