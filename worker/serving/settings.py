"""The inference server's settings, read from the environment (to move into app.config.Settings)."""

import os
from dataclasses import dataclass

SECRET_VARIABLE = "TUNEFORGE_INFERENCE_SECRET"
MIN_SECRET_LENGTH = 16
"""Shorter secrets are refused: a placeholder such as 'secret' or 'changeme' must never guard the server."""


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
    inference_secret: str
    """The shared secret the API sends as `Authorization: Bearer <secret>`; every request but /healthz
    without it is refused. The API reads the same variable, so one setting configures both."""


def serving_settings() -> ServingSettings:
    """TUNEFORGE_MAX_ACTIVE_ADAPTERS (8), TUNEFORGE_BATCH_WINDOW_MS (15), TUNEFORGE_MAX_BATCH_SIZE (32),
    TUNEFORGE_MERGE_SINGLE_ADAPTER (1), TUNEFORGE_INFERENCE_SECRET (no default)."""
    return ServingSettings(
        max_active_adapters=int(os.environ.get("TUNEFORGE_MAX_ACTIVE_ADAPTERS", "8")),
        batch_window_ms=float(os.environ.get("TUNEFORGE_BATCH_WINDOW_MS", "15")),
        max_batch_size=int(os.environ.get("TUNEFORGE_MAX_BATCH_SIZE", "32")),
        merge_single_adapter=os.environ.get("TUNEFORGE_MERGE_SINGLE_ADAPTER", "1").lower()
        not in ("0", "false", "no"),
        inference_secret=os.environ.get(SECRET_VARIABLE, ""),
    )


def secret_problem(secret: str) -> str | None:
    """Why `secret` cannot guard the inference server, or None when it can."""
    if not secret:
        return f"{SECRET_VARIABLE} is not set"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"{SECRET_VARIABLE} is shorter than {MIN_SECRET_LENGTH} characters"
    return None
