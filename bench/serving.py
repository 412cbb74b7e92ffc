"""Serving benchmarks, printed as ratios measured in one process on the same model and requests.

    .venv/bin/python bench/serving.py [--requests 32] [--new-tokens 16] [--threads 2]

(a) Mixed-adapter batching: 8 LoRA adapters, N chat requests spread round-robin over them, greedy, a fixed
    number of new tokens. "mixed" serves all N in one batch through the engine (PEFT `adapter_names`).
    Two baselines serve the same requests one adapter at a time with `set_adapter`:
    "per-request" runs each request alone (switching adapter as needed, the plain way to serve several
    adapters without mixed batches); "per-adapter" batches each adapter's own requests together and
    runs the 8 batches one after another. Throughput is generated tokens per second; all three produce
    the same tokens (checked).
(b) Unmerged vs merged: the same requests, one at a time, for one adapter: through the engine's path
    (PeftModel holding all 8 adapters, the row routed with `adapter_names`) vs a model with that adapter
    merged into the weights (`merge_and_unload`). Latency is the mean time per request.

The model is a random Llama from make_tiny_llama, 512 wide, 4 blocks (about 13M parameters): big enough
that compute matters on 2 CPU cores, small enough to run in a couple of minutes. Timings are medians of
`--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from worker.serving.decode import Row, decode
from worker.serving.engine import Engine, GenerationRequest, Target, load_model
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


def timed(fn: Callable[[], list[str]], repeats: int) -> tuple[float, list[str]]:
    fn()  # warm-up
    times, out = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="tuneforge-bench-serving-"))
    base_path = root / "base"
    make_tiny_llama(base_path, seed=0, hidden_size=512, num_layers=4, intermediate_size=1376)
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

    t_mixed, r_mixed = timed(mixed, args.repeats)
    t_request, r_request = timed(per_request, args.repeats)
    t_adapter, r_adapter = timed(per_adapter, args.repeats)
    assert r_mixed == r_request == r_adapter

    print(
        f"model: {params:.1f}M parameters, {args.threads} threads; {args.requests} requests x "
        f"{args.new_tokens} new tokens over 8 adapters"
    )
    print(f"(a) mixed batch          {tokens / t_mixed:8.1f} tok/s ({t_mixed:.2f} s)")
    print(
        f"    per-request set_adapter {tokens / t_request:5.1f} tok/s ({t_request:.2f} s)"
        f"  -> mixed is {t_request / t_mixed:.2f}x the throughput"
    )
    print(
        f"    per-adapter batches  {tokens / t_adapter:8.1f} tok/s ({t_adapter:.2f} s)"
        f"  -> mixed is {t_adapter / t_mixed:.2f}x the throughput"
    )

    # (b) one adapter, the same requests one at a time: unmerged (engine path) vs merged weights
    first = [r for r in rows if r.adapter == rows[0].adapter]
    merged = PeftModel.from_pretrained(load_model(base_path, engine.device), str(paths[0])).merge_and_unload()
    merged.eval()

    def unmerged_one() -> list[str]:
        return [run_rows(model, tokenizer, [r], base.pad_id, mixed=True)[0] for r in first]

    def merged_one() -> list[str]:
        return [run_rows(merged, tokenizer, [r], base.pad_id, mixed=False)[0] for r in first]

    t_unmerged, _ = timed(unmerged_one, args.repeats)
    t_merged, _ = timed(merged_one, args.repeats)
    n = len(first)
    print(
        f"(b) unmerged adapter {1000 * t_unmerged / n:7.1f} ms/request, merged {1000 * t_merged / n:7.1f} "
        f"ms/request -> unmerged is {t_unmerged / t_merged:.2f}x the latency"
    )


if __name__ == "__main__":
    main()
