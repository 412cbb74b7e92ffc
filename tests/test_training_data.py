"""The loss mask: only assistant (or completion) tokens carry loss, whatever the chat template."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.training.base_models import make_tiny_llama
from worker.training.data import prepare_file, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(folder)
    return AutoTokenizer.from_pretrained(folder)


def trained_text(tokenizer, example: dict) -> str:  # type: ignore[no-untyped-def]
    tokens = tokenize_example(tokenizer, example)
    return tokenizer.decode([t for t, m in zip(tokens.input_ids, tokens.completion_mask, strict=True) if m])


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye now"},
            {"role": "assistant", "content": "Goodbye!"},
        ]
    }
    text = trained_text(tokenizer, example)
    assert "Hi." in text and "Goodbye!" in text
    assert "Hello there" not in text and "Be brief" not in text and "Bye now" not in text
    assert text.count("<|im_end|>") == 2, "each turn's end token is learned, so the model learns to stop"


def test_weight_zero_turn_carries_no_loss(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = {
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "Skip me", "weight": 0},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "Learn me", "weight": 1},
        ]
    }
    text = trained_text(tokenizer, example)
    assert "Learn me" in text and "Skip me" not in text


def test_prompt_completion_trains_on_completion_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = trained_text(tokenizer, {"prompt": "Translate: cat ->", "completion": " chat"})
    assert text == " chat" + tokenizer.eos_token


def test_prepare_file_truncates_and_drops_examples_without_loss(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    long_prompt = "word " * 200
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "short", "completion": " answer"}\n'
        f'{{"prompt": "{long_prompt}", "completion": " lost"}}\n'
    )
    prepared = prepare_file(tokenizer, path, max_seq_length=64)
    assert len(prepared.rows) == 1 and prepared.truncated == 1 and prepared.dropped == 1
    assert all(len(row["input_ids"]) <= 64 for row in prepared.rows)
    assert prepared.total_tokens == len(prepared.rows[0]["input_ids"])
