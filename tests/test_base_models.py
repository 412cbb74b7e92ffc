"""Base models (the tiny Llama, the GGUF import, model inspection) and the demo data builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from worker.demo_data import SYSTEM_PROMPT, build_demo_data
from worker.generate import chat_answers
from worker.training.base_models import import_gguf, inspect_model, make_tiny_llama, smollm2_gguf_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(dest, seed=0)
    return dest


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_tiny_llama_reloads(tiny: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert 900 <= len(tokenizer) <= 1100
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == im_end and model.config.pad_token_id == eot
    assert model.generation_config.eos_token_id == im_end
    inputs = tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(tokenizer)


def test_tiny_llama_stays_tiny(tiny: Path) -> None:
    """The suite trains it dozens of times, so its size is a budget (205,120 parameters, 0.8 MB of weights).

    This replaces a wall-clock "builds in under 10 s": the build time is a benchmark (bench/tiny_model.py).
    """
    assert inspect_model(tiny)["total_parameters"] <= 250_000
    assert (tiny / "model.safetensors").stat().st_size <= 1_000_000


def test_tiny_llama_only_safetensors(tiny: Path) -> None:
    files = {p.name for p in tiny.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files)


def test_chat_template_is_chatml_and_utf8(tiny: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    text = "Grüße aus Köln — 東京 🎉"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.decode(ids) == rendered
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_same_seed_same_weights(tiny: Path, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "again", seed=0)
    make_tiny_llama(tmp_path / "other", seed=1)
    first, again, other = _weights(tiny), _weights(tmp_path / "again"), _weights(tmp_path / "other")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert (tiny / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_smollm2_gguf_path_exists() -> None:
    path = smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 10_000_000


def test_build_demo_data(tmp_path: Path) -> None:
    data = build_demo_data(tmp_path, heldout_count=5, seed=0)
    assert data.train_path == tmp_path / "train.jsonl"
    lines = data.train_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 200
    questions = set()
    for line in lines:
        messages = json.loads(line)["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == SYSTEM_PROMPT
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        assert len(messages[2]["content"]) <= 300
        questions.add(messages[1]["content"].strip().casefold())
    assert len(data.heldout) == 5
    for question, answer in data.heldout:
        assert question and answer
        assert question.strip().casefold() not in questions
        assert question not in data.train_path.read_text(encoding="utf-8")


def test_demo_validation_chats_are_in_neither_the_training_file_nor_the_held_out_questions(
    tmp_path: Path,
) -> None:
    def questions(path: Path) -> list[str]:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"][1]["content"].strip().casefold() for line in lines]

    data = build_demo_data(tmp_path / "with", train_count=200, validation_count=40)
    assert data.validation_path is not None
    validation = questions(data.validation_path)
    assert len(validation) == 40
    assert not set(validation) & set(questions(data.train_path))
    assert not set(validation) & {q.strip().casefold() for q, _ in data.heldout}
    # The training file is the same as without a validation split.
    without = build_demo_data(tmp_path / "without", train_count=200)
    assert without.validation_path is None
    assert without.train_path.read_bytes() == data.train_path.read_bytes()


def test_build_demo_data_is_deterministic(tmp_path: Path) -> None:
    a = build_demo_data(tmp_path / "a", seed=3)
    b = build_demo_data(tmp_path / "b", seed=3)
    assert a.heldout == b.heldout
    assert a.train_path.read_bytes() == b.train_path.read_bytes()


def test_import_gguf_gives_a_safetensors_model_that_answers(tmp_path: Path) -> None:
    """The real SmolLM2 GGUF file becomes a plain transformers folder (about 40 s on 2 cores)."""
    dest = tmp_path / "smollm2"
    import_gguf(smollm2_gguf_path(), dest)
    assert sorted(p.name for p in dest.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config, "a dequantized import must not look quantized to trainers"
    profile = inspect_model(dest)
    assert profile["architecture"] == "LlamaForCausalLM" and profile["causal_lm"]
    assert profile["linear_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert profile["total_parameters"] == 134_515_008  # SmolLM2-135M, embedding and head tied
    (answer,) = chat_answers(dest, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer
