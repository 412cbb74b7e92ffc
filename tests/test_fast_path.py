"""Supervised fine-tuning's fast path (worker/training/fast_path.py) is exact and is the default.

A job on its defaults trains padding-free, attention running on each example's own span, and gives,
step for step, the losses of the same job on padded batches; the methods that add virtual tokens to each
example fall back to padded batches; a model whose attention would let packed examples see each other is
caught before it trains; and TRL's fused head projects only the positions that carry loss, through
narrow vocabulary tiles on a CPU.
"""

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tests.helpers import TEST_HOME, all_events, job_body, upload, wait_for_status
from worker.training import fast_path

TINY = TEST_HOME / "models" / "tiny-llama"


def uneven_chat_jsonl(count: int) -> bytes:
    """Chat examples from 2 to 40 words long, so that padded batches carry plenty of padding."""
    rows = []
    for i in range(count):
        answer = " ".join(["plus", "one", "is", str(i)] * (1 + (i * 7) % 10))
        messages = [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": answer}]
        rows.append(json.dumps({"messages": messages}))
    return ("\n".join(rows) + "\n").encode()


def train(http: httpx.Client, training_id: str, **hyperparameters: object) -> tuple[list[float], dict]:
    """A job's per-step training losses and the data of its event saying how batches were built."""
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training_id, batch_size=4, **hyperparameters))
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    rows = http.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
    batches = next(e for e in all_events(http, job["id"]) if "padding_free" in (e["data"] or {}))
    return [row["train_loss"] for row in rows], batches


def test_the_default_path_is_padding_free_with_the_padded_losses(http: httpx.Client) -> None:
    training_id = upload(http, uneven_chat_jsonl(24))["id"]
    fast, fast_batches = train(http, training_id)
    padded, padded_batches = train(http, training_id, padding_free=False)
    assert fast_batches["data"]["padding_free"] is True, fast_batches
    assert "attention per example" in fast_batches["message"]  # no row-long mask (fast_path.packed_sdpa)
    assert padded_batches["data"]["padding_free"] is False, padded_batches
    assert len(fast) == len(padded) == 6
    # The same examples in the same batches: the losses differ only by float rounding.
    assert fast == pytest.approx(padded, rel=1e-4, abs=1e-5)


def test_gradient_checkpointing_recomputes_the_same_steps(http: httpx.Client) -> None:
    """On a CPU the default leaves it off; asked for, the run checkpoints each block, with the same losses."""
    training_id = upload(http, uneven_chat_jsonl(12))["id"]
    runs = {}
    for asked in ("auto", True):
        body = job_body(training_id, batch_size=4, gradient_checkpointing=asked)
        job = wait_for_status(
            http, http.post("/v1/fine_tuning/jobs", json=body).json()["id"], {"succeeded", "failed"}
        )
        assert job["status"] == "succeeded", job["error"]
        # `auto` is resolved as the job is created, to what this (CPU) deployment's workers do.
        assert job["method"]["supervised"]["hyperparameters"]["gradient_checkpointing"] is (asked is True)
        rows = http.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
        finished = next(
            e for e in all_events(http, job["id"]) if e["message"].startswith("Training finished")
        )
        runs[asked] = [row["train_loss"] for row in rows], finished["data"]["gradient_checkpointing"]
    assert runs["auto"][1] is False and runs[True][1] is True
    assert len(runs[True][0]) == 3
    assert runs[True][0] == pytest.approx(runs["auto"][0], rel=1e-5, abs=1e-6)


def test_prompt_tuning_trains_on_padded_batches(http: httpx.Client) -> None:
    training_id = upload(http, uneven_chat_jsonl(8))["id"]
    _, batches = train(http, training_id, peft="prompt_tuning")
    assert batches["data"]["padding_free"] is False
    assert "virtual tokens" in batches["message"]


class IgnoresPositions(torch.nn.Module):
    """Stands for a third-party architecture that takes positions but does not restart attention at them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.model(input_ids=input_ids, **kwargs)


def test_a_model_that_lets_packed_examples_see_each_other_is_caught(tiny_model: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(TINY).train()
    assert fast_path.packs_exactly(model, model.config.vocab_size)
    assert model.training  # the check runs in eval mode and gives the model back as it was
    assert not fast_path.packs_exactly(IgnoresPositions(model), model.config.vocab_size)


def projected_rows(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The loss of a fused-head forward, and how many positions its LM head projected (kept for backward)."""
    loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ChunkedLogProb" in type(node).__name__:
            return loss.item(), node.saved_tensors[0].shape[0]
        nodes += [parent for parent, _ in node.next_functions]
    raise AssertionError("no fused LM head in the graph")


def test_only_positions_that_carry_loss_go_through_the_lm_head(tiny_model: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(TINY)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 7:] = ids[:, 7:]  # 3 completion tokens per row; the fused head shifts labels by one
    assert fast_path.score_only_trained_positions()
    loss, rows = projected_rows(model, ids, labels)
    assert rows == 2 * 3
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        )
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def largest_allocation(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the largest tensor a fused-head forward and backward allocate, from torch's memory profile."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    return max(event.cpu_memory_usage for event in prof.events())


def test_a_cpu_run_scores_the_vocabulary_in_narrow_tiles() -> None:
    config = LlamaConfig(
        vocab_size=65536, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    for table in (model.model.embed_tokens, model.lm_head):  # frozen, as under LoRA: no vocab x hidden grads
        table.requires_grad_(False)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    assert fast_path.narrow_cpu_vocab_tiles()
    # A tile is tokens x vocabulary entries of fp32: 63 scored positions here.
    assert largest_allocation(model, ids, ids.clone()) <= 63 * fast_path.CPU_VOCAB_TILE * 4
