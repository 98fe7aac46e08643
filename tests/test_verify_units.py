"""The pieces of verification: which sizes are tried, running low-precision models in float32
and putting their tensors back exactly, a fused model refusing a size."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from repconv.verify.inputs import _other_size, varied_shapes
from repconv.verify.outputs import REWRITE_RTOL, verify
from repconv.verify.reference import computed_in


@pytest.mark.parametrize("size, other", [(224, 160), (32, 64), (16, 32), (64, 32), (17, 12),
                                         (96, 64), (2, 2)])
def test_other_size_keeps_the_alignment(size: int, other: int) -> None:
    assert _other_size(size) == other


def test_varied_shapes() -> None:
    """Batch 2; a smaller size with the example's alignment, an odd one and a larger one:
    max(2n, 128) aligned, unless that is more than 16x the elements (then 2n)."""
    assert varied_shapes([[1, 3, 224, 224]], ("batch", "spatial")) == [
        ("batch 2", [[2, 3, 224, 224]]), ("spatial 160x160", [[1, 3, 160, 160]]),
        ("spatial 113x113", [[1, 3, 113, 113]]), ("spatial 448x448", [[1, 3, 448, 448]])]
    assert varied_shapes([[1, 3, 32, 32]], ("spatial",)) == [
        ("spatial 64x64", [[1, 3, 64, 64]]), ("spatial 17x17", [[1, 3, 17, 17]]),
        ("spatial 128x128", [[1, 3, 128, 128]])]
    assert varied_shapes([[1, 3, 17, 17]], ("spatial",)) == [
        ("spatial 12x12", [[1, 3, 12, 12]]), ("spatial 9x9", [[1, 3, 9, 9]]),
        ("spatial 34x34", [[1, 3, 34, 34]])]
    assert varied_shapes([[2, 3, 32]], ("batch",)) == [("batch 1", [[1, 3, 32]])]
    assert varied_shapes([[4, 10]], ("batch", "spatial")) == [("batch 2", [[2, 10]])]
    assert varied_shapes([[1, 3, 2, 2]], ("spatial",)) == []


def test_computed_in_upcasts_and_restores_exactly() -> None:
    conv = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    view = conv.weight.data[0]  # storage sharing must survive
    shared = nn.Sequential(conv, nn.BatchNorm2d(4).to(torch.bfloat16)).eval()
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    with computed_in(torch.float32, shared, shared):  # listed twice: upcast once
        assert {t.dtype for t in shared.state_dict().values() if t.is_floating_point()} == {
            torch.float32}
        shared(torch.randn(1, 3, 8, 8))
    after = shared.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert view.data_ptr() == conv.weight.data_ptr()


class _FixedSize(nn.Module):
    """Refuses any size but 8x8, as an exported program with a fixed size does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 8:
            raise RuntimeError("Guard failed: x.size()[3] == 8")
        return self.conv(x)


def test_a_fused_model_refusing_a_size_fails_unless_lenient() -> None:
    original = _FixedSize().conv
    fused = _FixedSize()
    fused.conv = original
    x = torch.randn(1, 3, 8, 8)
    strict = verify(original, fused, x, trials=1, vary=("batch", "spatial"))
    assert not strict.passed and "fails on inputs of shape [[1, 3, 16, 16]]" in strict.problem
    lenient = verify(original, fused, x, trials=1, vary=("batch", "spatial"),
                     lenient=("spatial",))
    assert lenient.passed and [r.source for r in lenient.runs] == ["example", "batch 2"]
    assert "does not accept this size" in lenient.skipped_runs[0].reason


def test_rewrite_table_allows_the_rounding_of_tiny_fp16_weights() -> None:
    """Weights under fp16's smallest normal number round to an absolute step: the rewrite's row
    allows for it (the outputs, 2.6% off here, still tell that fp16 cannot hold these weights)."""
    from repconv import fuse
    from repconv.verify.rewrites import RewriteCheck

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e-4)
        net[1].weight.fill_(0.05)
    net = net.half()
    x = torch.randn(1, 3, 8, 8).half()
    result = fuse(net, x, check=False)
    assert result.model[0].weight.abs().max() < torch.finfo(torch.float16).tiny
    report = verify(net, result.model, x, trials=1, upcast=True, rewrites=RewriteCheck(
        result.model, result.originals, result.report.rewrites, result.model))
    (row,) = report.rewrite_errors
    assert row.passed and row.magnitude_error < REWRITE_RTOL[torch.float16]
    assert row.max_rel_error > 1e-2 and not report.passed
