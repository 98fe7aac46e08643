"""Shared timing helper for the benchmarks.

Models being compared run interleaved, round by round, and each gets the median of its rounds:
a burst of load from elsewhere on the machine then slows all of them alike instead of skewing
one ratio. Each round starts one model later than the round before: always running first (or
right after the same model) moved a small model's median by 1-2% against a copy of itself.

A process that imports this module keeps the memory it frees from then on (`keep_freed_memory`,
as the repconv command does for its own process, so fuse times measured there are the
command's). With the C library's defaults, a model's activations come from fresh pages or from
blocks the model before it freed, depending on that model, and a latency measured the kernel
zeroing pages as much as the model. The RepVGGBlock network of `deploy_speed.py` (batch 16,
64px), fused and hand-written with the very same convs, interleaved with the unfused one: 12.7
against 17.7 ms (0.72) with the defaults, 8.3 against 8.3 ms with freed memory kept.

Each timed call follows an untimed call of the same model, so it finds its own data in the
caches rather than what the model before it left: the DBBWithInnerBN network's fused form after
its unfused one (58 ms) took 8.9 ms against 8.4 ms for the hand-written form with the same convs,
which follows it less often; 8.1 and 8.1 ms each after itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from repconv.formats.syscalls import keep_freed_memory

keep_freed_memory()

# for the results' headers: what each timed call follows, and the memory it finds
HOW = "each timed call right after an untimed one of the same model, freed memory kept"


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
            models[name](*inputs)  # the caches hold this model's data, not the last one's
            sync()
            start = time.perf_counter()
            models[name](*inputs)
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
