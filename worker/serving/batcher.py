"""The batcher: requests arrive concurrently on the event loop; a short window gathers them into batches.

After the first request of a round arrives the batcher waits `window_s` for more, then hands everything
pending to one worker thread, which groups requests by engine group (a base with its LoRA adapters, or
one model of its own), splits groups that exceed the batch size or the adapter limit, and runs the
batches one after another. Each request gets its own asyncio queue: first its prompt token count or
its error, then one `Step` per decode step. The event loop never runs a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from worker.serving.decode import Step
from worker.serving.engine import Engine, GenerationRequest, Prepared, adapter_name
from worker.serving.telemetry import BATCH_ROWS, GENERATED_TOKENS, QUEUE_WAIT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int


class Handle:
    """A submitted request: await `accepted()`, then iterate `steps()`; `cancel()` when the client leaves."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Accepted | Step | BaseException] = asyncio.Queue()
        self.prepared: Prepared | None = None
        self.cancelled = False
        self.arrived = time.monotonic()

    def put(self, item: Accepted | Step | BaseException) -> None:
        """Deliver from the worker thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def accepted(self) -> int:
        """The prompt's token count once the request is in a batch; raises the request's error instead."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Accepted)
        return item.prompt_tokens

    async def steps(self) -> AsyncIterator[Step]:
        """This request's steps up to and including the one that finishes it."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Step)
            yield item
            if item.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True
        if self.prepared is not None:
            self.prepared.row.cancelled = True


class Batcher:
    """Collects requests for `window_s`, then serves them in batches of at most `max_batch_size` rows."""

    def __init__(self, engine: Engine, *, window_s: float = 0.015, max_batch_size: int = 32) -> None:
        self.engine = engine
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self._inbox: asyncio.Queue[Handle] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-engine")
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0  # forward-pass batches so far: tests and metrics read it

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request for the next batch."""
        handle = Handle(request, asyncio.get_running_loop())
        self._inbox.put_nowait(handle)
        return handle

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._inbox.get()]
            await asyncio.sleep(self.window_s)
            while not self._inbox.empty():
                pending.append(self._inbox.get_nowait())
            await loop.run_in_executor(self._executor, self.serve, pending)

    def serve(self, handles: list[Handle]) -> None:
        """Prepare, group and generate (worker thread); every handle gets its answer or its error."""
        accepted: list[Handle] = []
        for handle in handles:
            if handle.cancelled:
                continue
            try:
                handle.prepared = self.engine.prepare(handle.request)
            except Exception as exc:  # a bad request fails alone, never its batch
                handle.put(exc)
                continue
            accepted.append(handle)
            QUEUE_WAIT.observe(time.monotonic() - handle.arrived)
            handle.put(Accepted(len(handle.prepared.row.prompt_ids)))
        groups: dict[str, list[Handle]] = {}
        for handle in accepted:
            assert handle.prepared is not None
            groups.setdefault(handle.prepared.group, []).append(handle)
        for members in groups.values():
            for batch in self._split(members):
                self._generate(batch)

    def _split(self, members: list[Handle]) -> list[list[Handle]]:
        """Batches of at most max_batch_size rows, each naming at most max_active adapters."""
        batches: list[list[Handle]] = []
        current: list[Handle] = []
        names: set[str] = set()
        for handle in members:
            target = handle.request.target
            name = adapter_name(target.model_id) if target.adapter_path is not None else None
            new_names = names | ({name} if name else set())
            if current and (len(current) >= self.max_batch_size or len(new_names) > self.engine.max_active):
                batches.append(current)
                current, new_names = [], {name} if name else set()
            current.append(handle)
            names = new_names
        if current:
            batches.append(current)
        return batches

    def _generate(self, batch: list[Handle]) -> None:
        self.batches_run += 1
        BATCH_ROWS.observe(len(batch))
        try:
            for steps in self.engine.generate([h.prepared for h in batch if h.prepared is not None]):
                GENERATED_TOKENS.inc(len(steps))
                for step in steps:
                    batch[step.row].put(step)
        except Exception as exc:  # the batch failed as a whole: tell each of its requests
            log.exception("batch of %d requests failed", len(batch))
            for handle in batch:
                handle.put(exc)
