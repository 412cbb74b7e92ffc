"""The running batch: rows join it at any decode step and leave it when they finish (continuous batching).

A `Batch` holds the rows decoding together on one model and their KV cache, right-aligned and left-padded
to a common length. Newcomers are prefilled together in one forward pass of their own; their cache rows
are then padded and concatenated onto the running cache, so from the next step on they decode with the
others. A finished or cancelled row is dropped from the cache at once, and columns that only padding
holds any more are trimmed, so the cache is never longer than its longest row.

Positions count each row's real tokens, so a row sees exactly what it would see alone whatever joins or
leaves around it. Rows carry their own sampling settings (greedy at temperature 0, else temperature +
top-p from a per-row ``torch.Generator`` seeded by the request), penalties, logit bias and token budget.

Text comes out incrementally: each step decodes only a short window of tokens (`Detokenizer`), so a long
answer costs the same per token at its end as at its start, and a character split over several byte
tokens goes out whole once its last byte arrives. Stop strings are looked for in the new text's
neighbourhood only, and text that could be the start of one is held back until it is known not to be.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from worker.serving.constrain import Constraint

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch's `adapter_names`
CONTEXT_TOKENS = 5
"""Prompt tokens decoded ahead of an answer's first: a tokenizer that drops a leading space at the start of a
text (SentencePiece does) would otherwise drop the answer's first space."""


@dataclass
class Row:
    """One generation as the decode loop sees it."""

    prompt_ids: list[int]
    max_tokens: int
    adapter: str = BASE_ADAPTER
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k likeliest
    project: str = ""
    constraint: Constraint | None = None  # a grammar the answer must follow (response_format, tools)
    id: int = 0  # the caller's name for the row: each `Step` carries it
    # Set from another thread when the client went away; the row leaves the batch at the next step.
    cancelled: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text, bytes and log-probability, with the likeliest alternatives at its place."""

    id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, log-probability), likeliest first


@dataclass(frozen=True)
class Step:
    """What one row produced in one decode step."""

    row: int  # the row's id
    text: str  # new text since the previous step (may be empty while a character or stop is forming)
    completion_tokens: int  # tokens generated so far, the end-of-sequence token included
    finish_reason: str | None  # "stop", "length", "cancelled", or None while the row goes on
    logprob: TokenLogprob | None = None  # the token this step chose, when the row asked for logprobs


class Detokenizer:
    """Turns a growing list of token ids into text, decoding only the tokens since the last whole character.

    `prefix` .. `read` are tokens already turned into text, kept as context so that the next token's text
    is the difference between two short decodes (a byte-level tokenizer's merges and a SentencePiece
    tokenizer's spaces depend on what comes before).
    """

    def __init__(self, tokenizer: Any, context: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix, self.read = 0, len(self.ids)

    def add(self, token: int, *, flush: bool = False) -> str:
        """The text `token` completes; "" while it ends inside a character, unless `flush` (the last one)."""
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not flush):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]


class _RowState:
    """A row's progress: its tokens, its text and how much of it went out, its generator and counts."""

    def __init__(self, row: Row, tokenizer: Any, device: torch.device, virtual_tokens: int = 0) -> None:
        self.row = row
        self.tokens: list[int] = []
        self.detokenizer = Detokenizer(tokenizer, row.prompt_ids[-CONTEXT_TOKENS:])
        self.text = ""
        self.emitted = 0
        self.position = virtual_tokens + len(row.prompt_ids)  # the next token's position
        self.next_token = -1  # sampled, not yet fed to the model
        self.counts: dict[int, int] = {}  # generated token -> how often, for the penalties
        self.longest_stop = max((len(s) for s in row.stop), default=0)
        self.generator: torch.Generator | None = None
        if row.temperature > 0:
            self.generator = torch.Generator(device=device)
            if row.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(row.seed)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if row.logit_bias:
            ids, values = zip(*row.logit_bias.items(), strict=True)
            self.bias = torch.tensor(ids, device=device), torch.tensor(values, device=device)

    def choose(self, logits: torch.Tensor, tokenizer: Any) -> tuple[int, TokenLogprob | None]:
        """Sample the next token from this row's raw logits; its logprob entry when the row asked."""
        adjusted = self._adjusted(logits)
        constraint = self.row.constraint
        if constraint is not None:
            adjusted = constraint.masked(adjusted)
        token = sample(adjusted, self.row.temperature, self.row.top_p, self.generator)
        if constraint is not None:
            constraint.consume(token)
        if self.row.logprobs is None:
            return token, None
        # The model's own distribution, before penalties, bias and temperature (vLLM's default too).
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top: list[tuple[int, str, float]] = []
        if self.row.logprobs > 0:
            values, ids = torch.topk(logprobs, self.row.logprobs)
            top = [
                (i, tokenizer.decode([i]), _finite(v))
                for i, v in zip(ids.tolist(), values.tolist(), strict=True)
            ]
        chosen = _finite(float(logprobs[token]))
        return token, TokenLogprob(token, tokenizer.decode([token]), chosen, top)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """OpenAI's logit bias, and presence and frequency penalties over the tokens generated so far."""
        row = self.row
        penalize = self.counts and (row.presence_penalty or row.frequency_penalty)
        if self.bias is None and not penalize:
            return logits
        logits = logits.float().clone()
        if self.bias is not None:
            logits[self.bias[0]] += self.bias[1]
        if penalize:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            logits[ids] -= counts * row.frequency_penalty + row.presence_penalty
        return logits

    def advance(self, token: int, eos_ids: set[int]) -> tuple[str, str | None]:
        """Take one sampled token; return the text that may go out now and the finish reason, if any."""
        self.tokens.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        complete = self.row.constraint is not None and self.row.constraint.done
        ending = token in eos_ids or complete or len(self.tokens) >= self.row.max_tokens
        new = self.detokenizer.add(token, flush=ending)
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        finish = None
        cut = _first_stop(self.text, self.row.stop, searched_from) if new else None
        if cut is not None:
            self.text, finish = self.text[:cut], "stop"
        elif ending:
            finish = "stop" if token in eos_ids or complete else "length"
        upto = len(self.text) if finish else len(self.text) - held_back(self.text, self.row.stop)
        delta = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta, finish


def _finite(value: float) -> float:
    """A log-probability JSON can carry: -inf (a token the model rules out) becomes the float's lowest."""
    return value if math.isfinite(value) else -9999.0


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters must wait because they could be the start of one of `stops`."""
    held = 0
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


Forward = Callable[..., torch.Tensor]
"""forward(adapters, input_ids=, attention_mask=, position_ids=, past_key_values=) -> last-token logits;
`adapters` names each row's adapter, for the engine to route (it knows the model and its LoRA state)."""


class Batch:
    """The rows decoding together on one model, with their KV cache."""

    def __init__(self, tokenizer: Any, *, eos_ids: set[int], pad_id: int, device: torch.device) -> None:
        self.tokenizer, self.eos_ids, self.pad_id, self.device = tokenizer, eos_ids, pad_id, device
        self.states: list[_RowState] = []
        self.cache: DynamicCache | None = None
        self.attention = torch.zeros((0, 0), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def rows(self) -> list[Row]:
        return [state.row for state in self.states]

    @torch.inference_mode()
    def join(
        self,
        rows: list[Row],
        forward: Forward,
        *,
        virtual_tokens: int = 0,
        start_cache: Callable[[int], DynamicCache] | None = None,
    ) -> list[Step]:
        """Prefill `rows` in one forward pass, take their first tokens, and add them to the running batch.

        A prompt-learning model puts `virtual_tokens` before every prompt: `forward` inserts their
        embeddings (prompt and P-tuning), or `start_cache` gives their keys and values (prefix tuning). They
        take the first positions and cache columns of each row, as PEFT's own forward pass places them.
        """
        states = [_RowState(row, self.tokenizer, self.device, virtual_tokens) for row in rows]
        longest = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), virtual_tokens + longest), dtype=torch.long)
        attention[:, :virtual_tokens] = 1
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            size = len(row.prompt_ids)
            input_ids[i, longest - size :] = torch.tensor(row.prompt_ids)
            attention[i, virtual_tokens + longest - size :] = 1
            positions[i, longest - size :] = torch.arange(size) + virtual_tokens
        cache = start_cache(len(rows)) if start_cache is not None else DynamicCache()
        attention = attention.to(self.device)
        logits = forward(
            [row.adapter for row in rows],
            input_ids=input_ids.to(self.device),
            attention_mask=attention,
            position_ids=positions.to(self.device),
            past_key_values=cache,
        )
        steps, keep = self._sample(states, logits)
        if keep:
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            self._append(cache, attention[index], [states[j] for j in keep])
        return steps

    @torch.inference_mode()
    def step(self, forward: Forward) -> list[Step]:
        """One decode step for every row; cancelled rows leave first, without a forward pass of their own."""
        steps = [Step(s.row.id, "", len(s.tokens), "cancelled") for s in self.states if s.row.cancelled]
        if steps:
            self._keep([j for j, s in enumerate(self.states) if not s.row.cancelled])
        if not self.states:
            return steps
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.states), 1))], dim=1)
        logits = forward(
            [s.row.adapter for s in self.states],
            input_ids=torch.tensor([[s.next_token] for s in self.states], device=self.device),
            attention_mask=self.attention,
            position_ids=torch.tensor([[s.position] for s in self.states], device=self.device),
            past_key_values=self.cache,
        )
        for state in self.states:
            state.position += 1
        more, keep = self._sample(self.states, logits)
        if len(keep) < len(self.states):
            self._keep(keep)
        return steps + more

    def _sample(self, states: list[_RowState], logits: torch.Tensor) -> tuple[list[Step], list[int]]:
        """Each row's next token from its logits; the steps, and which rows go on."""
        steps, keep = [], []
        for j, state in enumerate(states):
            token, logprob = state.choose(logits[j], self.tokenizer)
            delta, finish = state.advance(token, self.eos_ids)
            steps.append(Step(state.row.id, delta, len(state.tokens), finish, logprob))
            if finish is None:
                state.next_token = token
                keep.append(j)
        return steps, keep

    def _keep(self, keep: list[int]) -> None:
        """Only rows `keep` stay; columns that hold nothing but padding now go too."""
        self.states = [self.states[j] for j in keep]
        if not keep:
            self.cache, self.attention = None, self.attention[:0, :0]
            return
        assert self.cache is not None
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention[index]
        used = self.attention.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self.attention = self.attention[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _append(self, cache: DynamicCache, attention: torch.Tensor, states: list[_RowState]) -> None:
        """Add prefilled rows: both caches are left-padded to the longer one and stacked."""
        if self.cache is None:
            self.cache, self.attention, self.states = cache, attention, states
            return
        width = max(self.attention.shape[1], attention.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.attention = torch.cat([_pad_left(self.attention, width, 1), _pad_left(attention, width, 1)])
        self.states += states


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
