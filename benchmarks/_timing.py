"""Shared timing helper for the benchmarks.

Models being compared run interleaved, round by round, and each gets the median of its rounds:
a burst of load from elsewhere on the machine then slows all of them alike instead of skewing
one ratio. Each round starts one model later than the round before: always running first (or
right after the same model) moved a small model's median by 1-2% against a copy of itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_ms(
    models: dict[str, Callable[..., object]],
    *inputs: object,
    warmup: int = 5,
    rounds: int = 30,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median milliseconds per call of each model on ``inputs``."""
    for model in models.values():
        for _ in range(warmup):
            model(*inputs)
    sync()
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            models[name](*inputs)
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
