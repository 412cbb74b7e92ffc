"""Memory and time plans per fine-tuning method, in pure Python (the API never imports torch).

Every constant below is stated in ASSUMPTIONS, which the estimate returns as is. Device "cuda" is what the
worker does on a GPU (bf16 weights, mixed-precision AdamW, gradient checkpointing); "cpu" is what it does
without one (fp32 everywhere, no checkpointing). The activation coefficients were fitted to the tensors
autograd saves in a transformers 5 Llama forward (SDPA attention, which keeps no seq x seq matrix).
"""

from dataclasses import dataclass
from typing import Any, Literal

from app.estimate.counts import LORA_LIKE, Counts, count_parameters, ia3_targets, lora_targets, model_shape

Device = Literal["cuda", "cpu"]

# Bytes per parameter.
HALF, FP32 = 2, 4
# NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 of those absmaxes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1  # LLM.int8: a byte per weight, plus one fp32 scale per output row
ADAM_STATES = 8  # AdamW's m and v, fp32
MASTER_COPY = 4  # mixed precision keeps an fp32 copy of every trainable 16-bit weight
BYTES_PER_TOKEN = 4  # training text: about 4 bytes of UTF-8 per token
# TRL's fused LM head scores tokens in tiles of this many tokens x vocabulary entries (trl/kernels).
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768
PEAK_FLOPS = {"cuda": 312e12, "cpu": 2e11}
UTILIZATION = {"cuda": 0.4, "cpu": 0.3}
# Methods trained on the model's own loss (full logits), like the worker's ModelLossTrainer.
MODEL_LOSS = ("llama_adapter",)
AUTO_ORDER = ("full", "lora", "qlora")
# On a CPU, glibc's heap keeps the activation memory freed by one step's backward fragmented, and the next
# step's activations land partly in fresh pages: measured peaks run about 1.5x the saved activations.
CPU_HEAP_SLACK = 0.5

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
        "value": "AdamW m and v: 8 bytes per trainable parameter; + 4 (fp32 master copy) per "
        "trainable 16-bit base weight on cuda",
        "why": "The field's mixed-precision accounting: full fine-tuning costs 16 bytes/param (2+2+4+8). "
        "torch's AdamW on a bf16-loaded model keeps its states in bf16, so the real figure is lower: "
        "this errs on the safe side.",
    },
    {
        "name": "activations",
        "value": "per token and layer: trainable block 8h + 3kv + 4i values, frozen block 4h + 3kv + 3i, "
        "blocks below the first trainable one 0; LoRA with dropout adds 1.5*in + 2r per adapted Linear, "
        "DoRA also 2*out, IA3 its vector's size; cuda checkpoints each block (its input kept, one block "
        "recomputed at a time); the LM head: a fused tile of min(tokens, 4096) x min(vocab, 32768) plus "
        "its input, or full logits (tokens x vocab x (dtype + 8 bytes)) for llama_adapter",
        "why": "h hidden, kv key/value width, i MLP width, r LoRA rank; fitted to what autograd saves in a "
        "Llama forward, at batch_size x max_seq_length tokens (prompt tuning adds its virtual tokens).",
    },
    {
        "name": "cpu_heap",
        "value": "cpu: activations x 1.5",
        "why": "glibc's heap leaves the memory one step's backward frees fragmented; the next step's "
        "activations land partly in fresh pages (measured on 3-step runs of a 25M-parameter Llama).",
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


def _weight_bytes(counts: Counts, peft: str, device: Device) -> int:
    quantized = sum(lin.in_features * lin.out_features for lin in counts.quantized)
    if peft == "qlora":
        packed = quantized * NF4_BYTES
    else:
        packed = sum(lin.in_features * lin.out_features + 4 * lin.out_features for lin in counts.quantized)
    dense_bytes = HALF if device == "cuda" and not counts.quantized else FP32
    base = counts.total - counts.added - quantized
    return int(base * dense_bytes + packed + counts.added * FP32)


def _activation_bytes(
    profile: dict[str, Any], hp: dict[str, Any], counts: Counts, *, peft: str, task: str, device: Device
) -> int:
    act = HALF if device == "cuda" else FP32
    h, layers = profile["hidden_size"], profile["num_layers"]
    kv = profile.get("head_dim", h // profile["num_attention_heads"]) * profile["num_key_value_heads"]
    inner = profile.get("intermediate_size") or 4 * h
    seq = hp["max_seq_length"] + (hp["num_virtual_tokens"] if peft in ("prompt_tuning", "p_tuning") else 0)
    tokens = hp["batch_size"] * seq
    trainable_block, frozen_block = 8 * h + 3 * kv + 4 * inner, 4 * h + 3 * kv + 3 * inner
    if peft == "full":
        blocks = [trainable_block] * layers
    elif peft == "freeze":
        top = hp["n_trainable_layers"]
        blocks = [0] * (layers - top) + [trainable_block] * top  # nothing below needs a gradient
    else:
        blocks = [frozen_block] * layers
    extra = 0.0  # per token, over all layers; spread evenly over the blocks that hold activations
    shape = model_shape(profile, task=task, num_labels=hp.get("num_labels") or 2)
    if peft in LORA_LIKE:
        targets = lora_targets(profile, shape, hp)
        dropout = hp.get("lora_dropout", 0) > 0
        extra = sum((1.5 * t.in_features if dropout else 0) + 2 * hp["lora_r"] for t in targets)
        if peft == "dora":
            extra += sum(2 * t.out_features for t in targets)
    elif peft == "ia3":
        extra = sum(t.in_features if ff else t.out_features for t, ff in ia3_targets(profile, shape))
    elif peft == "llama_adapter":
        extra = layers * (2 * profile["num_attention_heads"] * hp["num_virtual_tokens"] + 2 * h)
    active = sum(1 for b in blocks if b)
    blocks = [b + extra / active if b else 0 for b in blocks]
    if device == "cuda":
        kept = h * active + max(blocks)  # each block's input, and one block recomputed at a time
    else:
        kept = sum(blocks)
    body = tokens * (kept + 2 * h) * act  # + the embedding output and final norm
    vocab = profile["vocab_size"]
    if task == "classification":
        head = tokens * h * act
    elif peft in MODEL_LOSS:
        head = int(tokens * vocab * (act + 8))
    else:
        head = (min(tokens, FUSED_TOKENS) * min(vocab, FUSED_VOCAB) + tokens * h) * act
    slack = 1 + CPU_HEAP_SLACK if device == "cpu" else 1
    return int((body + head) * slack)


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
    optimizer = counts.trainable * ADAM_STATES + (
        counts.trainable_base * MASTER_COPY if device == "cuda" else 0
    )
    activations = _activation_bytes(
        profile, hp | {"num_labels": num_labels}, counts, peft=peft, task=task, device=device
    )
    base = counts.total - counts.added
    flops = 6 * base if peft == "full" else 4 * base + 2 * counts.trainable
    if device == "cuda":
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
