"""Serving benchmarks, printed as ratios measured in one process on the same model and requests.

    .venv/bin/python bench/serving.py [--parts adapters,load,long] [--requests 32] [--new-tokens 16]
                                      [--threads 2] [--hidden-size 512] [--layers 4]

(a) Mixed-adapter batching: 8 LoRA adapters, N chat requests spread round-robin over them, greedy, a fixed
    number of new tokens. "mixed" serves all N in one batch through the engine (PEFT `adapter_names`).
    Two baselines serve the same requests one adapter at a time with `set_adapter`:
    "per-request" runs each request alone (switching adapter as needed, the plain way to serve several
    adapters without mixed batches); "per-adapter" batches each adapter's own requests together and
    runs the 8 batches one after another. Throughput is generated tokens per second; all three produce
    the same tokens (checked).
(b) Unmerged vs merged: the same requests, one at a time, for one adapter, through the engine (a
    PeftModel holding all 8 adapters) vs a model with that adapter merged for good (`merge_and_unload`).
    The engine runs them twice: as it serves by default (a run of one adapter swaps in W + BA) and
    with that off (PEFT's LoRA layers on every step). Latency is the mean time per request.
(c) Traffic that alternates between two adapters, one request at a time: the engine swaps in merged
    weights only after a few steps on one adapter, so here it swaps once per request; the ratio shows
    what that costs against never swapping.
(d) Open-loop load (`load`): requests arrive at seeded random (Poisson) times whatever the server is
    doing, a mix of short (8 tokens) and long (128 tokens) answers over the 8 adapters, through the real
    scheduler (`Batcher`, its engine thread) in continuous mode and in static mode (a batch runs to its end
    before anything joins: what the server did before). Time to first token (p50, p99) for the short
    requests and all of them, and throughput (tokens over the time from the first arrival to the last
    answer). End-of-sequence is banned, so both modes generate exactly the same tokens.
(e) A long generation (`long`): one answer of 1,000 tokens; time per token over its first hundred tokens
    and its last hundred. Beside it, the detokenization this server did before (the whole answer decoded
    again at every step) is timed on the same tokens, to show the cost it would add by the end.

The model is a random Llama from make_tiny_llama, 512 wide, 4 blocks by default (15.0M parameters): big enough
that compute matters on 2 CPU cores, small enough to run in a couple of minutes. The paths compared run in
`--repeats` interleaved rounds after one warm-up; times are medians, and each ratio is taken within each
round and printed as the spread over rounds (min / median / max), so one lucky round cannot make a claim.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DynamicCache

from worker.serving.batcher import Batcher
from worker.serving.decode import Batch, Row
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

    def forward(adapters: list[str], **inputs: Any) -> torch.Tensor:
        routing = {"adapter_names": adapters} if mixed else {}
        return model(**inputs, **routing, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    batch = Batch(tokenizer, eos_ids=set(), pad_id=pad_id, device=torch.device("cpu"))
    for index, row in enumerate(rows):
        row.id = index
    texts = [""] * len(rows)
    steps = batch.join(rows, forward)
    while True:
        for step in steps:
            texts[step.row] += step.text
        if not batch:
            return texts
        steps = batch.step(forward)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class LoadResult:
    """One open-loop run: times to first token (s) of short requests and of all, and tokens per second."""

    short_ttft: list[float]
    all_ttft: list[float]
    throughput: float
    texts: list[str]


def open_loop(
    engine: Engine, plan: list[tuple[float, GenerationRequest]], *, continuous: bool, max_batch_size: int
) -> LoadResult:
    """Submit each request at its arrival time (seconds from the start) through a real Batcher."""

    async def main() -> LoadResult:
        batcher = Batcher(engine, window_s=0.0, max_batch_size=max_batch_size, continuous=continuous)
        batcher.start()
        start = time.perf_counter()
        first: list[float] = [0.0] * len(plan)
        texts = [""] * len(plan)
        tokens = 0

        async def one(index: int, at: float, request: GenerationRequest) -> float:
            nonlocal tokens
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            order = batcher.submit([request])
            await order.accepted()
            async for _, step in order.steps():
                if not first[index]:
                    first[index] = time.perf_counter() - start - at
                texts[index] += step.text
                if step.finish_reason is not None:
                    tokens += step.completion_tokens
            return time.perf_counter()

        try:
            ends = await asyncio.gather(*(one(i, at, r) for i, (at, r) in enumerate(plan)))
        finally:
            await batcher.stop()
        short = [first[i] for i, (_, r) in enumerate(plan) if (r.max_tokens or 0) <= SHORT_TOKENS]
        return LoadResult(short, first, tokens / (max(ends) - start - plan[0][0]), texts)

    return asyncio.run(main())


SHORT_TOKENS, LONG_TOKENS = 8, 128


def load_part(engine: Engine, targets: list[Target], args: argparse.Namespace) -> None:
    """(d) continuous vs static batching under the same seeded open-loop arrivals."""
    rng = random.Random(0)
    ban = dict.fromkeys(engine.base("bench", targets[0].base_path).eos_ids, -100.0)
    plan, at = [], 0.0
    for i in range(args.load_requests):
        at += rng.expovariate(args.arrival_rate)
        long = rng.random() < args.long_share
        request = GenerationRequest(
            target=targets[i % 8],
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=LONG_TOKENS if long else SHORT_TOKENS,
            temperature=0.0,
            logit_bias=ban,
        )
        plan.append((at, request))
    open_loop(engine, plan[:8], continuous=True, max_batch_size=args.max_batch_size)  # warm-up
    runs: dict[bool, list[LoadResult]] = {True: [], False: []}
    for _ in range(args.repeats):
        for continuous in (True, False):
            runs[continuous].append(
                open_loop(engine, plan, continuous=continuous, max_batch_size=args.max_batch_size)
            )
    assert all(r.texts == runs[True][0].texts for rs in runs.values() for r in rs), (
        "the modes differ in tokens"
    )
    longs = sum(1 for _, r in plan if r.max_tokens == LONG_TOKENS)
    print(
        f"(d) open loop: {len(plan)} requests ({longs} of {LONG_TOKENS} tokens, the rest {SHORT_TOKENS}) "
        f"over 8 adapters, {args.arrival_rate:g} arrivals/s, batches of at most {args.max_batch_size}"
    )
    for continuous in (True, False):
        results = runs[continuous]
        name = "continuous" if continuous else "static    "
        p50 = statistics.median(percentile(r.short_ttft, 50) for r in results)
        p99 = statistics.median(percentile(r.short_ttft, 99) for r in results)
        all99 = statistics.median(percentile(r.all_ttft, 99) for r in results)
        tps = statistics.median(r.throughput for r in results)
        print(
            f"    {name} short TTFT p50 {1000 * p50:7.1f} ms, p99 {1000 * p99:7.1f} ms; all p99 "
            f"{1000 * all99:7.1f} ms; {tps:6.1f} tok/s"
        )
    p99s = [
        percentile(c.short_ttft, 99) / percentile(s.short_ttft, 99)
        for c, s in zip(runs[True], runs[False], strict=True)
    ]
    p50s = [
        percentile(c.short_ttft, 50) / percentile(s.short_ttft, 50)
        for c, s in zip(runs[True], runs[False], strict=True)
    ]
    tput = [c.throughput / s.throughput for c, s in zip(runs[True], runs[False], strict=True)]
    for label, values, goal in (
        ("short p99 TTFT, continuous / static", p99s, "goal <= 0.2x"),
        ("short p50 TTFT, continuous / static", p50s, ""),
        ("throughput, continuous / static", tput, "goal >= 1.2x"),
    ):
        spread = f"{min(values):.2f}x / {statistics.median(values):.2f}x / {max(values):.2f}x"
        print(f"    {label}: {spread} {goal}")


def long_part(base_path: Path, args: argparse.Namespace) -> None:
    """(e) time per token over a 1,000-token answer, and the old whole-answer detokenization beside it."""
    engine = Engine(device=torch.device("cpu"))
    base = engine.base("bench-long", base_path)
    ban = dict.fromkeys(base.eos_ids, -100.0)
    target = Target("bench-long", "bench-long", base_path)
    request = GenerationRequest(
        target=target, prompt="Once upon a time", max_tokens=1000, temperature=0.0, logit_bias=ban
    )
    list(engine.generate([engine.prepare(GenerationRequest(target=target, prompt="Hi", max_tokens=50))]))
    # The old detokenizer's cost depends on how many tokens it re-decodes, not on which: time it on a
    # 1,000-token text of the bench's own questions.
    text_ids = base.tokenizer(" ".join(QUESTIONS * 60), add_special_tokens=False)["input_ids"][:1000]
    firsts, lasts, raw_firsts, raw_lasts, whole_first, whole_last = [], [], [], [], [], []
    for _ in range(args.repeats):
        stamps = [time.perf_counter() for _steps in engine.generate([engine.prepare(request)])]
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # decode steps, after the prefill
        firsts.append(statistics.mean(gaps[:100]))
        lasts.append(statistics.mean(gaps[-100:]))
        raw = _raw_decode_gaps(base.model, len(gaps))
        raw_firsts.append(statistics.mean(raw[:100]))
        raw_lasts.append(statistics.mean(raw[-100:]))
        timings = []
        for upto in range(1, len(text_ids) + 1):
            started = time.perf_counter()
            base.tokenizer.decode(text_ids[:upto], skip_special_tokens=True)
            timings.append(time.perf_counter() - started)
        whole_first.append(statistics.mean(timings[:100]))
        whole_last.append(statistics.mean(timings[-100:]))
    first, last = statistics.median(firsts), statistics.median(lasts)
    growth = [b / a for a, b in zip(firsts, lasts, strict=True)]
    raw_growth = [b / a for a, b in zip(raw_firsts, raw_lasts, strict=True)]
    print(
        f"(e) one 1,000-token answer: {1000 * first:.2f} ms/token over tokens 1-100, {1000 * last:.2f} "
        f"ms/token over 901-1000 -> last / first {_spread(growth)} (goal: flat)\n"
        f"    the model alone (forward passes with a growing KV cache, nothing else): last / first "
        f"{_spread(raw_growth)}: the growth that attention over a longer context costs anyway\n"
        f"    whole-answer re-decoding, as before: {1000 * statistics.median(whole_first):.3f} ms/token at "
        f"the start, {1000 * statistics.median(whole_last):.3f} ms/token at the end "
        f"({statistics.median(whole_last) / statistics.median(whole_first):.1f}x)"
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}x / {statistics.median(values):.2f}x / {max(values):.2f}x"


@torch.inference_mode()
def _raw_decode_gaps(model: Any, steps: int) -> list[float]:
    """Seconds per greedy decode step of the bare model with a DynamicCache and attention mask."""
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), logits_to_keep=1)
    stamps = [time.perf_counter()]
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        out = model(
            input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
            attention_mask=mask,
            position_ids=torch.tensor([[4 + i]]),
            past_key_values=out.past_key_values,
            logits_to_keep=1,
        )
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="adapters,load,long", help="comma-separated: adapters, load, long")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--load-requests", type=int, default=96, help="(d): requests in the open loop")
    parser.add_argument("--arrival-rate", type=float, default=40.0, help="(d): mean arrivals per second")
    parser.add_argument("--long-share", type=float, default=0.25, help="(d): the share of long requests")
    parser.add_argument("--max-batch-size", type=int, default=32, help="(d): the batcher's row limit")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="tuneforge-bench-serving-"))
    base_path = root / "base"
    size = {
        "seed": 0,
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "intermediate_size": args.hidden_size * 43 // 16,  # 1376 at 512 wide, as Llama sizes its MLP
    }
    make_tiny_llama(base_path, **size)
    adapter_ids = [f"ft:bench:a{i}:job{i}" for i in range(8)]
    paths = [make_adapter(base_path, root / f"a{i}", seed=i) for i in range(8)]
    targets = [Target(mid, "bench", base_path, path) for mid, path in zip(adapter_ids, paths, strict=True)]
    params = sum(p.numel() for p in load_model(base_path, torch.device("cpu")).parameters()) / 1e6
    print(
        f"model: {params:.1f}M parameters, {args.threads} threads; {args.repeats} rounds, ratios as "
        "min / median / max over rounds"
    )
    if "adapters" in parts:
        adapters_part(base_path, paths, targets, args)
    if "load" in parts:
        load_part(Engine(max_active_adapters=8, device=torch.device("cpu")), targets, args)
    if "long" in parts:
        long_path = root / "long"
        make_tiny_llama(long_path, **size, context=1100)
        long_part(long_path, args)


def adapters_part(
    base_path: Path, paths: list[Path], targets: list[Target], args: argparse.Namespace
) -> None:
    """(a), (b) and (c): mixed batches and merged weights."""
    engine = Engine(max_active_adapters=8, device=torch.device("cpu"))
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

    print(f"(a) {args.requests} requests x {args.new_tokens} new tokens over 8 adapters")
    print(f"    mixed batch          {tokens / t_mixed.median:8.1f} tok/s ({t_mixed.median:.2f} s)")
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
