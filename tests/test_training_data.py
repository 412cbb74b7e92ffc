"""The loss mask: only assistant (or completion) tokens carry loss, whatever the chat template.

Plain text trains on everything, and so does any format when `train_on_inputs` is set.
"""

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


def test_alpaca_trains_on_the_output_and_turn_end_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = {"instruction": "Translate to French.", "input": "The cat sleeps", "output": "Le chat dort."}
    tokens = tokenize_example(tokenizer, example)
    assert tokenizer.decode(tokens.input_ids).count("Translate to French.\n\nThe cat sleeps") == 1
    text = trained_text(tokenizer, example)
    assert "Le chat dort." in text and text.count("<|im_end|>") == 1
    assert "Translate" not in text and "cat sleeps" not in text


@pytest.mark.parametrize(
    ("alpaca", "user_message"),
    [
        ({"instruction": "Say hi.", "output": "4"}, "Say hi."),
        ({"instruction": "Say hi.", "input": "", "output": "4"}, "Say hi."),
        ({"instruction": "Sum.", "input": "2, 2", "output": "4"}, "Sum.\n\n2, 2"),
    ],
    ids=["no_input", "empty_input", "input"],
)
def test_alpaca_is_the_chat_conversation_it_stands_for(tokenizer, alpaca: dict, user_message: str) -> None:  # type: ignore[no-untyped-def]
    chat = {"messages": [{"role": "user", "content": user_message}, {"role": "assistant", "content": "4"}]}
    assert tokenize_example(tokenizer, alpaca) == tokenize_example(tokenizer, chat)


def test_text_trains_on_all_of_it_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = {"text": "The quick brown fox."}
    assert set(tokenize_example(tokenizer, example).completion_mask) == {1}
    assert trained_text(tokenizer, example) == "The quick brown fox." + tokenizer.eos_token


@pytest.mark.parametrize(
    "example",
    [
        {
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi.", "weight": 0},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao."},
            ]
        },
        {"prompt": "Translate: cat ->", "completion": " chat"},
        {"instruction": "Say hi.", "input": "Politely", "output": "Hello!"},
    ],
    ids=["chat", "prompt_completion", "alpaca"],
)
def test_train_on_inputs_puts_loss_on_every_token(tokenizer, example: dict) -> None:  # type: ignore[no-untyped-def]
    default = tokenize_example(tokenizer, example)
    everything = tokenize_example(tokenizer, example, train_on_inputs=True)
    assert everything.input_ids == default.input_ids
    assert 0 in default.completion_mask
    assert everything.completion_mask == [1] * len(everything.input_ids)


def test_prepare_file_passes_train_on_inputs(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "short", "completion": " answer"}\n')
    default = prepare_file(tokenizer, path, max_seq_length=64).rows[0]
    everything = prepare_file(tokenizer, path, max_seq_length=64, train_on_inputs=True).rows[0]
    assert 0 in default["completion_mask"]
    assert everything["completion_mask"] == [1] * len(everything["input_ids"])


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


def test_split_off_holds_out_a_seeded_fraction() -> None:
    from worker.training.data import PreparedData, split_off

    rows = [{"input_ids": [i] * (i + 1), "completion_mask": [1] * (i + 1)} for i in range(20)]
    data = PreparedData(
        rows=rows, total_tokens=sum(len(r["input_ids"]) for r in rows), truncated=0, dropped=0
    )
    train, valid = split_off(data, 0.25, seed=3)
    assert (len(train.rows), len(valid.rows)) == (15, 5)
    assert train.total_tokens + valid.total_tokens == data.total_tokens
    assert {r["input_ids"][0] for r in train.rows} | {r["input_ids"][0] for r in valid.rows} == set(range(20))
    assert split_off(data, 0.25, seed=3)[1].rows == valid.rows, "the same seed holds out the same examples"
    tiny = PreparedData(rows=rows[:2], total_tokens=3, truncated=0, dropped=0)
    assert [len(part.rows) for part in split_off(tiny, 0.01, seed=0)] == [1, 1]
