"""fp16/bf16 models and the per-rewrite table's reference.

Outputs: a correct fold of a deep fp16/bf16 network errs, against the original run in float64,
by the rounding of its fused weights to the dtype amplified through the depth: far above the
fixed floors (5e-3, 2e-2), a small fraction of the original's float32 noise scaled to the
dtype's unit. Rewrites: each fused conv is compared with the replaced ops run in float64 (their
own float32 rounding is not the fused conv's), and fp16/bf16 rows are also held to what
rounding each weight to the dtype could do, which is what catches a wide conv x1.02."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.noisy_models import deep_conv_bn
from torch import Tensor, nn

import repconv
from repconv.verify.inputs import random_inputs
from repconv.verify.outputs import (
    LOW_PRECISION_NOISE_FACTOR,
    UPCAST_RTOL,
    verify,
)
from repconv.verify.reference import FLOAT64, ORIGINAL
from repconv.verify.report import UNIT_RATIO, VerifyReport
from repconv.verify.rewrites import ROUNDING_SIGMAS, RewriteCheck

VARY = ("batch", "spatial")
SCALE = {torch.float16: 1.01, torch.bfloat16: 1.02}  # issue 9's tampering, per dtype


def _x(size: int, dtype: torch.dtype = torch.float32, channels: int = 3) -> Tensor:
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))
    return x.to(dtype)


def _check(model: nn.Module, result: repconv.FuseResult, deployed: nn.Module, x: Tensor,
           vary: tuple[str, ...] = VARY) -> VerifyReport:
    """As `repconv fuse` verifies: upcast, with the per-rewrite table."""
    return verify(model, deployed, x, trials=1, vary=vary, upcast=True, rewrites=RewriteCheck(
        result.model, result.originals, result.report.rewrites, deployed))


def _scaled(result: repconv.FuseResult, path: str, factor: float) -> nn.Module:
    broken = copy.deepcopy(result.model)
    with torch.no_grad():
        broken.get_submodule(path).weight.mul_(factor)
    return broken


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_deep_low_precision_fold_passes_and_one_scaled_conv_fails(dtype: torch.dtype) -> None:
    model = deep_conv_bn(depth=6, offset=30.0, seed=0, size=20).to(dtype)
    x = _x(20, dtype)
    result = repconv.fuse(model, x, check=False)
    assert len(result.originals) == 6
    clean = _check(model, result, result.model, x)
    assert clean.passed, clean.summary()
    assert clean.reference == FLOAT64 and clean.noise_unit_ratio == UNIT_RATIO[dtype]
    assert {torch.float16: 2.0 ** 13, torch.bfloat16: 2.0 ** 16} == UNIT_RATIO
    assert LOW_PRECISION_NOISE_FACTOR == 2.0
    assert clean.noise_factor == LOW_PRECISION_NOISE_FACTOR * UNIT_RATIO[dtype]
    assert "noise_unit_ratio" not in clean.to_dict()  # a view, derived from dtype
    for run in clean.runs:
        (output,) = run.outputs
        assert output.noise is not None and 1e-5 < output.noise < 5e-5  # float32 noise
        scaled = output.noise * UNIT_RATIO[dtype]
        # it errs by a fraction of the noise
        assert 0.02 < output.reference_error / scaled < 0.5
        assert output.tolerance == pytest.approx(LOW_PRECISION_NOISE_FACTOR * scaled)
    # the fixed floor would refuse this correct fold
    assert clean.runs[0].outputs[0].reference_error > 1.5 * UPCAST_RTOL[dtype]
    assert f"x {UNIT_RATIO[dtype]:g} ({str(dtype)[6:]}'s unit)" in clean.summary()
    assert all(r.passed and r.reference == FLOAT64 for r in clean.rewrite_errors)
    assert max(r.rounding_sigmas or 0.0 for r in clean.rewrite_errors) < ROUNDING_SIGMAS / 2
    # the old fixed floor, asked for explicitly, still refuses it
    assert not verify(model, result.model, x, trials=1, upcast=True,
                      rtol=UPCAST_RTOL[dtype]).passed

    middle = list(result.originals)[2]
    report = _check(model, result, _scaled(result, middle, SCALE[dtype]), x, ())
    assert not report.passed
    (row,) = [r for r in report.rewrite_errors if not r.passed]
    assert row.fused_module == middle and row.rounding_sigmas is not None
    assert row.rounding_sigmas > 1.4 * ROUNDING_SIGMAS
    assert f"{middle} (" in report.rewrite_summary()
    assert "sigma of rounding" in report.rewrite_summary()
    if dtype == torch.bfloat16:  # under the worst-case bound: only the rounding bound sees it
        assert row.magnitude_error < report.rewrite_rtol


def _wide_conv_bn(dtype: torch.dtype) -> nn.Sequential:
    """One 3x3 conv over 256 channels (2,304 terms an element), BN with real statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 32, 3, padding=1), nn.BatchNorm2d(32))
    with torch.no_grad():
        model[1].running_mean.normal_(0.0, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0.0, 0.3)
    return model.eval().to(dtype)


def test_a_wide_bf16_conv_x1_02_is_within_the_worst_case_bound_but_fails() -> None:
    model = _wide_conv_bn(torch.bfloat16)
    x = _x(8, torch.bfloat16, channels=256)
    result = repconv.fuse(model, x, check=False)
    clean = _check(model, result, result.model, x, ())
    (row,) = clean.rewrite_errors
    assert clean.passed and row.rounding_sigmas is not None and row.rounding_sigmas < 5
    report = _check(model, result, _scaled(result, row.fused_module, 1.02), x, ())
    (row,) = report.rewrite_errors
    assert not report.passed and not row.passed
    assert row.magnitude_error < report.rewrite_rtol == 4e-3  # sum |w * x| hides it
    assert row.rounding_sigmas is not None and row.rounding_sigmas > 2 * ROUNDING_SIGMAS


def _offset_conv_bn() -> nn.Sequential:
    """A conv-BN whose BN running mean (3e4) dwarfs the conv's output (~1), with a bias that
    adds it back: float32 rounds (y - mean) at 3e4 * 6e-8 ~ 2e-3, the fused conv (bias
    ~1) does not. MobileOne's `stages.1.14` does this through cancelling branches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(3e4).add_(torch.randn(8))
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        bn.bias.copy_(bn.running_mean * scale + torch.randn(8))
    return model.eval()


def test_a_rewrite_is_compared_with_the_replaced_ops_in_float64() -> None:
    model = _offset_conv_bn()
    x = _x(16)
    result = repconv.fuse(model, x, check=False)
    report = _check(model, result, result.model, x, ())
    (row,) = report.rewrite_errors
    assert report.passed, report.rewrite_summary()
    assert row.reference == FLOAT64 and row.noise is not None and row.rounding_sigmas is None
    # the replaced ops' own float32 rounding is over the bound; the fused conv's is not
    assert row.noise > 2 * report.rewrite_rtol
    assert row.magnitude_error < 1e-6
    # measured independently on the input it ran (the first seeded one): the float32 ops
    # against the float64 ones, over the magnitude
    conv = result.model.get_submodule(row.fused_module)
    (x,) = random_inputs((x,), 0)
    with torch.no_grad():
        ops = result.originals[row.fused_module]
        exact = copy.deepcopy(ops).double()(x.double())
        magnitude = nn.functional.conv2d(x.abs(), conv.weight.abs(), conv.bias.abs(),
                                         padding=1).double()
        noise = float(((ops(x).double() - exact).abs() / magnitude).max())
    assert row.noise == pytest.approx(noise, rel=1e-3)

    report = _check(model, result, _scaled(result, row.fused_module, 1.001), x, ())
    (row,) = report.rewrite_errors
    assert not report.passed and not row.passed and row.magnitude_error > 2 * 1e-4
    assert report.rewrite_summary().startswith("1 of 1 rewrite(s) differ from the ops they "
                                               "replaced by more than 1e-04: ")


class _NoDouble(nn.Module):
    """Replaced ops without a float64 kernel."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:
            raise RuntimeError('"bn" not implemented for \'Double\'')
        return self.inner(x)


def test_replaced_ops_without_float64_are_compared_as_run() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = _x(8)
    result = repconv.fuse(model, x, check=False)
    originals = {path: _NoDouble(ops) for path, ops in result.originals.items()}
    check = RewriteCheck(result.model, originals, result.report.rewrites, result.model)
    report = verify(model, result.model, x, trials=1, upcast=True, rewrites=check)
    (row,) = report.rewrite_errors
    assert report.passed and row.reference == ORIGINAL and row.noise is None
    assert row.magnitude_error < 1e-6
    assert row.reference_note == ("the replaced ops do not run in float64 (\"bn\" not "
                                  "implemented for 'Double')")
