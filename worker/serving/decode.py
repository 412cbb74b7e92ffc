"""The decode loop: one left-padded batch of prompts where every row may use its own LoRA adapter.

Rows carry their own sampling settings (greedy at temperature 0, else temperature + top-p drawn from a
per-row ``torch.Generator`` seeded by the request), their own token budget and stop strings, and finish
independently: a finished row is dropped from the batch and from the KV cache, so it costs nothing more.
``decode`` yields after every step the text each row added, so the server can stream it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch's `adapter_names`


@dataclass
class Row:
    """One request as the decode loop sees it."""

    prompt_ids: list[int]
    max_tokens: int
    adapter: str = BASE_ADAPTER
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Set from another thread when the client went away; the row leaves the batch at the next step.
    cancelled: bool = False


@dataclass(frozen=True)
class Step:
    """What one row produced in one decode step."""

    row: int
    text: str  # new text since the previous step (may be empty while a stop string could be forming)
    completion_tokens: int  # tokens generated so far, the end-of-sequence token included
    finish_reason: str | None  # "stop", "length", "cancelled", or None while the row goes on


class _RowState:
    """A row's progress: its tokens, how much of their text went out, and its random generator."""

    def __init__(self, row: Row, device: torch.device) -> None:
        self.row = row
        self.tokens: list[int] = []
        self.emitted = 0
        self.generator: torch.Generator | None = None
        if row.temperature > 0:
            self.generator = torch.Generator(device=device)
            if row.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(row.seed)

    def advance(self, token: int, tokenizer: Any, eos_ids: set[int]) -> tuple[str, str | None]:
        """Take one sampled token; return the text that may go out now and the finish reason, if any."""
        finish = None
        if token in eos_ids:
            finish = "stop"
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(text, self.row.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and len(self.tokens) >= self.row.max_tokens:
            finish = "length"
        upto = len(text) if finish else len(text) - _held_back(text, self.row.stop)
        delta = text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta, finish


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters must wait: an unfinished UTF-8 sequence or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p; the first token always stays, so top_p=0
        # (allowed by OpenAI) keeps just the most likely token
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@contextmanager
def _routed(model: Any, adapters: list[str] | None) -> Iterator[dict[str, Any]]:
    """Route rows to their adapters: PEFT's `adapter_names` only when the rows really mix adapters.

    A batch (or what is left of one) on a single adapter runs it as the active adapter, and one on the base
    runs with adapters disabled: both skip the per-call hooks and per-adapter indexing of `adapter_names`,
    which cost more than the LoRA matmuls themselves on small models.
    """
    if adapters is None:
        yield {}
        return
    names = set(adapters)
    if len(names) > 1:
        yield {"adapter_names": adapters}
        return
    (name,) = names
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            yield {}
        return
    if model.active_adapters != [name]:
        model.set_adapter(name)
    yield {}


@torch.inference_mode()
def decode(
    model: Any,
    tokenizer: Any,
    rows: list[Row],
    *,
    eos_ids: set[int],
    pad_id: int,
    mixed_adapters: bool,
) -> Iterator[list[Step]]:
    """Generate for every row at once; yield each step's new text per row until every row has finished.

    With `mixed_adapters`, `model` is a PeftModel and each row's `adapter` goes to PEFT as `adapter_names`,
    so rows for different LoRA adapters (and the base, `__base__`) share every forward pass.
    """
    device = next(model.parameters()).device
    states = [_RowState(row, device) for row in rows]
    longest = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
        attention[i, longest - len(row.prompt_ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    # Positions count real tokens only, so a left-padded row sees exactly what it would see alone.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    active = list(range(len(rows)))
    cache = None
    while active:
        with _routed(model, [rows[i].adapter for i in active] if mixed_adapters else None) as extra:
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        steps, keep, tokens = [], [], []
        for j, i in enumerate(active):
            state = states[i]
            if state.row.cancelled:
                steps.append(Step(i, "", len(state.tokens), "cancelled"))
                continue
            token = sample(logits[j], state.row.temperature, state.row.top_p, state.generator)
            delta, finish = state.advance(token, tokenizer, eos_ids)
            steps.append(Step(i, delta, len(state.tokens), finish))
            if finish is None:
                keep.append(j)
                tokens.append(token)
        yield steps
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, positions = attention[index], positions[index]
            active = [active[j] for j in keep]
        input_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
