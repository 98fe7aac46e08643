"""What an output's error is measured against: its scale, which sentinel values may not inflate,
and its non-finite values, which must match exactly.

An output's error is relative to its scale (max |value|): a bar of 1e-5 x the scale. Models
write sentinels into their outputs (masked logits at -1e9, -1e4 or ``finfo.min``; padding
boxes at -1): one -1e9 among logits of about 10 would make the allowed error 1e4, so a deploy
model with its classifier weights x1.5 would pass. So the finite elements are split into
groups, each judged against its own scale:

- a *sentinel group* is at most ``SENTINEL_VALUES`` distinct magnitudes (fills are constants;
  an additive -1e9 mask rounds the few logits under it to a few float32 values) lying at least
  ``SENTINEL_GAP`` times above every magnitude below them; groups are peeled off from the top
  while there is one;
- the *bulk* is what is left, zeros included.

Finding them costs one top-k pass over an ordinary output (its top values are distinct), and
one pass per distinct value (at most SENTINEL_VALUES + 1) over an output whose top values
repeat (fills, saturated activations).

An ordinary output (no such gap at its top) is one group: its bar is what it always was. A
model's outputs are continuous: a group of a few values a thousand times above all the others
is a sentinel (or an outlier that deserves its own scale, as the values under it do).

Non-finite values (inf, -inf, NaN) carry meaning too ("masked", "no box"): where either model
has one, both must have the same one, position by position. ``inf <= tolerance * inf`` holds,
so they cannot go through the scale-relative bar.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

# A group of at most this many distinct magnitudes ...
SENTINEL_VALUES = 8
# ... at least this many times above every magnitude below it is judged on its own scale.
SENTINEL_GAP = 1e3


def nonfinite_mismatches(expected: Tensor, got: Tensor,
                         *others: Tensor) -> tuple[Tensor | None, int]:
    """(where any of the tensors is not finite, or None where all are; how many of those
    positions ``got`` does not hold exactly ``expected``'s value: the same infinity, NaN where
    NaN)."""
    if all(bool(torch.isfinite(t).all()) for t in (expected, got, *others)):
        return None, 0
    where = ~torch.isfinite(expected) | ~torch.isfinite(got)
    for other in others:
        where |= ~torch.isfinite(other)
    same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
    return where, int((where & ~same).sum())


def sentinel_groups(values: Tensor, finite: Tensor | None) -> list[Tensor]:
    """Masks of the sentinel groups of ``values`` from the top down (empty for an ordinary
    output); the bulk is what no mask covers (zeros and non-finite values aside)."""
    magnitude = values.detach().abs().float().flatten()
    if finite is not None:
        magnitude = magnitude.masked_fill(~finite.flatten(), 0.0)
    groups: list[Tensor] = []
    while True:
        threshold = _sentinel_threshold(magnitude)
        if threshold is None:
            return groups
        group = magnitude >= threshold
        groups.append(group.view(values.shape))
        magnitude = magnitude.masked_fill(group, 0.0)  # the rest, searched again


def _sentinel_threshold(magnitude: Tensor) -> float | None:
    """The lowest magnitude of a sentinel group at the top of ``magnitude`` (non-negative,
    zeros ignored), or None. The top SENTINEL_VALUES + 1 elements decide when they are all
    distinct (an ordinary output: one pass); repeated values (fills) are peeled one distinct
    value per pass."""
    count = min(SENTINEL_VALUES + 1, magnitude.numel())
    top = torch.topk(magnitude, count).values.tolist() if count else []
    if len(set(top)) == len(top):
        return _first_gap(top)
    remaining, distinct = magnitude, []
    for _ in range(SENTINEL_VALUES + 1):
        value = float(remaining.max())
        distinct.append(value)
        if value == 0.0:
            break
        remaining = remaining.masked_fill(remaining >= value, 0.0)
    return _first_gap(distinct)


def _first_gap(distinct: list[float]) -> float | None:
    """The value above the first gap of SENTINEL_GAP in ``distinct`` (descending), among the
    first SENTINEL_VALUES, with a nonzero value below it."""
    for value, below in itertools.pairwise(distinct[:SENTINEL_VALUES + 1]):
        if below > 0.0 and value >= SENTINEL_GAP * below:
            return value
    return None
