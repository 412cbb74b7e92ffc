"""Exact parameter counts per fine-tuning method, in pure Python from a base model's profile.

The profile is what `worker/training/base_models.inspect_model` recorded at registration (a meta-device
build): every nn.Linear with its shape, every parameter's size, and the config's dimensions. Each formula
here mirrors what `worker/training/methods.py` builds with PEFT 0.21; tests/test_estimate.py builds every
method for real and checks the counts match to the parameter.
"""

from dataclasses import dataclass
from typing import Any

# The same defaults the worker's method registry uses (worker/training/methods.py).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
IA3_MODULES = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
LORA_LIKE = ("lora", "dora", "qlora", "lora_8bit")
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning", "llama_adapter")


class PlanError(ValueError):
    """A spec this model cannot take; `param` names the hyperparameter at fault."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the model as one method trains it."""

    trainable: int
    total: int  # every parameter of the wrapped model, quantized weights counted unpacked
    added: int  # parameters the method adds (adapters, prompts, a saved copy of the head)
    trainable_base: int  # base-model parameters that train (full, freeze, a new head)
    quantized: list[Linear]  # base Linear layers whose weight is stored in 4 or 8 bits


@dataclass(frozen=True)
class Shape:
    """The shapes one task's model has: a causal LM as registered, or its sequence-classification twin."""

    linears: list[Linear]
    parameters: dict[str, int]
    total: int
    head: str | None  # the output head's module name, never a default adapter target
    head_parameters: int
    block_prefix: str | None


def _linears(rows: list[list[Any]]) -> list[Linear]:
    return [Linear(str(n), int(i), int(o), bool(b)) for n, i, o, b in rows]


def model_shape(profile: dict[str, Any], *, task: str, num_labels: int | None) -> Shape:
    """The shapes of the model a task trains; classification swaps the LM head for a new `num_labels` head."""
    if task != "classification":
        return Shape(
            linears=_linears(profile["linears"]),
            parameters=profile["parameters"],
            total=profile["total_parameters"],
            head=profile.get("output_head"),
            head_parameters=profile.get("output_head_parameters", 0),
            block_prefix=profile.get("block_prefix"),
        )
    cls = profile.get("classification")
    if not cls:
        raise PlanError(
            f"{profile.get('architecture')} has no sequence-classification form in transformers.",
            param="model",
        )
    labels = num_labels or 2
    extra = (labels - cls["num_labels"]) * cls["parameters_per_label"]
    linears = _linears(cls["linears"])
    head = cls["head"]
    linears = [
        Linear(lin.name, lin.in_features, labels, lin.bias) if _is_label_layer(lin, head, cls) else lin
        for lin in linears
    ]
    return Shape(
        linears=linears,
        parameters=cls["parameters"],
        total=cls["total_parameters"] + extra,
        head=head,
        head_parameters=cls["head_parameters"] + extra,
        block_prefix=cls.get("block_prefix"),
    )


def _is_label_layer(lin: Linear, head: str, cls: dict[str, Any]) -> bool:
    inside = lin.name == head or lin.name.startswith(head + ".")
    return inside and lin.out_features == cls["num_labels"]


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT's rule: a target names the module exactly, or is a dotted suffix of its qualified name.
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(shape: Shape, modules: list[str] | str) -> list[Linear]:
    if modules == "all-linear":
        # PEFT's all-linear: every nn.Linear except the output head (LM head or classifier).
        return [
            lin
            for lin in shape.linears
            if not shape.head or not (lin.name == shape.head or lin.name.startswith(shape.head + "."))
        ]
    return [lin for lin in shape.linears if _matches(lin.name, list(modules))]


def linear_leaf_names(profile: dict[str, Any]) -> list[str]:
    return list(profile.get("linear_modules") or [])


def default_target_modules(linear_modules: list[str]) -> list[str] | str:
    """The attention projections the model has, else every linear layer (the worker trains with these too)."""
    present = [name for name in ATTENTION_PROJECTIONS if name in linear_modules]
    return present or "all-linear"


def lora_targets(profile: dict[str, Any], shape: Shape, hp: dict[str, Any]) -> list[Linear]:
    """The Linear layers a LoRA-family method adapts."""
    modules = hp.get("target_modules") or default_target_modules(linear_leaf_names(profile))
    targets = _targets(shape, modules)
    if not targets:
        raise PlanError(f"target_modules {modules} match no linear layer.", param="target_modules")
    return targets


def ia3_targets(profile: dict[str, Any], shape: Shape) -> list[tuple[Linear, bool]]:
    """IA3's layers and whether each is a feed-forward one (scaled on its input)."""
    leaves = linear_leaf_names(profile)
    modules: list[str] | str = [m for m in IA3_MODULES if m in leaves] or "all-linear"
    feedforward = [m for m in IA3_FEEDFORWARD if m in leaves]
    return [(lin, _matches(lin.name, feedforward)) for lin in _targets(shape, modules)]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT LoKr's split of a dimension into two factors near its square root (peft/tuners/lokr/layer.py)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_parameters(lin: Linear, r: int) -> int:
    """LoKr on one Linear: a full small Kronecker factor w1, and w2 full or rank-r when r is small."""
    in_m, in_n = factorization(lin.in_features)
    out_l, out_k = factorization(lin.out_features)
    w1 = out_l * in_m  # decompose_both is off: w1 is always a full matrix
    use_w2 = not (r < max(out_k, in_n) / 2)
    w2 = out_k * in_n if use_w2 else r * (out_k + in_n)
    return w1 + w2


def _adapter_parameters(peft: str, profile: dict[str, Any], shape: Shape, hp: dict[str, Any]) -> int:
    r = hp["lora_r"]
    if peft in LORA_LIKE or peft == "loha" or peft == "lokr":
        targets = lora_targets(profile, shape, hp)
        if peft == "loha":
            return sum(2 * r * (t.in_features + t.out_features) for t in targets)
        if peft == "lokr":
            return sum(lokr_parameters(t, r) for t in targets)
        magnitude = sum(t.out_features for t in targets) if peft == "dora" else 0
        return sum(r * (t.in_features + t.out_features) for t in targets) + magnitude
    if peft == "ia3":
        return sum(t.in_features if ff else t.out_features for t, ff in ia3_targets(profile, shape))
    tokens, hidden, layers = hp["num_virtual_tokens"], profile["hidden_size"], profile["num_layers"]
    if peft == "prompt_tuning":
        return tokens * hidden
    if peft == "p_tuning":
        # PromptEncoder: an embedding and a 3-layer MLP of width hidden (encoder_hidden_size defaults to it).
        return tokens * hidden + 3 * hidden * hidden + 3 * hidden
    if peft == "prefix_tuning":
        # One key and one value per layer and token; under grouped-query attention they have the KV width.
        kv_width = (
            profile.get("head_dim", hidden // profile["num_attention_heads"]) * profile["num_key_value_heads"]
        )
        return tokens * layers * 2 * kv_width
    if peft == "llama_adapter":
        return layers * (tokens * hidden + 1)  # a prompt and a zero-initialised gate per adapted layer
    raise PlanError(f"unknown method '{peft}'", param="peft")


def _block_parameters(shape: Shape, layers: int, num_layers: int) -> int:
    if not shape.block_prefix:
        raise PlanError("cannot find the model's stack of blocks to unfreeze", param="peft")
    if layers > num_layers:
        raise PlanError(
            f"n_trainable_layers={layers} but the model has only {num_layers} blocks.",
            param="n_trainable_layers",
        )
    top = tuple(f"{shape.block_prefix}.{i}." for i in range(num_layers - layers, num_layers))
    return sum(size for name, size in shape.parameters.items() if name.startswith(top))


def count_parameters(
    profile: dict[str, Any], hp: dict[str, Any], *, peft: str, task: str = "supervised", num_labels: int = 2
) -> Counts:
    """Trainable and total parameters of the base model trained with `peft` and hyperparameters `hp`."""
    shape = model_shape(profile, task=task, num_labels=num_labels)
    # A classification head is new: it trains whatever the method (PEFT keeps a trainable copy of it).
    new_head = shape.head_parameters if task == "classification" else 0
    if peft == "full":
        return Counts(shape.total, shape.total, 0, shape.total, [])
    if peft == "freeze":
        blocks = _block_parameters(shape, hp["n_trainable_layers"], profile["num_layers"])
        head = shape.head_parameters if hp["train_head"] or task == "classification" else 0
        return Counts(blocks + head, shape.total, 0, blocks + head, [])
    adapters = _adapter_parameters(peft, profile, shape, hp)
    quantized: list[Linear] = []
    if peft in ("qlora", "lora_8bit"):
        quantized = [lin for lin in shape.linears if lin.name != shape.head]
    # modules_to_save wraps the head: the original stays (frozen) and a trainable copy joins the model.
    return Counts(
        trainable=adapters + new_head,
        total=shape.total + adapters + new_head,
        added=adapters + new_head,
        trainable_base=0,
        quantized=quantized,
    )
