"""Training files -> tokenized examples with a loss mask on the completion (assistant) tokens only.

Chat examples are rendered once with the model's chat template; every assistant turn (unless its
`weight` is 0) is located by rendering the conversation up to it, so the mask follows whatever
template the model ships. Alpaca examples become a user/assistant conversation and take the chat
path. Prompt/completion examples mask the prompt and train on completion + EOS. Plain text examples
are language modelling: text + EOS all carry loss. With `train_on_inputs` every token carries loss.
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.files.validation import ALPACA, CHAT, TEXT, detect_format, load_examples

T = TypeVar("T")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    completion_mask: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(self.completion_mask)


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # OpenAI's content parts
        return "".join(part.get("text", "") for part in content)
    return content


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns that carry loss."""
    messages = [{"role": m["role"], "content": _text_of(m["content"])} | _weight(m) for m in messages]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, plain, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, plain[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, plain[: i + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the model's chat template does not render conversations prefix-stably, so assistant turns "
                "cannot be located; use the prompt/completion format for this model"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _weight(message: dict) -> dict:
    return {"weight": message["weight"]} if "weight" in message else {}


def _alpaca_messages(example: dict) -> list[dict]:
    """An Alpaca example as the conversation it stands for: instruction (+ input) asks, output answers."""
    request = example["instruction"]
    if example.get("input"):
        request += "\n\n" + example["input"]
    return [{"role": "user", "content": request}, {"role": "assistant", "content": example["output"]}]


def _tokenize_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> TokenizedExample:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start <= token_start < end for start, end in spans))
        for token_start, _token_end in encoded["offset_mapping"]
    ]
    return TokenizedExample(input_ids=list(encoded["input_ids"]), completion_mask=mask)


def _text_and_spans(tokenizer: Any, example: dict) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and the character spans that carry loss by default."""
    eos = tokenizer.eos_token or ""
    # The validator's own detection, so each line is read as the format it was checked as.
    example_format = detect_format(example)
    if example_format == CHAT:
        return _chat_spans(tokenizer, example["messages"])
    if example_format == ALPACA:
        return _chat_spans(tokenizer, _alpaca_messages(example))
    if example_format == TEXT:
        text = example["text"] + eos
        return text, [(0, len(text))]
    prompt, completion = example["prompt"], example["completion"] + eos
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def tokenize_example(tokenizer: Any, example: dict, *, train_on_inputs: bool = False) -> TokenizedExample:
    """Tokens of one validated example and the mask of the tokens that carry loss."""
    text, spans = _text_and_spans(tokenizer, example)
    if train_on_inputs:
        spans = [(0, len(text))]
    return _tokenize_with_spans(tokenizer, text, spans)


@dataclass
class PreparedData:
    rows: list[dict[str, list[int]]]  # input_ids + completion_mask, ready for datasets.Dataset.from_list
    total_tokens: int
    truncated: int
    dropped: int


def prepare_file(
    tokenizer: Any, path: Path, *, max_seq_length: int, train_on_inputs: bool = False
) -> PreparedData:
    """Tokenize a whole training file, truncating long examples and dropping those left with no loss."""
    rows, total, truncated, dropped = [], 0, 0, 0
    for example in load_examples(path.read_bytes()):
        tokenized = tokenize_example(tokenizer, example, train_on_inputs=train_on_inputs)
        if len(tokenized.input_ids) > max_seq_length:
            truncated += 1
            tokenized = TokenizedExample(
                tokenized.input_ids[:max_seq_length], tokenized.completion_mask[:max_seq_length]
            )
        if tokenized.trainable_tokens == 0:
            dropped += 1
            continue
        total += len(tokenized.input_ids)
        rows.append({"input_ids": tokenized.input_ids, "completion_mask": tokenized.completion_mask})
    return PreparedData(rows=rows, total_tokens=total, truncated=truncated, dropped=dropped)


def split_rows(rows: list[T], fraction: float, *, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of the rows (at least one, never all), chosen by `seed`, for validation."""
    if len(rows) < 2:
        raise ValueError("validation_split needs at least two training examples")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = min(max(1, round(len(order) * fraction)), len(order) - 1)
    return [rows[i] for i in sorted(order[held:])], [rows[i] for i in order[:held]]


def split_off(data: PreparedData, fraction: float, *, seed: int) -> tuple[PreparedData, PreparedData]:
    """split_rows for tokenized supervised data, keeping the token counts right."""
    train_rows, valid_rows = split_rows(data.rows, fraction, seed=seed)

    def tokens(rows: list[dict[str, list[int]]]) -> int:
        return sum(len(row["input_ids"]) for row in rows)

    return (
        PreparedData(train_rows, tokens(train_rows), data.truncated, data.dropped),
        PreparedData(valid_rows, tokens(valid_rows), 0, 0),
    )
