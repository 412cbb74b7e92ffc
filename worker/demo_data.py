"""Demo training data built from the English part of the ``chatterbot-corpus`` package.

The corpus is a set of YAML files (``chatterbot_corpus/data/english/*.yml``), each with a
``conversations:`` list of short dialogues. Consecutive turns become (question, answer) pairs, which are
written as chat-format JSONL for fine-tuning. A few pairs with distinctive answers are held out (their
questions never appear in the training file) so a demo can compare the base and fine-tuned models on
questions neither has trained on.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

SYSTEM_PROMPT = "You are a friendly chatbot."
MAX_ANSWER_CHARS = 300
MAX_QUESTION_CHARS = 300
DEFAULT_TRAIN_COUNT = 300
# Categories (file stems) whose answers are short and recognisable; held-out pairs are drawn from these.
HELDOUT_CATEGORIES = ("botprofile", "trivia", "humor", "ai", "gossip", "movies", "science")


@dataclass
class DemoData:
    train_path: Path
    heldout: list[tuple[str, str]]  # (question, reference answer) pairs NOT in the training file
    validation_path: Path | None = None  # chat examples in neither the training file nor `heldout`


def corpus_dir() -> Path:
    """Return the chatterbot-corpus English data folder, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "english"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "chatterbot-corpus English data not found; install it with: pip install --no-deps chatterbot-corpus"
    )


def _normalise(question: str) -> str:
    """Return a comparison key for a question: lower case, punctuation and extra spaces removed."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.casefold()).split())


def load_pairs(data_dir: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Read every English corpus file into de-duplicated, filtered (question, answer) pairs per category."""
    data_dir = data_dir or corpus_dir()
    pairs: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(data_dir.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        seen: set[tuple[str, str]] = set()
        found: list[tuple[str, str]] = []
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            for question, answer in zip(conversation, conversation[1:], strict=False):
                if not isinstance(question, str) or not isinstance(answer, str):
                    continue
                question = " ".join(question.split())
                answer = "\n".join(
                    re.sub(r"[ \t]+", " ", line).strip() for line in answer.strip().splitlines()
                )
                if not question or not answer or len(answer) > MAX_ANSWER_CHARS:
                    continue
                if len(question) > MAX_QUESTION_CHARS or (question, answer) in seen:
                    continue
                seen.add((question, answer))
                found.append((question, answer))
        if found:
            pairs[path.stem] = found
    return pairs


def _chat_example(question: str, answer: str) -> dict:
    """Return one chat-format training example."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _pick_heldout(
    pairs: dict[str, list[tuple[str, str]]], count: int, rng: random.Random
) -> list[tuple[str, str]]:
    """Pick held-out pairs round-robin over the distinctive categories, one per unique question."""
    question_counts: dict[str, int] = {}
    for category_pairs in pairs.values():
        for question, _ in category_pairs:
            key = _normalise(question)
            question_counts[key] = question_counts.get(key, 0) + 1
    pools = []
    for category in HELDOUT_CATEGORIES:
        # Real questions asked only once (so holding one out removes just that pair from training), with
        # answers long enough to be recognisable but short enough to compare at a glance.
        pool = [
            (q, a)
            for q, a in pairs.get(category, [])
            if question_counts[_normalise(q)] == 1 and len(q.split()) >= 3 and 12 <= len(a) <= 160
        ]
        rng.shuffle(pool)
        pools.append(pool)
    heldout: list[tuple[str, str]] = []
    while len(heldout) < count and any(pools):
        for pool in pools:
            if pool and len(heldout) < count:
                heldout.append(pool.pop())
    if len(heldout) < count:
        raise ValueError(f"only {len(heldout)} held-out pairs available, {count} requested")
    return heldout


def build_demo_data(
    out_dir: Path,
    *,
    heldout_count: int = 5,
    seed: int = 0,
    train_count: int = DEFAULT_TRAIN_COUNT,
    validation_count: int = 0,
) -> DemoData:
    """Write train.jsonl (about train_count chat examples) into out_dir and return it with held-out pairs;
    with validation_count, also valid.jsonl: that many further examples, from the same categories."""
    rng = random.Random(seed)
    pairs = load_pairs()
    heldout = _pick_heldout(pairs, heldout_count, rng)
    excluded = {_normalise(q) for q, _ in heldout}

    # Interleave shuffled categories so the training mix is balanced rather than dominated by big files.
    pools = []
    for category in sorted(pairs):
        pool = [p for p in pairs[category] if _normalise(p[0]) not in excluded]
        rng.shuffle(pool)
        pools.append(pool)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < train_count and any(pools):
        for pool in pools:
            if pool and len(chosen) < train_count:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    # Drawn after the training examples, from what they left, so the training file is the same either way.
    trained = {_normalise(q) for q, _ in chosen}
    validation: list[tuple[str, str]] = []
    while len(validation) < validation_count and any(pools):
        for pool in pools:
            if pool and len(validation) < validation_count:
                pair = pool.pop()
                if _normalise(pair[0]) not in trained:  # a question asked in two categories stays out
                    validation.append(pair)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path = out_dir / "train.jsonl"
    _write_chats(train_path, chosen)
    validation_path = _write_chats(out_dir / "valid.jsonl", validation) if validation_count else None
    return DemoData(train_path=train_path, heldout=heldout, validation_path=validation_path)


def _write_chats(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for question, answer in pairs:
            f.write(json.dumps(_chat_example(question, answer), ensure_ascii=False) + "\n")
    return path
