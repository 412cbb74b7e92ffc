"""Memory and time plans per fine-tuning method, in pure Python (the API never imports torch).

Every constant below is stated in ASSUMPTIONS, which the estimate returns as is. Device "cuda" is what the
worker does on a GPU (bf16 weights, mixed-precision AdamW, gradient checkpointing); "cpu" is what it does
without one (fp32 everywhere, no checkpointing unless the job's `gradient_checkpointing` asks for it).
The activation coefficients were fitted to the tensors autograd saves in a transformers 5 Llama forward
(SDPA attention, which keeps no seq x seq matrix).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from app.estimate.counts import (
    LORA_LIKE,
    Counts,
    Linear,
    Shape,
    count_parameters,
    factorization,
    ia3_targets,
    lora_targets,
    model_shape,
)

Device = Literal["cuda", "cpu"]

# Bytes per parameter.
HALF, FP32 = 2, 4
# NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 of those absmaxes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1  # LLM.int8: a byte per weight, plus one fp32 scale per output row
ADAM_STATES = 8  # AdamW's m and v, fp32 (also bitsandbytes' 32-bit AdamW, paged or not)
# bitsandbytes' 8-bit AdamW: m and v in a byte each, with an fp32 absmax per block of 256 values of each;
# tensors smaller than 4096 values keep 32-bit states, and so do nn.Embedding weights under transformers'
# Trainer (it registers them with bitsandbytes for 32-bit states).
BNB_8BIT_STATES, BNB_BLOCK, BNB_MIN_8BIT_SIZE = 2, 256, 4096
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
ADAFACTOR_MOMENT = 4  # transformers' Adafactor: fp32 second moments, factored for matrices; no first moment
MASTER_COPY = 4  # mixed precision keeps an fp32 copy of every trainable 16-bit weight
BYTES_PER_TOKEN = 4  # training text: about 4 bytes of UTF-8 per token
# TRL's fused LM head scores tokens in tiles of this many tokens x vocabulary entries (trl/kernels).
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768
PEAK_FLOPS = {"cuda": 312e12, "cpu": 2e11}
UTILIZATION = {"cuda": 0.4, "cpu": 0.3}
# Methods trained on the model's own loss (full logits), like the worker's ModelLossTrainer.
MODEL_LOSS = ("llama_adapter",)
AUTO_ORDER = ("full", "lora", "qlora")
# The fused head's temporaries, in vocabulary tiles: TRL's tile, and the narrower one the worker uses on a
# CPU when the head is frozen (worker/training/fast_path.py reads it here); about 8 tile-sized buffers live
# at once (logits, softmax, log-probabilities and their gradients), measured with torch's profiler on
# SmolLM2-135M.
CPU_FROZEN_HEAD_VOCAB, LIVE_HEAD_TILES = 4096, 8
# What glibc's heap keeps on a CPU beside the live tensors: each step frees its activations, and the next
# step's land partly in fresh pages. A torch memory profile put a LoRA run's tensors' peak within 1% of the
# plan while the resident peak ran 0.57 to 0.59 x the activations above it (SmolLM2-135M and a 25M Llama,
# LoRA and QLoRA); with MALLOC_TRIM_THRESHOLD_=0 the gap closed at 1.6x the step time. Gradients and
# optimizer states, allocated as the activations are freed, take that memory first.
CPU_HEAP_RETAINED = 0.58
# Methods that prepend learned tokens or states to every example: a packed row would be one "example" to
# them, so the worker pads their batches (fast_path.py reads this).
PER_EXAMPLE_PROMPTS = ("prefix_tuning", "prompt_tuning", "p_tuning", "llama_adapter")

ASSUMPTIONS: list[dict[str, str]] = [
    {
        "name": "weights",
        "value": "cuda: 2 bytes/param (bf16); cpu: 4 (fp32); NF4+double quant: 0.516 bytes/param; int8: 1 + "
        "4/in_features; adapters and prompts: 4 (fp32)",
        "why": "The worker loads the base in bf16 on a GPU and fp32 on a CPU; PEFT keeps adapter weights in "
        "fp32; QLoRA/8-bit quantize every Linear but the head, and prepare_model_for_kbit_training "
        "upcasts the rest to fp32.",
    },
    {
        "name": "gradients",
        "value": "one per trainable parameter, in its weight's dtype",
        "why": "Frozen parameters get no gradient.",
    },
    {
        "name": "optimizer_states",
        "value": "per trainable parameter, by the job's optimizer: adamw and paged_adamw_32bit 8 bytes (m "
        "and v, fp32); adamw_8bit and paged_adamw_8bit 2 + 8/256 (m and v a byte each, an fp32 absmax per "
        "256-value block of each) in tensors of 4096+ values, 8 in smaller tensors and embedding tables; "
        "adafactor 4 x (rows + columns) per matrix and 4 per value of a 1-D tensor; + 4 (fp32 master copy) "
        "per trainable 16-bit base weight on cuda, whatever the optimizer",
        "why": "The field's mixed-precision accounting: full fine-tuning with AdamW costs 16 bytes/param "
        "(2+2+4+8); torch's AdamW on a bf16-loaded model keeps bf16 states, so the real figure is lower. "
        "bitsandbytes keeps tensors under 4096 values in 32-bit states, and transformers' Trainer has it "
        "keep nn.Embedding weights (prompt and prefix tables too) in 32 bits. Paged states take the same "
        "bytes: CUDA moves them to host memory only when the GPU runs short. transformers' Adafactor, as "
        "the Trainer builds it (beta1 None), keeps no first moment and factors the second moment of each "
        "matrix into a row and a column vector. Left out: per-tensor step and RMS scalars, and "
        "bitsandbytes' two 256-entry quantization maps (2 KiB).",
    },
    {
        "name": "activations",
        "value": "per token and layer: trainable block 9h + 2kv + 4i values, frozen block 4h + 2kv + 3i, "
        "blocks below the first trainable one 0; batches attended under a mask (all but padding-free "
        "supervised ones) add max_seq_length, and 2h - 2kv in frozen blocks; LoRA adds r per adapted "
        "Linear and each distinct input it reads (q/k/v share one, gate/up one), or with dropout 2*in + r "
        "per adapted Linear; DoRA also 2*out, "
        "IA3 its vector's size; with gradient_checkpointing (auto: on cuda only) each block's input is "
        "kept and one block recomputed at a time; the LM head: fused tiles of min(tokens, 4096) x "
        "min(vocab, tile) (8 live on cpu, with 4096-entry tiles where the head is frozen; 1 of 32768 "
        "entries on cuda) plus its input, or full logits (tokens x vocab x (dtype + 8 bytes)) for "
        "llama_adapter",
        "why": "h hidden, kv key/value width, i MLP width, r LoRA rank; counted with autograd's saved-tensor "
        "hooks in Llama blocks of two shapes and torch's profiler for the head, at batch_size x "
        "max_seq_length tokens (prompt tuning adds its virtual tokens).",
    },
    {
        "name": "cpu_heap",
        "value": "cpu: + 0.58 x (activations - gradients - optimizer states), when positive",
        "why": "glibc keeps the activations one step frees and the next step's land partly in fresh pages: "
        "a LoRA run's resident peak ran 0.57-0.59 x the activations above the tensors' peak (which matched "
        "the plan within 1%). Gradients and optimizer states, allocated as activations are freed, reuse it.",
    },
    {
        "name": "time",
        "value": "6 x params x tokens FLOPs for full (4 x params + 2 x trainable for frozen-base methods, "
        "+2 x params with checkpointing) at 312 TFLOP/s x 40% on cuda (an A100 in bf16) or "
        "200 GFLOP/s x 30% on cpu; tokens = min(file bytes / 4, examples x max_seq_length) x n_epochs",
        "why": "Kaplan et al.'s 6N rule; attention FLOPs are left out. Scale by your device's throughput.",
    },
    {
        "name": "fits",
        "value": "total <= gpu_memory_gb x 2^30 bytes",
        "why": "Leaves out the CUDA context (~0.5 GB) and allocator fragmentation: keep 10-20% headroom.",
    },
]


@dataclass(frozen=True)
class Plan:
    """One method's parameter counts, bytes and FLOPs per token."""

    peft: str
    counts: Counts
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    flops_per_token: float

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations


# Methods a multi-device job shards with FSDP (weights, gradients and optimizer states split across the
# devices); the adapter methods replicate the frozen base on each device and train it with DDP.
SHARDED_METHODS = frozenset({"full", "freeze"})


def per_device(plan: Plan, gpus: int, device: Device) -> dict[str, int]:
    """The plan's bytes on each of `gpus` devices: FSDP (full and freeze, on GPUs: accelerate has no FSDP
    for CPU ranks) divides the model's state, never the activations (each device holds its own
    micro-batch); DDP keeps a whole copy on each."""
    parts = {
        "weights": plan.weights,
        "gradients": plan.gradients,
        "optimizer_states": plan.optimizer_states,
    }
    if plan.peft in SHARDED_METHODS and gpus > 1 and device == "cuda":
        parts = {name: math.ceil(value / gpus) for name, value in parts.items()}
    parts["activations"] = plan.activations
    return parts | {"total": sum(parts.values())}


def per_device_bytes(plan: Plan, gpus: int, device: Device) -> int:
    return per_device(plan, gpus, device)["total"]


def _weight_bytes(counts: Counts, peft: str, device: Device) -> int:
    quantized = sum(lin.in_features * lin.out_features for lin in counts.quantized)
    if peft == "qlora":
        packed = quantized * NF4_BYTES
    else:
        packed = sum(lin.in_features * lin.out_features + 4 * lin.out_features for lin in counts.quantized)
    dense_bytes = HALF if device == "cuda" and not counts.quantized else FP32
    base = counts.total - counts.added - quantized
    return int(base * dense_bytes + packed + counts.added * FP32)


def head_trains(peft: str, hp: dict[str, Any]) -> bool:
    """Whether the run trains the output head's weights (full fine-tuning, freeze with train_head)."""
    return peft == "full" or (peft == "freeze" and hp.get("train_head", True))


def block_values(h: int, kv: int, inner: int, *, seq: int, trains: bool, per_example: bool) -> int:
    """Values autograd keeps per token in one Llama block (tests/test_estimate.py counts them with
    saved-tensor hooks). Frozen weights: the norms' inputs, rotated q and k, v, the attention output and
    the MLP's three intermediates (4h + 2kv + 3i). Trainable weights keep each Linear's input too
    (9h + 2kv + 4i). A batch attended under a mask (padded) keeps the mask's row of seq values, and a frozen
    block also the keys and values repeated to every head (+2h - 2kv); padding-free batches attend each
    example on its own (worker/training/fast_path.py)."""
    if trains:
        return 9 * h + 2 * kv + 4 * inner + (0 if per_example else seq)
    return 4 * h + 2 * kv + 3 * inner + (0 if per_example else 2 * h - 2 * kv + seq)


# Linear layers that read the same input: an adapter on each keeps that input once.
SHARED_INPUTS = {
    "q_proj": "attention",
    "k_proj": "attention",
    "v_proj": "attention",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}


def lora_values(targets: list[Linear], *, r: int, dropout: bool) -> int:
    """Values LoRA adds per token over the whole model (counted like block_values): each adapter keeps its
    rank-r intermediate, and its input for its own gradient, once per input that several adapters read;
    with dropout each adapter keeps its dropped input and the mask instead (2 x in)."""
    if dropout:
        return sum(2 * t.in_features + r for t in targets)
    inputs = {}
    for t in targets:
        parent, _, leaf = t.name.rpartition(".")
        inputs[(parent, SHARED_INPUTS.get(leaf, leaf))] = t.in_features
    return sum(inputs.values()) + r * len(targets)


def checkpoints_blocks(hp: dict[str, Any], device: Device) -> bool:
    """Whether the worker checkpoints each block: the job's `gradient_checkpointing`, `auto` on a GPU only."""
    chosen = hp.get("gradient_checkpointing", "auto")
    return device == "cuda" if chosen == "auto" else bool(chosen)


def _activation_bytes(
    profile: dict[str, Any], hp: dict[str, Any], counts: Counts, *, peft: str, task: str, device: Device
) -> int:
    act = HALF if device == "cuda" else FP32
    h, layers = profile["hidden_size"], profile["num_layers"]
    kv = profile.get("head_dim", h // profile["num_attention_heads"]) * profile["num_key_value_heads"]
    inner = profile.get("intermediate_size") or 4 * h
    seq = hp["max_seq_length"] + (hp["num_virtual_tokens"] if peft in ("prompt_tuning", "p_tuning") else 0)
    tokens = hp["batch_size"] * seq
    per_example = task == "supervised" and hp.get("padding_free", True) and not hp.get("packing", False)
    per_example = per_example and peft not in PER_EXAMPLE_PROMPTS
    trainable_block = float(block_values(h, kv, inner, seq=seq, trains=True, per_example=per_example))
    frozen_block = float(block_values(h, kv, inner, seq=seq, trains=False, per_example=per_example))
    blocks: list[float]
    if peft == "full":
        blocks = [trainable_block] * layers
    elif peft == "freeze":
        top = hp["n_trainable_layers"]
        blocks = [0.0] * (layers - top) + [trainable_block] * top  # nothing below needs a gradient
    else:
        blocks = [frozen_block] * layers
    extra = 0.0  # per token, over all layers; spread evenly over the blocks that hold activations
    shape = model_shape(profile, task=task, num_labels=hp.get("num_labels") or 2)
    if peft in LORA_LIKE:
        targets = lora_targets(profile, shape, hp)
        extra = lora_values(targets, r=hp["lora_r"], dropout=hp.get("lora_dropout", 0) > 0)
        if peft == "dora":
            extra += sum(2 * t.out_features for t in targets)
    elif peft == "ia3":
        extra = sum(t.in_features if ff else t.out_features for t, ff in ia3_targets(profile, shape))
    elif peft == "llama_adapter":
        extra = layers * (2 * profile["num_attention_heads"] * hp["num_virtual_tokens"] + 2 * h)
    active = sum(1 for b in blocks if b)
    blocks = [b + extra / active if b else 0 for b in blocks]
    if checkpoints_blocks(hp, device):
        kept = h * active + max(blocks)  # each block's input, and one block recomputed at a time
    else:
        kept = sum(blocks)
    body = tokens * (kept + 2 * h) * act  # + the embedding output and final norm
    vocab = profile["vocab_size"]
    if task == "classification":
        head = tokens * h * act
    elif peft in MODEL_LOSS:
        head = int(tokens * vocab * (act + 8))
    elif device == "cpu":
        tile = FUSED_VOCAB if head_trains(peft, hp) else CPU_FROZEN_HEAD_VOCAB
        head = (LIVE_HEAD_TILES * min(tokens, FUSED_TOKENS) * min(vocab, tile) + tokens * h) * act
    else:
        head = (min(tokens, FUSED_TOKENS) * min(vocab, FUSED_VOCAB) + tokens * h) * act
    return int(body + head)


def plan_method(
    profile: dict[str, Any],
    hp: dict[str, Any],
    *,
    peft: str,
    device: Device,
    task: str = "supervised",
    num_labels: int = 2,
) -> Plan:
    """Counts, memory and FLOPs per token of one method on this model, with these hyperparameters."""
    counts = count_parameters(profile, hp, peft=peft, task=task, num_labels=num_labels)
    trainable_added = counts.trainable - counts.trainable_base
    # Base weights that train stay in the base's dtype; on cuda mixed precision adds an fp32 master copy.
    base_grad = HALF if device == "cuda" else FP32
    gradients = counts.trainable_base * base_grad + trainable_added * FP32
    tensors = trainable_tensors(profile, hp, counts, peft=peft, task=task, num_labels=num_labels)
    optimizer = optimizer_state_bytes(tensors, hp.get("optimizer", "adamw")) + (
        counts.trainable_base * MASTER_COPY if device == "cuda" else 0
    )
    activations = _activation_bytes(
        profile, hp | {"num_labels": num_labels}, counts, peft=peft, task=task, device=device
    )
    if device == "cpu":  # what glibc keeps of them, where gradients and optimizer states do not take it
        activations += int(CPU_HEAP_RETAINED * max(0, activations - gradients - optimizer))
    base = counts.total - counts.added
    flops = 6 * base if peft == "full" else 4 * base + 2 * counts.trainable
    if checkpoints_blocks(hp, device):
        flops += 2 * base  # gradient checkpointing runs each block's forward twice
    return Plan(
        peft=peft,
        counts=counts,
        weights=_weight_bytes(counts, peft, device),
        gradients=gradients,
        optimizer_states=optimizer,
        activations=activations,
        flops_per_token=float(flops),
    )


@dataclass(frozen=True)
class TrainableTensor:
    """A tensor the optimizer updates, by shape; `keeps_32bit`: bitsandbytes keeps 32-bit states for it."""

    shape: tuple[int, ...]
    keeps_32bit: bool = False  # an nn.Embedding weight (transformers' Trainer registers those)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def optimizer_state_bytes(tensors: list[TrainableTensor], optimizer: str) -> int:
    """Bytes of state `optimizer` keeps for these tensors (ASSUMPTIONS, optimizer_states)."""
    return sum(_state_bytes(tensor, optimizer) for tensor in tensors)


def _state_bytes(tensor: TrainableTensor, optimizer: str) -> int:
    if optimizer == "adafactor":
        if len(tensor.shape) < 2:
            return ADAFACTOR_MOMENT * tensor.size
        rows = math.prod(tensor.shape[:-1])  # one entry per row, and one per column of the last two dims
        columns = math.prod(tensor.shape[:-2]) * tensor.shape[-1]
        return ADAFACTOR_MOMENT * (rows + columns)
    if optimizer in EIGHT_BIT_OPTIMIZERS and not tensor.keeps_32bit and tensor.size >= BNB_MIN_8BIT_SIZE:
        return BNB_8BIT_STATES * tensor.size + 2 * FP32 * math.ceil(tensor.size / BNB_BLOCK)
    return ADAM_STATES * tensor.size


def trainable_tensors(
    profile: dict[str, Any], hp: dict[str, Any], counts: Counts, *, peft: str, task: str, num_labels: int
) -> list[TrainableTensor]:
    """The tensors `peft` trains, shaped as the worker's build shapes them.

    Parameters the profile cannot shape are planned as one 1-D tensor in 32-bit states, the most any of
    the optimizers keeps for them, so that the sizes always add up to `counts.trainable`.
    """
    shape = model_shape(profile, task=task, num_labels=num_labels)
    if peft == "full":
        tensors = _base_tensors(profile, shape, lambda name: True)
    elif peft == "freeze":
        layers = profile["num_layers"]
        top = tuple(f"{shape.block_prefix}.{i}." for i in range(layers - hp["n_trainable_layers"], layers))
        tensors = _base_tensors(profile, shape, lambda name: name.startswith(top))
        if hp["train_head"] or task == "classification":
            tensors += _head_tensors(shape)
    else:
        tensors = _adapter_tensors(peft, profile, shape, hp)
        if task == "classification":
            tensors += _head_tensors(shape)  # the new head trains too, as a saved copy
    unshaped = counts.trainable - sum(t.size for t in tensors)
    if unshaped < 0:
        return [TrainableTensor((counts.trainable,), keeps_32bit=True)]
    return tensors + ([TrainableTensor((unshaped,), keeps_32bit=True)] if unshaped else [])


def _base_tensors(
    profile: dict[str, Any], shape: Shape, wanted: Callable[[str], bool]
) -> list[TrainableTensor]:
    """The model's own parameters that `wanted` names: Linear weights by their shape; of the others, those
    a multiple of the hidden size are embedding tables, the rest vectors (norms)."""
    hidden = profile["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{lin.name}.weight": (lin.out_features, lin.in_features) for lin in shape.linears
    }
    shapes |= {f"{lin.name}.bias": (lin.out_features,) for lin in shape.linears if lin.bias}
    tensors = []
    for name, size in shape.parameters.items():
        if not wanted(name):
            continue
        if name in shapes:
            tensors.append(TrainableTensor(shapes[name]))
        elif size > hidden and size % hidden == 0:
            tensors.append(TrainableTensor((size // hidden, hidden), keeps_32bit=True))
        else:
            tensors.append(TrainableTensor((size,)))
    return tensors


def _head_tensors(shape: Shape) -> list[TrainableTensor]:
    """The output head's weights; a head tied to the input embedding trains as that embedding table."""
    tensors = []
    for lin in shape.linears:
        if shape.head and (lin.name == shape.head or lin.name.startswith(shape.head + ".")):
            tied = f"{lin.name}.weight" not in shape.parameters
            tensors.append(TrainableTensor((lin.out_features, lin.in_features), keeps_32bit=tied))
            tensors += [TrainableTensor((lin.out_features,))] if lin.bias else []
    return tensors


def _adapter_tensors(
    peft: str, profile: dict[str, Any], shape: Shape, hp: dict[str, Any]
) -> list[TrainableTensor]:
    """The tensors a PEFT method adds, shaped as PEFT 0.21 builds them (counts.py counts the same ones)."""
    r, tokens, hidden = hp["lora_r"], hp["num_virtual_tokens"], profile["hidden_size"]
    tensors: list[tuple[int, ...]] = []
    if peft in LORA_LIKE or peft in ("loha", "lokr"):
        for t in lora_targets(profile, shape, hp):
            if peft == "lokr":
                (out_l, out_k), (in_m, in_n) = factorization(t.out_features), factorization(t.in_features)
                full_w2 = not r < max(out_k, in_n) / 2
                tensors += [(out_l, in_m)] + ([(out_k, in_n)] if full_w2 else [(out_k, r), (r, in_n)])
            else:
                pairs = 2 if peft == "loha" else 1  # LoHa: two low-rank pairs, Hadamard-multiplied
                tensors += [(r, t.in_features), (t.out_features, r)] * pairs
                tensors += [(t.out_features,)] if peft == "dora" else []  # DoRA's magnitude vector
    elif peft == "ia3":
        tensors = [(1, t.in_features) if ff else (t.out_features, 1) for t, ff in ia3_targets(profile, shape)]
    elif peft == "p_tuning":  # the prompt table and a three-layer MLP with biases
        return [TrainableTensor((tokens, hidden), keeps_32bit=True)] + [
            TrainableTensor(s) for s in [(hidden, hidden), (hidden,)] * 3
        ]
    elif peft in ("prompt_tuning", "prefix_tuning"):  # one embedding table of virtual tokens
        heads = profile["num_attention_heads"]
        kv = profile.get("head_dim", hidden // heads) * profile["num_key_value_heads"]
        width = hidden if peft == "prompt_tuning" else profile["num_layers"] * 2 * kv
        return [TrainableTensor((tokens, width), keeps_32bit=True)]
    elif peft == "llama_adapter":  # a (1, tokens, hidden) prompt and a 1-value gate per layer
        tensors = [(1, tokens, hidden), (1,)] * profile["num_layers"]
    return [TrainableTensor(s) for s in tensors]


def training_tokens(*, file_bytes: int, examples: int, max_seq_length: int, n_epochs: int) -> int:
    """Tokens one run trains on: the file's size in tokens, each example capped at max_seq_length."""
    return min(file_bytes // BYTES_PER_TOKEN, examples * max_seq_length) * n_epochs


def estimated_seconds(plan: Plan, *, tokens: int, device: Device) -> float:
    """Seconds of training at the assumed throughput of the device."""
    return float(f"{plan.flops_per_token * tokens / (PEAK_FLOPS[device] * UTILIZATION[device]):.3g}")


def choose_auto(needs: dict[str, int], budget_bytes: int) -> tuple[str, str]:
    """`peft: auto`: the first of full, LoRA, QLoRA whose plan fits the budget, and why, in words.

    `needs` maps each candidate to its planned bytes; a model without Linear layers has no qlora entry.
    When none fits, the smallest candidate (QLoRA where offered) is chosen anyway, and the reason says so.
    """
    order = [m for m in AUTO_ORDER if m in needs]
    budget = f"the {budget_bytes / 2**30:.2f} GB budget"
    for i, method in enumerate(order):
        if needs[method] <= budget_bytes:
            skipped = [f"{m} needs {needs[m] / 2**30:.2f} GB" for m in order[:i]]
            why = f", more than {budget}" if skipped else f", within {budget}"
            head = "; ".join(skipped) if skipped else f"{method} needs {needs[method] / 2**30:.2f} GB"
            tail = f"; {method} needs {needs[method] / 2**30:.2f} GB" if skipped else ""
            return method, f"auto chose {method}: {head}{why}{tail}"
    chosen = order[-1]
    listed = ", ".join(f"{m} needs {needs[m] / 2**30:.2f} GB" for m in order)
    return chosen, f"auto chose {chosen} though nothing fits {budget}: {listed}; it may run out of memory"
