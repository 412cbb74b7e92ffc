"""Serving benchmarks, printed as ratios measured in one process on the same model and requests.

    .venv/bin/python bench/serving.py [--requests 32] [--new-tokens 16] [--threads 2] [--hidden-size 512]
                                      [--layers 4]

(a) Mixed-adapter batching: 8 LoRA adapters, N chat requests spread round-robin over them, greedy, a fixed
    number of new tokens. "mixed" serves all N in one batch through the engine (PEFT `adapter_names`).
    Two baselines serve the same requests one adapter at a time with `set_adapter`:
    "per-request" runs each request alone (switching adapter as needed, the plain way to serve several
    adapters without mixed batches); "per-adapter" batches each adapter's own requests together and
    runs the 8 batches one after another. Throughput is generated tokens per second; all three produce
    the same tokens (checked).
(b) Unmerged vs merged: the same requests, one at a time, for one adapter, through the engine (a
    PeftModel holding all 8 adapters) vs a model with that adapter merged for good (`merge_and_unload`).
    The engine runs them twice: as it serves by default (a single-adapter batch swaps in W + BA) and
    with that off (PEFT's LoRA layers on every step). Latency is the mean time per request.
(c) Traffic that alternates between two adapters, one request at a time: the engine swaps in merged
    weights only for an adapter that served the batch before too, so here it keeps PEFT's layers; the
    ratio shows what that rule costs against swapping off.

The model is a random Llama from make_tiny_llama, 512 wide, 4 blocks by default (15.0M parameters): big enough
that compute matters on 2 CPU cores, small enough to run in a couple of minutes. The paths compared run in
`--repeats` interleaved rounds after one warm-up; times are medians, and each ratio is taken within each
round and printed as the spread over rounds (min / median / max), so one lucky round cannot make a claim.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from worker.serving.decode import Row, decode
from worker.serving.engine import Engine, GenerationRequest, Prepared, Target, load_model
from worker.training.base_models import make_tiny_llama

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How are you today?",
    "Who wrote the play Romeo and Juliet?",
    "Can you help me with my computer?",
    "What is the tallest mountain on Earth?",
    "Please answer briefly: what makes us smile?",
    "My internet is not working. What should I try?",
]


def make_adapter(base: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter (r=8 on every linear layer) with random lora_B, saved as training saves one."""
    model = load_model(base, torch.device("cpu"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(dest)
    return dest


@dataclass
class Timing:
    """One path's seconds in each round, and what it produced."""

    rounds: list[float]
    out: list[str]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def timed(*fns: Callable[[], list[str]], repeats: int) -> list[Timing]:
    """Each function's time per round, the functions interleaved in every round so drift hits them alike."""
    timings = [Timing([], fn()) for fn in fns]  # warm-up
    for _ in range(repeats):
        for timing, fn in zip(timings, fns, strict=True):
            start = time.perf_counter()
            timing.out = fn()
            timing.rounds.append(time.perf_counter() - start)
    return timings


def ratio(slower: Timing, faster: Timing) -> str:
    """`slower` / `faster` within each round, as min / median / max over the rounds."""
    ratios = [a / b for a, b in zip(slower.rounds, faster.rounds, strict=True)]
    return f"{min(ratios):.2f}x / {statistics.median(ratios):.2f}x / {max(ratios):.2f}x"


def run_rows(model, tokenizer, rows: list[Row], pad_id: int, *, mixed: bool) -> list[str]:  # type: ignore[no-untyped-def]
    """Decode rows as one batch to exactly max_tokens each (no end-of-sequence stop); return their texts."""
    texts = [""] * len(rows)
    for steps in decode(model, tokenizer, rows, eos_ids=set(), pad_id=pad_id, mixed_adapters=mixed):
        for step in steps:
            texts[step.row] += step.text
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="tuneforge-bench-serving-"))
    base_path = root / "base"
    make_tiny_llama(
        base_path,
        seed=0,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        intermediate_size=args.hidden_size * 43 // 16,  # 1376 at 512 wide, as Llama sizes its MLP
    )
    adapter_ids = [f"ft:bench:a{i}:job{i}" for i in range(8)]
    paths = [make_adapter(base_path, root / f"a{i}", seed=i) for i in range(8)]

    engine = Engine(max_active_adapters=8, device=torch.device("cpu"))
    targets = [Target(mid, "bench", base_path, path) for mid, path in zip(adapter_ids, paths, strict=True)]
    prepared = []
    for i in range(args.requests):
        request = GenerationRequest(
            target=targets[i % 8],
            messages=[{"role": "user", "content": QUESTIONS[(i // 8) % len(QUESTIONS)]}],
            max_tokens=args.new_tokens,
            temperature=0.0,
        )
        prepared.append(engine.prepare(request))
    for p in prepared:
        p.row.adapter = engine.ensure_adapter(p.request.target)
    base = engine.base("bench", base_path)
    model, tokenizer = base.model, base.tokenizer
    rows = [p.row for p in prepared]
    tokens = args.requests * args.new_tokens
    params = sum(p.numel() for p in model.get_base_model().parameters()) / 1e6

    def mixed() -> list[str]:
        return run_rows(model, tokenizer, rows, base.pad_id, mixed=True)

    def per_request() -> list[str]:
        out = []
        for row in rows:
            model.set_adapter(row.adapter)
            out += run_rows(model, tokenizer, [row], base.pad_id, mixed=False)
        return out

    def per_adapter() -> list[str]:
        out: dict[int, str] = {}
        for name in dict.fromkeys(r.adapter for r in rows):
            model.set_adapter(name)
            index = [i for i, r in enumerate(rows) if r.adapter == name]
            texts = run_rows(model, tokenizer, [rows[i] for i in index], base.pad_id, mixed=False)
            out.update(zip(index, texts, strict=True))
        return [out[i] for i in range(len(rows))]

    t_mixed, t_request, t_adapter = timed(mixed, per_request, per_adapter, repeats=args.repeats)
    assert t_mixed.out == t_request.out == t_adapter.out

    print(
        f"model: {params:.1f}M parameters, {args.threads} threads; {args.requests} requests x "
        f"{args.new_tokens} new tokens over 8 adapters; {args.repeats} rounds, ratios as min / median / max"
    )
    print(f"(a) mixed batch          {tokens / t_mixed.median:8.1f} tok/s ({t_mixed.median:.2f} s)")
    print(
        f"    per-request set_adapter {tokens / t_request.median:5.1f} tok/s ({t_request.median:.2f} s)"
        f"  -> mixed is {ratio(t_request, t_mixed)} the throughput"
    )
    print(
        f"    per-adapter batches  {tokens / t_adapter.median:8.1f} tok/s ({t_adapter.median:.2f} s)"
        f"  -> mixed is {ratio(t_adapter, t_mixed)} the throughput"
    )

    # (b) one adapter, the same requests one at a time: through the engine vs merge_and_unload weights
    first = [p for p in prepared if p.row.adapter == rows[0].adapter]
    merged = PeftModel.from_pretrained(load_model(base_path, engine.device), str(paths[0])).merge_and_unload()
    merged.eval()

    # The same adapters in a second engine that never swaps in merged weights (PEFT's LoRA layers only).
    peft_engine = Engine(max_active_adapters=8, device=torch.device("cpu"), merge_single_adapter=False)
    for p in prepared:
        peft_engine.ensure_adapter(p.request.target)

    def one_at_a_time(requests: list[Prepared], swap: bool) -> Callable[[], list[str]]:
        engine_ = engine if swap else peft_engine

        def run() -> list[str]:
            return ["".join(s.text for steps in engine_.generate([p]) for s in steps) for p in requests]

        return run

    def merged_one() -> list[str]:
        return [run_rows(merged, tokenizer, [p.row], base.pad_id, mixed=False)[0] for p in first]

    # The engine stops at end-of-sequence; a random model rarely emits it, and the check below says so.
    t_swapped, t_peft, t_merged = timed(
        one_at_a_time(first, swap=True), one_at_a_time(first, swap=False), merged_one, repeats=args.repeats
    )
    assert t_swapped.out == t_peft.out == t_merged.out, "merged and unmerged weights gave different tokens"
    n = len(first)
    print(
        f"(b) merge_and_unload model {1000 * t_merged.median / n:6.1f} ms/request\n"
        f"    engine, swapped W + BA  {1000 * t_swapped.median / n:6.1f} ms/request -> "
        f"{ratio(t_swapped, t_merged)} the merged latency\n"
        f"    engine, PEFT LoRA layers {1000 * t_peft.median / n:5.1f} ms/request -> "
        f"{ratio(t_peft, t_merged)} the merged latency"
    )

    # (c) every request on another adapter than the one before it
    alternating = [p for p in prepared if p.row.adapter in (rows[0].adapter, rows[1].adapter)]
    t_alt_swap, t_alt_peft = timed(
        one_at_a_time(alternating, swap=True), one_at_a_time(alternating, swap=False), repeats=args.repeats
    )
    assert t_alt_swap.out == t_alt_peft.out
    n = len(alternating)
    print(
        f"(c) alternating adapters: engine {1000 * t_alt_swap.median / n:6.1f} ms/request, PEFT layers only "
        f"{1000 * t_alt_peft.median / n:6.1f} ms/request -> {ratio(t_alt_swap, t_alt_peft)} the latency"
    )


if __name__ == "__main__":
    main()
