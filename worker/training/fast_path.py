"""Supervised fine-tuning's default fast path: no work on padding, and none on tokens without loss.

Both parts are exact (the same loss and gradients as TRL's padded batches, to float rounding) and keep
the batches the same examples in the same order; bench/training.py measures them.

- Padding-free batches (TRL's `padding_free`): the examples of a batch are laid end to end in one row,
  their positions restarting at 0, and transformers' attention masks each example off from the others
  by those positions. A padded batch computes every example at the length of its longest one. Only
  where `packs_exactly` shows the loaded model keeps packed examples apart; never for the methods that
  add virtual tokens to each example (they would be added once per row).
- Only the positions whose next token carries loss go through the LM head. TRL's fused head does that
  on CUDA, but on other devices it scores every position, prompt and padding included, to keep tile
  shapes fixed for compilers such as Neuron's. A CPU compiles nothing, and the head over a 49k-token
  vocabulary was a third of a LoRA step on SmolLM2-135M (a torch profile of bench/training.py's runs).
"""

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Methods that prepend learned tokens or states to every example: a packed row is one "example" to them.
PER_EXAMPLE_PROMPTS = ("prefix_tuning", "prompt_tuning", "p_tuning", "llama_adapter")


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
    if not packs_exactly(model, model.config.get_text_config().vocab_size):
        return False, "Padded batches: this model's attention does not keep examples laid end to end apart."
    return True, "Padding-free batches: each batch's examples laid end to end, no padding computed."
