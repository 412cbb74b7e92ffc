"""The scheduler: requests arrive on the event loop; one engine thread runs them in continuous batches.

The engine thread loops: it takes the requests that arrived (tokenized and checked at once, so each order
learns its prompt sizes or its error without waiting for a slot), admits waiting rows into the running
batches as far as the limits allow, prefills them, and runs one decode step of everything running. A
request that arrives mid-generation joins at the next step, and a finished row frees its slot at once; the
batching window (`window_s`) applies only when the engine is idle, to gather a burst into one prefill.

Limits: `max_batch_size` rows running in all; `project_max_rows` per project (0: none), so one tenant's
long requests cannot take every slot while another's wait; and the engine's `max_active` fine-tuned models
among running rows. Waiting rows are admitted oldest first, skipping those a limit holds back.

`continuous=False` is the static batching this server did before, kept for the benchmark: nothing joins a
batch once it runs, so a short request waits for the longest one ahead of it.

The event loop never runs a forward pass; answers go back through each order's asyncio queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from worker.serving.decode import Step
from worker.serving.engine import Engine, GenerationRequest, Prepared, adapter_name
from worker.serving.telemetry import BATCH_ROWS, CANCELLED_ROWS, GENERATED_TOKENS, QUEUE_WAIT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int


class Order:
    """One HTTP request's generations (one per prompt and choice), their answers interleaved in one queue.

    Await `accepted()` (prompt sizes, or the first generation's error), then iterate `steps()`; `cancel()`
    when the client leaves, and its rows leave the batch at the next step.
    """

    def __init__(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop) -> None:
        self.requests = requests
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Accepted | Step | BaseException]] = asyncio.Queue()
        self.prepared: list[Prepared] = []
        self.cancelled = False
        self.arrived = time.monotonic()

    def put(self, index: int, item: Accepted | Step | BaseException) -> None:
        """Deliver from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

    async def accepted(self) -> list[int]:
        """Each generation's prompt token count once all are checked; raises the error instead, if any."""
        counts: dict[int, int] = {}
        while len(counts) < len(self.requests):
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Accepted)
            counts[index] = item.prompt_tokens
        return [counts[i] for i in range(len(self.requests))]

    async def steps(self) -> AsyncIterator[tuple[int, Step]]:
        """(generation index, step) as the engine makes them, until every generation has finished."""
        running = len(self.requests)
        while running:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Step)
            yield index, item
            running -= item.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True
        for prepared in self.prepared:
            prepared.row.cancelled = True


class Batcher:
    """Serves orders on one engine thread: continuous batches within the row, project and adapter limits."""

    def __init__(
        self,
        engine: Engine,
        *,
        window_s: float = 0.015,
        max_batch_size: int = 32,
        project_max_rows: int = 0,
        continuous: bool = True,
    ) -> None:
        self.engine = engine
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self.project_max_rows = project_max_rows
        self.continuous = continuous
        self._arrived: deque[Order] = deque()  # appended on the event loop, taken on the engine thread
        self._wake = threading.Event()
        self._waiting: list[tuple[Order, int, Prepared]] = []  # engine thread only, oldest first
        self._owners: dict[int, tuple[Order, int]] = {}  # row id -> its order and generation index
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.prefills = 0  # prefill passes so far (rows admitted together share one): tests read it

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def submit(self, requests: list[GenerationRequest]) -> Order:
        """Queue an order's generations; the engine thread takes them at its next step."""
        order = Order(requests, asyncio.get_running_loop())
        self._arrived.append(order)
        self._wake.set()
        return order

    # --- the engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.running_rows() and not self._waiting:
                self._wake.wait()
                if self._stopping:
                    return
                time.sleep(self.window_s)  # idle: let a burst gather into one prefill
            self._wake.clear()
            self._take_arrivals()
            newcomers = self._loaded(self._admissible())
            if newcomers:
                self.prefills += 1
                self._run(partial(self.engine.admit, newcomers), [p.row.id for p in newcomers])
            running = self.engine.running_rows()
            if running:
                BATCH_ROWS.observe(len(running))
                self._run(self.engine.step, [row.id for row in running])

    def _take_arrivals(self) -> None:
        """Prepare every order that arrived: each learns its prompt sizes, or its error, now."""
        while self._arrived:
            order = self._arrived.popleft()
            if order.cancelled:
                continue
            try:
                prepared = [self.engine.prepare(request) for request in order.requests]
            except Exception as exc:  # a bad request fails alone, never its batch
                order.put(-1, exc)
                continue
            for index, item in enumerate(prepared):
                item.row.id = next(self._ids)
                self._owners[item.row.id] = (order, index)
                self._waiting.append((order, index, item))
                order.put(index, Accepted(len(item.row.prompt_ids)))
            order.prepared = prepared

    def _admissible(self) -> list[Prepared]:
        """The waiting rows that fit now, oldest first; the rest keep waiting."""
        running = self.engine.running_rows()
        if not self.continuous and running:
            return []
        slots = self.max_batch_size - len(running)
        per_project = Counter(row.project for row in running)
        in_use = self.engine.adapters_in_use()
        chosen, still_waiting = [], []
        for order, index, prepared in self._waiting:
            if order.cancelled:
                self._owners.pop(prepared.row.id, None)
                continue
            target, project = prepared.request.target, prepared.row.project
            name = adapter_name(target.model_id) if target.adapter_path is not None else None
            fits = (
                slots > 0
                and (not self.project_max_rows or per_project[project] < self.project_max_rows)
                and (name is None or name in in_use or len(in_use) < self.engine.max_active)
            )
            if not fits:
                still_waiting.append((order, index, prepared))
                continue
            chosen.append(prepared)
            slots -= 1
            per_project[project] += 1
            in_use |= {name} if name else set()
            QUEUE_WAIT.observe(time.monotonic() - order.arrived)
        self._waiting = still_waiting
        return chosen

    def _loaded(self, newcomers: list[Prepared]) -> list[Prepared]:
        """The newcomers whose fine-tuned models are loaded; one that fails to load fails its order alone,
        before it joins a batch whose other rows would otherwise fail with it."""
        pinned = self.engine.pinned(newcomers)
        loaded = []
        for prepared in newcomers:
            try:
                self.engine.ensure_adapter(prepared.request.target, pinned=pinned)
            except Exception as exc:
                log.exception("loading %s failed", prepared.request.target.model_id)
                order, index = self._owners.pop(prepared.row.id)
                order.put(index, exc)
                continue
            loaded.append(prepared)
        return loaded

    def _run(self, work: Callable[[], list[Step]], row_ids: list[int]) -> None:
        """Run an engine call and deliver its steps; if it fails, every row it touched hears why."""
        try:
            steps = work()
        except Exception as exc:
            log.exception("a batch of %d rows failed", len(row_ids))
            # The running batches' state is unknown now: they all end, and so do their rows' orders.
            touched = set(row_ids) | {row.id for row in self.engine.running_rows()}
            self.engine.abandon()
            for row_id in touched:
                owner = self._owners.pop(row_id, None)
                if owner is not None:
                    owner[0].put(owner[1], exc)
            return
        cancelled = sum(step.finish_reason == "cancelled" for step in steps)
        GENERATED_TOKENS.inc(len(steps) - cancelled)
        CANCELLED_ROWS.inc(cancelled)
        for step in steps:
            order, index = self._owners[step.row]
            order.put(index, step)
            if step.finish_reason is not None:
                del self._owners[step.row]
