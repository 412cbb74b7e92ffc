"""The default fast path of training: no work on padding, and none on tokens without loss.

Every part is exact (the same loss and gradients as TRL's padded batches, to float rounding) and keeps
the batches the same examples in the same order; bench/training.py measures them. Padding-free batches
are supervised fine-tuning's; the LM head's changes serve every recipe on TRL's fused head (SFT, DPO).

- Padding-free batches (TRL's `padding_free`): the examples of a batch are laid end to end in one row,
  their positions restarting at 0. A padded batch computes every example at the length of its longest
  one. Attention runs on each example's own span (`packed_sdpa`), not on the whole row under a
  block-diagonal mask: that mask costs row length squared in time and, since SDPA keeps a float copy
  per layer for backward, in memory (120 MiB measured for 1024 tokens on SmolLM2-135M; by the same
  count, 1.9 GiB for 8 x 512).
  Only where `packs_exactly` shows the loaded model keeps packed examples apart; never for the methods
  that add virtual tokens to each example (they would be added once per row).
- Only the positions whose next token carries loss go through the LM head. TRL's fused head does that
  on CUDA, but on other devices it scores every position, prompt and padding included, to keep tile
  shapes fixed for compilers such as Neuron's. A CPU compiles nothing, and the head over a 49k-token
  vocabulary was a third of a LoRA step on SmolLM2-135M (a torch profile of bench/training.py's runs).
- On a CPU the fused head works through the vocabulary in narrower tiles. TRL's 32768-entry tiles are
  sized for a GPU kernel; on a CPU each tile's softmax makes several temporaries of tokens x 32768
  floats, which were the largest part of a LoRA run's peak on SmolLM2-135M (951 MiB of 2609 in a torch
  memory profile at 4 x 256 tokens; the peak fell from 3116 to 1957 MiB with 4096-entry tiles).
"""

import logging
from typing import Any

import torch

# The estimate plans memory by the same facts, so they are kept where it reads them.
from app.estimate.planner import CPU_FROZEN_HEAD_VOCAB as CPU_VOCAB_TILE
from app.estimate.planner import PER_EXAMPLE_PROMPTS, head_trains

log = logging.getLogger(__name__)


def score_only_trained_positions() -> bool:
    """Make TRL's fused LM head project only the positions that carry loss on every device.

    TRL decides it with one device test (`_use_triton`) in the module that defines the fused head; the
    chunked kernel itself keeps its own test, so on a CPU the tiles are still computed in torch.
    Returns False, changing nothing, where this TRL has no such test.
    """
    from trl.trainer import utils as trl_utils

    device_test = getattr(trl_utils, "_use_triton", None)
    if device_test is None:
        log.warning("this TRL has no fused-head device test; every position goes through the LM head")
        return False
    if getattr(device_test, "scores_only_trained_positions", False):
        return True

    def compact_everywhere(device: torch.device) -> bool:
        return True

    compact_everywhere.scores_only_trained_positions = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_everywhere
    return True


def narrow_cpu_vocab_tiles() -> bool:
    """Have TRL's fused LM head work through the vocabulary CPU_VOCAB_TILE entries at a time.

    The result is the same to float rounding: the tiles' log-sum-exp is combined across tiles either way.
    Call it only in a process that trains on a CPU (the setting is TRL's, for the whole process).
    Returns False, changing nothing, where this TRL has no such setting.
    """
    from trl.trainer import utils as trl_utils

    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        log.warning("this TRL has no fused-head tile setting; its default tiles are used")
        return False
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCAB_TILE
    return True


def tune_fused_lm_head(hp: dict[str, Any]) -> None:
    """The changes to TRL's fused LM head, for this training process.

    Narrow tiles only on a CPU, and only where the head is frozen: a full fine-tune of SmolLM2-135M took
    about twice as long a step with them (bench/training.py parity), so it keeps TRL's tiles.
    """
    score_only_trained_positions()
    if not torch.cuda.is_available() and not head_trains(hp["peft"], hp):
        narrow_cpu_vocab_tiles()


PACKED_SDPA = "tuneforge_packed_sdpa"


def example_spans(length: int, kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The (start, end) of each example in a packed row, from TRL's sequence starts or the positions."""
    starts = kwargs.get("cu_seq_lens_q")
    if starts is not None:
        bounds = [int(b) for b in starts.tolist()]
    else:
        positions = kwargs.get("position_ids")
        if positions is None or positions.shape[0] != 1:
            return None
        bounds = [int(b) for b in (positions[0] == 0).nonzero().flatten().tolist()] + [length]
    if len(bounds) < 3 or bounds[0] != 0 or bounds[-1] != length:  # one example: nothing to split
        return None
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def packed_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention, run on each example of a packed row by itself (causal, no mask).

    Anything else (a padded batch, one example) goes to SDPA as it is.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = example_spans(query.shape[2], kwargs) if query.shape[0] == 1 else None
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **kwargs
        )[0]
        for a, b in spans
    ]
    return torch.cat(outputs, dim=1), None  # (batch, tokens, heads, head_dim), as SDPA returns it


def use_packed_attention(model: Any) -> bool:
    """Switch an SDPA model to `packed_sdpa`; False (and nothing changed) for other attentions."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded batches (evaluation) keep their mask
    model.set_attn_implementation(PACKED_SDPA)
    return True


@torch.no_grad()
def packs_exactly(model: Any, vocab_size: int) -> bool:
    """Whether the model gives two examples laid end to end the outputs it gives each of them alone.

    Models whose attention ignores restarting positions would let the second example see the first.
    Two short sequences of ordinary token ids, in eval mode (no dropout); the model's mode is restored.
    """
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (1, n), generator=generator) for n in (5, 7))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # As in training: no cache (transformers looks for restarting positions only without one).
        alone = [model(input_ids=ids.to(device), use_cache=False).logits for ids in (first, second)]
        positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
        packed_ids = torch.cat([first, second], dim=1).to(device)
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    together = torch.cat(alone, dim=1)
    return bool(torch.allclose(packed.float(), together.float(), atol=1e-3, rtol=1e-3))


def use_padding_free(hp: dict[str, Any], model: Any) -> tuple[bool, str]:
    """Whether this run trains padding-free, and why, in words for the job's events."""
    if hp.get("packing"):
        return True, "Packing examples into rows of max_seq_length tokens (padding-free)."
    if not hp.get("padding_free", True):
        return False, "Padded batches: padding_free is off."
    if hp["peft"] in PER_EXAMPLE_PROMPTS:
        return False, f"Padded batches: {hp['peft']} adds its virtual tokens to each example."
    attention = model.config._attn_implementation
    packed_attention = use_packed_attention(model)
    if not packs_exactly(model, model.config.get_text_config().vocab_size):
        if packed_attention:
            model.set_attn_implementation(attention)
        return False, "Padded batches: this model's attention does not keep examples laid end to end apart."
    how = "attention per example" if packed_attention else f"{attention} attention under a packed mask"
    return True, f"Padding-free batches: each batch's examples laid end to end, no padding computed ({how})."


class LigerUnavailable(RuntimeError):
    """The job asks for Liger kernels and this worker cannot run them."""


def check_liger_runs_here(hp: dict[str, Any]) -> None:
    """Raise LigerUnavailable if the job asks for Liger's kernels and this worker lacks CUDA or the package.

    The API refuses them for a CPU deployment; a job that reaches a worker without them anyway fails rather
    than train without the kernels it asked for."""
    import importlib.util

    if not hp.get("liger_kernels"):
        return
    if not torch.cuda.is_available():
        raise LigerUnavailable("liger_kernels are Triton kernels for CUDA and this worker has no GPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise LigerUnavailable("liger_kernels: the liger-kernel package is not installed on this worker")
