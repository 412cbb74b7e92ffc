"""The inference server's settings, read from the environment (to move into app.config.Settings)."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServingSettings:
    max_active_adapters: int
    """Fine-tuned models kept loaded at once; the least recently used is evicted beyond this."""
    batch_window_ms: float
    """How long the batcher waits after a request arrives to gather others into the same batch."""
    max_batch_size: int
    """Most rows in one batch; more requests wait for the next one."""
    merge_single_adapter: bool
    """Serve runs of one adapter on merged weights (faster; one extra copy of the adapted weights)."""


def serving_settings() -> ServingSettings:
    """TUNEFORGE_MAX_ACTIVE_ADAPTERS (8), TUNEFORGE_BATCH_WINDOW_MS (15), TUNEFORGE_MAX_BATCH_SIZE (32),
    TUNEFORGE_MERGE_SINGLE_ADAPTER (1)."""
    return ServingSettings(
        max_active_adapters=int(os.environ.get("TUNEFORGE_MAX_ACTIVE_ADAPTERS", "8")),
        batch_window_ms=float(os.environ.get("TUNEFORGE_BATCH_WINDOW_MS", "15")),
        max_batch_size=int(os.environ.get("TUNEFORGE_MAX_BATCH_SIZE", "32")),
        merge_single_adapter=os.environ.get("TUNEFORGE_MERGE_SINGLE_ADAPTER", "1").lower()
        not in ("0", "false", "no"),
    )
