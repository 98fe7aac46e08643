"""Sentinels and non-finite values in outputs (repconv.verify.scales, compare_output): a few
values far above the rest are judged on their own scale, so a masked -1e9 cannot make the
allowed error 1e4; inf and NaN must match exactly; an ordinary output is judged as before."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from repconv.verify.reference import compare_output, error_of
from repconv.verify.scales import SENTINEL_GAP, nonfinite_mismatches, sentinel_groups


def _logits(fill: float, batch: int = 2) -> tuple[Tensor, Tensor]:
    """Float32 logits with the last 5 of 10 masked by ``fill``, and their float64 run."""
    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(batch, 10, generator=generator, dtype=torch.float64) * 3
    exact[:, 5:] = fill
    return exact.float(), exact


def _compare(expected: Tensor, got: Tensor, exact: Tensor | None) -> object:
    return compare_output("output[0]", expected, got, exact, rtol=1e-5, atol=0.0,
                          noise_factor=8.0)


@pytest.mark.parametrize("fill", [-1e9, -1e4, torch.finfo(torch.float32).min])
def test_masked_logits_are_judged_on_the_logits_scale(fill: float) -> None:
    expected, exact = _logits(fill)
    (group,) = sentinel_groups(exact, None)
    assert int(group.sum()) == 10 and bool(group[:, 5:].all())
    assert _compare(expected, expected.clone(), exact).passed
    perturbed = expected.clone()
    perturbed[:, :5] *= 1.0001  # 1e-4 of the logits: 1e-13 of the sentinel
    result = _compare(expected, perturbed, exact)
    assert not result.passed and result.sentinels == 10
    assert 5e-5 < result.reference_error < 2e-4 and result.tolerance == 1e-5
    # the single scale the sentinel sets would have let it through
    assert error_of(exact, perturbed)[1] < 1e-5


def test_additive_mask_rounding_stays_within_its_own_scale() -> None:
    """logits - 1e9 in float32 round to a few values 64 apart: judged on their own scale,
    that rounding is noise; the logits are judged on theirs."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    exact = logits - 1e9 * (torch.arange(10) >= 5)
    expected = exact.float()
    assert _compare(expected, expected.clone(), exact).passed
    scaled = exact.clone()
    scaled[:, :5] *= 1.5
    assert not _compare(expected, scaled.float(), exact).passed


def test_an_ordinary_output_is_one_group_and_judged_as_before() -> None:
    generator = torch.Generator().manual_seed(2)
    exact = torch.randn(4, 64, 8, 8, generator=generator, dtype=torch.float64)
    exact[0, 0, 0, 0] = 40.0  # an outlier, within SENTINEL_GAP of the rest
    expected = exact.float()
    got = (exact * (1 + 3e-6)).float()
    assert sentinel_groups(exact, None) == []
    result = _compare(expected, got, exact)
    ref_rel = error_of(exact, got)[1]
    assert result.reference_error == ref_rel and result.max_abs_error == error_of(expected, got)[0]
    assert result.noise == error_of(exact, expected)[1] and result.sentinels == 0


def test_a_value_just_under_the_gap_is_no_sentinel() -> None:
    exact = torch.tensor([[1.0, 0.5, 0.25, SENTINEL_GAP * 0.99]], dtype=torch.float64)
    assert sentinel_groups(exact, None) == []
    exact[0, 3] = SENTINEL_GAP
    (group,) = sentinel_groups(exact, None)
    assert group.tolist() == [[False, False, False, True]]


def test_more_distinct_values_than_sentinels_are_no_group() -> None:
    """Nine distinct large values above the rest are data, not fills."""
    exact = torch.cat([torch.arange(1, 10, dtype=torch.float64) * 1e9, torch.ones(20)])
    assert sentinel_groups(exact, None) == []
    assert len(sentinel_groups(exact[1:], None)) == 1  # eight are


@pytest.mark.parametrize("expected, got, mismatches", [
    ([-math.inf, 1.0], [-math.inf, 1.0], 0),
    ([math.nan, 1.0], [math.nan, 1.0], 0),
    ([-math.inf, 1.0], [math.inf, 1.0], 1),
    ([-math.inf, 1.0], [-1e30, 1.0], 1),
    ([math.nan, 1.0], [0.0, 1.0], 1),
    ([2.0, 1.0], [math.inf, 1.0], 1),
])
def test_non_finite_values_match_exactly(expected: list[float], got: list[float],
                                         mismatches: int) -> None:
    a, b = torch.tensor(expected), torch.tensor(got)
    assert nonfinite_mismatches(a, b)[1] == mismatches
    result = _compare(a, b, a.double())
    assert result.passed is (mismatches == 0)
    assert result.nonfinite_mismatches == mismatches
    if mismatches:
        assert result.max_abs_error == math.inf and result.margin == math.inf
