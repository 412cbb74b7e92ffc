"""Constrained decoding: a row's grammar masks every token that cannot continue it (llguidance, on CPU).

`response_format` (a JSON schema, or any JSON object) and forced tool calls become an llguidance grammar;
each step the row's matcher computes which tokens may come next, the others' logits become -inf before
sampling, and the chosen token advances the matcher. When the grammar is complete and nothing may follow,
the row finishes ("stop"), so the answer parses. llguidance computes a mask in tens of microseconds,
without a GPU, and is what vLLM uses for its "guidance" backend.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

JSON_DEFAULTS = {"whitespace_flexible": False}
"""Compact JSON: no whitespace between tokens, so a model cannot spend its budget on blank lines."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar for JSON matching `schema`; raises ValueError, saying why, if it cannot be enforced."""
    return checked(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS))


def lark_grammar(lark: str) -> str:
    """A grammar in llguidance's Lark syntax (which embeds JSON schemas as `%json {...}`)."""
    return checked(llguidance.LLMatcher.grammar_from_lark(lark))


def checked(grammar: str) -> str:
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(problem)
    return grammar


def json_literal(value: Any) -> str:
    """`value` as a Lark string literal (JSON string escapes are Lark's too)."""
    return json.dumps(value)


def tokenizer_for(tokenizer: Any, vocab: int, eos_ids: set[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, over the model's `vocab` logits."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids))


class Constraint:
    """One row's grammar as it is followed."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.mask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row's logits with every token the grammar forbids next at -inf."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        allowed = logits.float().clone().unsqueeze(0)
        llguidance.torch.apply_token_bitmask_inplace(allowed, self.mask.to(allowed.device))
        return allowed[0]

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing more may follow (or the matcher failed, which must not run on unconstrained)."""
        return self.matcher.is_stopped() or self.matcher.is_error()
