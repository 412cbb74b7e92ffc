"""The method registry: each entry turns resolved hyperparameters into a PEFT config (or none)."""

from collections.abc import Callable
from typing import Any

from peft import LoraConfig, PeftConfig

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def default_target_modules(linear_modules: list[str]) -> list[str] | str:
    """The attention projections the model has, else every linear layer."""
    present = [name for name in ATTENTION_PROJECTIONS if name in linear_modules]
    return present or "all-linear"


def lora(hp: dict[str, Any], linear_modules: list[str]) -> PeftConfig:
    return LoraConfig(
        r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        target_modules=hp["target_modules"] or default_target_modules(linear_modules),
        task_type="CAUSAL_LM",
    )


def full(hp: dict[str, Any], linear_modules: list[str]) -> None:
    return None


METHODS: dict[str, Callable[[dict[str, Any], list[str]], PeftConfig | None]] = {"lora": lora, "full": full}


def peft_config_for(hp: dict[str, Any], linear_modules: list[str]) -> PeftConfig | None:
    """The PEFT config of the job's method; None trains every weight."""
    return METHODS[hp["peft"]](hp, linear_modules)
