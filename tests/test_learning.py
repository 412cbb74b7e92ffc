"""Supervised fine-tuning learns a rule, shown on rows it never trained on.

tiny-llama (random weights) is taught to reverse three letters (" k d a" -> " a d k"). The held-out rows
are letter triples the job never sees, so answering them takes the rule, not a memorised row. The job
runs through the API and a real worker, with the held-out rows as its validation file; the test then
measures the held-out loss on the answer tokens and the greedy answers itself, with plain transformers,
on the base model and on the downloaded result.

`full` fine-tuning, because the rule needs the output head: tiny-llama's random head keeps every logit
within about 0.2 of the others, so an adapter on the blocks alone cannot take the loss far below
ln(vocabulary) (LoRA at 50 times its base rate on a copying task: 6.9 -> 6.2 in 130 steps, no answer right).
"""

import io
import itertools
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import TEST_HOME, all_events, job_body, upload, wait_for_status

BASE_DIR = TEST_HOME / "models" / "tiny-llama"
# Letters the tiny tokenizer encodes as one token after a space (" i", " q", " x" and " z" take two), so
# each letter is the same token in the question and in the answer.
LETTERS = "abcdefghjklmnoprstuvwy"
TRAIN_ROWS, HELD_OUT_ROWS = 400, 16
# 400 rows x 8 epochs / 16 a step = 200 steps. Eight runs (this sample and three others, job seeds 1, 2,
# 3 and 7) ended at a held-out loss of 0.05-0.09 with all 16 answers right; stopped at 150 steps, three
# runs were at 0.25-0.75 with 12-16 right.
HYPERPARAMETERS = {"peft": "full", "learning_rate": 3e-3, "n_epochs": 8, "batch_size": HELD_OUT_ROWS}
# The base model answers none of the held-out rows, at a loss of 6.97 a token (ln 1024 = 6.93).
MIN_LOSS_FALL, MIN_RIGHT = 6.0, 12


def reversal_rows() -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Disjoint training and held-out letter triples, the same on every run."""
    triples = random.Random(0).sample(list(itertools.product(LETTERS, repeat=3)), TRAIN_ROWS + HELD_OUT_ROWS)
    return triples[:TRAIN_ROWS], triples[TRAIN_ROWS:]


def spaced(letters: tuple[str, ...]) -> str:
    return "".join(f" {letter}" for letter in letters)


def conversation(letters: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """The question and the expected answer, as chat messages."""
    question = [{"role": "user", "content": spaced(letters)}]
    return question, [{"role": "assistant", "content": spaced(letters[::-1])}]


def jsonl(rows: list[tuple[str, ...]]) -> bytes:
    return "".join(json.dumps({"messages": sum(conversation(row), [])}) + "\n" for row in rows).encode()


def prompt_and_answer_ids(tokenizer: Any, letters: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered question, and of what follows it: the answer and its turn's end."""
    question, answer = conversation(letters)
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(question + answer, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full_ids[len(prompt_ids) :]


def held_out_loss(model: Any, tokenizer: Any, rows: list[tuple[str, ...]]) -> float:
    """Mean next-token loss over every answer token of the rows (the tokens SFT puts loss on)."""
    losses = []
    for row in rows:
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, row)
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids) :], reduction="none"))
    return torch.cat(losses).mean().item()


def right_answers(model: Any, tokenizer: Any, rows: list[tuple[str, ...]]) -> int:
    """How many rows greedy decoding answers exactly: the reversed letters, then the end of the turn."""
    right = 0
    for row in rows:
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, row)
        expected = answer_ids[: answer_ids.index(tokenizer.eos_token_id) + 1]
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=len(expected), do_sample=False)
        right += generated[0, len(prompt_ids) :].tolist() == expected
    return right


def unpack(archive: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def test_sft_learns_to_reverse_letters_it_never_saw(http: httpx.Client, tmp_path: Path) -> None:
    train, held_out = reversal_rows()
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR).eval()
    base_loss = held_out_loss(base, tokenizer, held_out)
    base_right = right_answers(base, tokenizer, held_out)
    assert base_right == 0, "the random base model must not know the rule already"

    validation = upload(http, jsonl(held_out), "held_out.jsonl")
    # No checkpoints: the worker evaluates once, at the end, all 16 held-out rows in one batch, so its
    # valid_loss is the mean over all their answer tokens, as held_out_loss computes it.
    body = job_body(upload(http, jsonl(train))["id"], **HYPERPARAMETERS, checkpoint_every_steps=10**6)
    created = http.post("/v1/fine_tuning/jobs", json=body | {"validation_file": validation["id"]})
    assert created.status_code == 200, created.text
    job = wait_for_status(http, created.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
    assert job["status"] == "succeeded", job

    model_dir = unpack(http.get(f"/v1/models/{job['fine_tuned_model']}/adapter").content, tmp_path / "model")
    tuned = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned_loss = held_out_loss(tuned, tokenizer, held_out)
    tuned_right = right_answers(tuned, tokenizer, held_out)
    finished = next(
        e["data"] for e in all_events(http, job["id"]) if e["message"].startswith("Training finished")
    )
    print(
        f"\nheld-out loss {base_loss:.3f} -> {tuned_loss:.3f} (worker: {finished['valid_loss']:.3f}), "
        f"right answers {base_right} -> {tuned_right} of {len(held_out)}, {finished['steps']} steps, "
        f"{finished['seconds_per_step']} s a step"
    )
    assert tuned_right >= MIN_RIGHT
    assert tuned_loss < base_loss - MIN_LOSS_FALL
    # The loss the worker reports on held-out rows is the loss on their answers, nothing else.
    assert finished["valid_loss"] == pytest.approx(tuned_loss, rel=1e-3, abs=1e-4)
