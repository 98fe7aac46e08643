"""ConvTranspose followed by BN: BN scales the *output* axis, weight dim 1 within each group."""

from __future__ import annotations

import pytest
import torch
from helpers.measure import rel_err
from helpers.reference_blocks import randomize_bn
from torch import nn

import repconv
from repconv.fold.slot import is_identity_slot

_LAYERS = {
    1: (nn.ConvTranspose1d, nn.BatchNorm1d),
    2: (nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.ConvTranspose3d, nn.BatchNorm3d),
}


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_bn_folds_with_groups(nd: int, groups: int) -> None:
    conv_t, bn = _LAYERS[nd]
    model = randomize_bn(nn.Sequential(
        conv_t(8, 12, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=nd != 2),
        bn(12),
        nn.ReLU(),
    ), seed=nd * 10 + groups)
    x = torch.randn(2, 8, *([5] * nd))
    result = repconv.fuse(model, x)
    modules = [type(m) for m in result.model.modules() if not is_identity_slot(m)]
    assert modules.count(bn) == 0
    assert modules.count(conv_t) == 1
    fresh = torch.randn(3, 8, *([4] * nd))
    with torch.no_grad():
        assert rel_err(model(fresh), result.model(fresh)) < 1e-5


def test_bn_before_conv_transpose_is_refused_with_reason() -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3, 2)), seed=3)
    x = torch.randn(1, 4, 6, 6)
    result = repconv.fuse(model, x)
    reasons = [s.reason for s in result.report.skipped]
    assert any("transposed conv folds only with a BN or channel scale after it" in r
               for r in reasons), reasons
    assert result.report.after.batchnorms == 1
    assert result.report.verification.passed


def test_conv_transpose_in_a_branch_sum_is_refused() -> None:
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 1)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(x) + self.conv(x)

    result = repconv.fuse(TwoBranches().eval(), torch.randn(1, 4, 5, 5))
    assert any("transposed conv" in s.reason for s in result.report.skipped)
    assert result.report.verification.passed
