"""Continuous batching (worker/serving/decode.py, batcher.py): rows join and leave a running batch at any
step, the scheduler lets short requests past long ones and holds each project to its share, text comes out
incrementally, and penalties and logit bias shape sampling as OpenAI defines them.

The engine and batcher run for real on tiny-llama with seeded random LoRA adapters (tests/test_serving.py);
orderings, not clocks, are what the scheduler tests assert.
"""

import asyncio
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tests.test_serving import QUESTIONS, adapters, base_folder, chat, run, target  # noqa: F401
from worker.serving.batcher import Batcher, Order
from worker.serving.decode import Detokenizer, Row, _RowState
from worker.serving.engine import Engine, GenerationRequest

LONG = 300  # tokens a "long" request generates; with its end-of-sequence token banned, it runs to them all


def no_eos(engine: Engine, base: Path) -> dict[int, float]:
    """A logit bias that bans the end-of-sequence tokens, so a row runs to its max_tokens."""
    return dict.fromkeys(engine.base("serving-tiny", base).eos_ids, -100.0)


def test_rows_join_and_leave_mid_generation_and_answer_as_alone(
    base_folder: Path,  # noqa: F811
    adapters: dict[str, Path],  # noqa: F811
) -> None:
    """Rows admitted at different steps, for different adapters and the base, with different prompt lengths
    and budgets, each get exactly the tokens they get alone; the cache never outgrows its longest row."""
    engine = Engine()
    (id0, p0), (id1, p1) = list(adapters.items())[:2]
    ban = no_eos(engine, base_folder)
    requests = [
        chat(target(base_folder, id0, p0), QUESTIONS[0], max_tokens=30, logit_bias=ban),
        chat(target(base_folder), QUESTIONS[3] * 3, max_tokens=12, logit_bias=ban),  # the longest prompt
        chat(target(base_folder, id1, p1), QUESTIONS[4], max_tokens=5, logit_bias=ban),
    ]
    alone = [run(engine, [r])[0] for r in requests]

    prepared = [engine.prepare(r) for r in requests]
    for index, p in enumerate(prepared):
        p.row.id = index
    texts, finish, tokens = ["", "", ""], [None, None, None], [0, 0, 0]
    joins = {0: [prepared[0]], 4: [prepared[1]], 7: [prepared[2]]}  # step -> rows that join then
    step = 0
    while step == 0 or engine.running_rows():
        steps = engine.admit(joins[step]) if step in joins else []
        steps += engine.step()
        for s in steps:
            texts[s.row] += s.text
            finish[s.row], tokens[s.row] = s.finish_reason, s.completion_tokens
        for batch in engine._batches.values():
            longest = max(len(s.row.prompt_ids) + len(s.tokens) for s in batch.states)
            assert batch.attention.shape[1] == longest - 1  # the last sampled token is not in the cache yet
        step += 1
    together = [
        (t, f, len(p.row.prompt_ids), n) for t, f, p, n in zip(texts, finish, prepared, tokens, strict=True)
    ]
    assert together == alone
    assert [tokens for *_, tokens in alone] == [30, 12, 5]


def serve(batcher: Batcher, plan: list[tuple[str, GenerationRequest, str | None]]) -> list[tuple[str, str]]:
    """Submit each (name, request, after) once the order named `after` has produced its first token (None:
    at once); return the (event, name) sequence: 'first' and 'done' per order, in the order they happened."""

    async def main() -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        started = {name: asyncio.Event() for name, *_ in plan}
        batcher.start()

        async def one(name: str, request: GenerationRequest, after: str | None) -> None:
            if after is not None:
                await started[after].wait()
            order: Order = batcher.submit([request])
            await order.accepted()
            async for _, step in order.steps():
                if not started[name].is_set():
                    events.append(("first", name))
                    started[name].set()
                if step.finish_reason is not None:
                    events.append(("done", name))

        try:
            await asyncio.gather(*(one(*item) for item in plan))
        finally:
            await batcher.stop()
        return events

    return asyncio.run(main())


def test_a_short_request_passes_a_long_one_that_started_first(base_folder: Path) -> None:  # noqa: F811
    """Continuous: a short request arriving mid-generation joins at once and finishes long before the long
    one; static batching (what the server did before) makes it wait for the long one to end."""
    engine = Engine()
    ban = no_eos(engine, base_folder)
    long = chat(target(base_folder), QUESTIONS[0], max_tokens=LONG, logit_bias=ban)
    short = chat(target(base_folder), QUESTIONS[1], max_tokens=4, logit_bias=ban)
    plan = [("long", long, None), ("short", short, "long")]

    continuous = serve(Batcher(engine, window_s=0), plan)
    assert continuous.index(("done", "short")) < continuous.index(("done", "long")), continuous
    static = serve(Batcher(engine, window_s=0, continuous=False), plan)
    assert static.index(("first", "short")) > static.index(("done", "long")), static


def test_a_project_at_its_row_limit_waits_while_others_run(base_folder: Path) -> None:  # noqa: F811
    """With one row per project, a project's second request waits for its first to finish, while another
    project's request, submitted after it, runs at once."""
    engine = Engine()
    ban = no_eos(engine, base_folder)

    def request(project: str, max_tokens: int) -> GenerationRequest:
        return chat(target(base_folder), "Hi", max_tokens=max_tokens, logit_bias=ban, project=project)

    plan = [
        ("alpha-long", request("alpha", 60), None),
        ("alpha-short", request("alpha", 4), "alpha-long"),
        ("beta-short", request("beta", 4), "alpha-long"),
    ]
    events = serve(Batcher(engine, window_s=0, project_max_rows=1), plan)
    assert events.index(("done", "alpha-long")) < events.index(("first", "alpha-short")), events
    assert events.index(("done", "beta-short")) < events.index(("done", "alpha-long")), events
    uncapped = serve(Batcher(engine, window_s=0), plan)
    assert uncapped.index(("done", "alpha-short")) < uncapped.index(("done", "alpha-long")), uncapped


def test_text_comes_out_incrementally_whole_characters_and_stops_across_tokens(
    base_folder: Path,  # noqa: F811
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    text = "Café 🎉 世界, naïve résumé. Stop words here — done! " * 30
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000 and any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # bytes of a character
    detokenizer = Detokenizer(tokenizer, [])
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in piece for piece in pieces)
    # Each step decodes a window of a few tokens, never the whole answer: no quadratic cost.
    assert len(detokenizer.ids) - detokenizer.prefix < 8

    stop = "ords here"  # spans several tokens
    state = _RowState(Row(prompt_ids=[1], max_tokens=len(ids), stop=[stop]), tokenizer, torch.device("cpu"))
    emitted, finish = [], None
    for token in ids:
        delta, finish = state.advance(token, eos_ids=set())
        emitted.append(delta)
        if finish:
            break
    assert "".join(emitted) == text[: text.index(stop)] and finish == "stop"


def test_penalties_and_logit_bias_shape_greedy_choices(base_folder: Path) -> None:  # noqa: F811
    """Each greedy choice under a presence penalty is the best of the model's own log-probabilities minus
    the penalty for tokens already said; a +100 bias forces its token."""
    engine = Engine()
    t = target(base_folder)
    plain = engine.prepare(chat(t, "Hi", max_tokens=24, logprobs=20))
    penalized = engine.prepare(chat(t, "Hi", max_tokens=24, logprobs=20, presence_penalty=2.0))

    def logprobs_of(prepared: object) -> list:
        return [s.logprob for steps in engine.generate([prepared]) for s in steps if s.logprob]  # type: ignore[list-item]

    said: set[int] = set()
    chosen = logprobs_of(penalized)
    for entry in chosen:
        best = max(entry.top, key=lambda alt: alt[2] - 2.0 * (alt[0] in said))
        assert entry.id == best[0], (entry, said)
        said.add(entry.id)
    assert [e.id for e in chosen] != [e.id for e in logprobs_of(plain)]  # the penalty changed something

    tokenizer = engine.base("serving-tiny", base_folder).tokenizer
    word = tokenizer(" hello", add_special_tokens=False)["input_ids"][0]
    text, *_ = run(engine, [chat(t, "Hi", max_tokens=5, logit_bias={word: 100.0})])[0]
    assert text == tokenizer.decode([word] * 5)


def test_a_model_that_fails_to_load_fails_its_request_alone(
    base_folder: Path,  # noqa: F811
    adapters: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """An adapter whose weights are unreadable fails its own request; the generation already running goes on
    to its end, unharmed."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(next(iter(adapters.values())), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine = Engine()
    running = chat(target(base_folder), QUESTIONS[0], max_tokens=40, logit_bias=no_eos(engine, base_folder))
    alone = run(engine, [running])[0][0]

    async def main() -> tuple[str, BaseException | None]:
        batcher = Batcher(engine, window_s=0)
        batcher.start()
        try:
            first = batcher.submit([running])
            await first.accepted()
            texts, failure = [], None
            async for _, step in first.steps():
                texts.append(step.text)
                if len(texts) == 2:  # mid-generation: the broken one arrives
                    second = batcher.submit(
                        [chat(target(base_folder, "ft:serving-tiny:broken:j9", broken), "Hi")]
                    )
                    await second.accepted()
                    try:
                        async for _ in second.steps():
                            pass
                    except Exception as exc:
                        failure = exc
            return "".join(texts), failure
        finally:
            await batcher.stop()

    text, failure = asyncio.run(main())
    assert failure is not None and text == alone
