"""Traps found by adversarial review: in-place ops, regions sharing a branch, crops, dtypes.

In-place ops are invisible to torch.fx's data flow, so each test compares the fused model with
the original on fresh inputs, each model given its own copy.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F
from helpers.measure import count_bns, rel_err
from helpers.reference_blocks import randomize_bn
from torch import Tensor, fx, nn

import repconv
from repconv.fold.graph import alias_base
from repconv.rewrite.surgery import replay_plan


def _fuse_and_compare(model: nn.Module, shape: tuple[int, ...]) -> repconv.FuseResult:
    model = randomize_bn(model, seed=5)
    result = repconv.fuse(model, torch.randn(shape))
    assert result.report.verification.passed, result.report.verification.summary()
    fresh = torch.randn(shape[0], shape[1], *(n + 3 for n in shape[2:]))
    with torch.no_grad():
        assert rel_err(model(fresh.clone()), result.model(fresh.clone())) < 1e-5
    return result


class NormalizeInPlace(nn.Module):
    """`x.sub_(m).div_(s)` with the result discarded: fx's dead-code elimination drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        x.sub_(0.5).div_(0.25)
        return self.bn(self.conv(x))


def test_discarded_in_place_normalisation_of_the_input_is_kept() -> None:
    result = _fuse_and_compare(NormalizeInPlace(), (2, 3, 8, 8))
    assert count_bns(result.model) == 0
    # the root's forward, with its in-place normalisation, is the user's own
    assert type(result.model) is NormalizeInPlace


class AddInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        y.add_(self.b(x))
        return y


def test_in_place_add_on_a_branch_is_kept() -> None:
    _fuse_and_compare(AddInPlace(), (2, 4, 8, 8))


class ReluInPlaceOnRoot(nn.Module):
    """The conv reads x before the in-place ReLU changes it; the fused conv must too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.act(x)
        return self.bn(y) + z


def test_fused_conv_reads_its_root_before_an_in_place_change() -> None:
    result = _fuse_and_compare(ReluInPlaceOnRoot(), (2, 4, 8, 8))
    assert count_bns(result.model) == 0
    fresh_model = replay_plan(ReluInPlaceOnRoot().eval(), result.plan)
    fresh_model.load_state_dict(result.model.state_dict())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(fresh_model(x.clone()), result.model(x.clone()))


class SubtractMeanInPlace(nn.Module):
    """`x -= m` changes the caller's tensor in eager mode; verification must not be fooled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        x -= 0.5
        return self.bn(self.conv(x))


def test_model_that_mutates_its_input_verifies() -> None:
    _fuse_and_compare(SubtractMeanInPlace(), (2, 3, 8, 8))


class BranchInTwoSums(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.a(x)
        return y + self.b(x), y - self.c(x)


def test_branch_used_by_two_sums_folds_each_without_crashing() -> None:
    model = randomize_bn(BranchInTwoSums(), seed=2)
    result = repconv.fuse(model, torch.randn(2, 4, 8, 8))
    assert result.report.verification.passed
    assert result.report.verification.outputs_compared == 2
    assert count_bns(result.model) == 0


class Crop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(self.bn(self.conv(x)), (-1, -1, -1, -1)) * 2


def test_negative_padding_is_refused_not_crashed() -> None:
    result = _fuse_and_compare(Crop(), (2, 4, 12, 12))
    assert any("negative padding" in s.reason for s in result.report.skipped)


class Float64Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) * self.scale


def test_region_whose_dtype_changes_is_refused() -> None:
    model = randomize_bn(Float64Scale(), seed=1)
    result = repconv.fuse(model, torch.randn(2, 4, 8, 8))
    reasons = [s.reason for s in result.report.skipped]
    assert any("dtype changes from float32 to float64" in r for r in reasons), reasons
    assert result.report.verification.passed
    assert count_bns(result.model) == 0  # the float32 conv+BN before the change still folds


def test_bias_is_judged_per_channel_before_a_padded_conv() -> None:
    """Channel 0's huge weights must not make channel 1's bias look like zero."""
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([400.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1e-5, 1.0]))
        bn.running_mean.zero_()
        bn.bias.copy_(torch.tensor([0.0, 0.05]))
    model = nn.Sequential(nn.ReLU(), bn, nn.Conv2d(2, 2, 3, padding=1, groups=2)).eval()
    result = repconv.fuse(model, torch.randn(1, 2, 8, 8))
    assert any("bias before a zero-padded conv" in s.reason for s in result.report.skipped)
    assert count_bns(result.model) == 1


def test_a_train_mode_submodule_is_named_in_a_note() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=0)
    model[1].train()
    result = repconv.fuse(model, torch.randn(2, 3, 8, 8))
    assert any("1 module(s) were in train mode (first: 1)" in n for n in result.report.notes)
    assert model[1].training  # the user's model is left as it was


class PositionalInPlaceRelu(nn.Module):
    """`F.relu(x, True)` changes x after the conv read it: the fused conv must read it first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        F.relu(x, True)
        return self.bn(y) + x


def test_positional_inplace_flag_is_recognised() -> None:
    result = _fuse_and_compare(PositionalInPlaceRelu(), (2, 4, 8, 8))
    assert count_bns(result.model) == 0
    assert type(result.model) is PositionalInPlaceRelu


class _Activation:
    def clamp(self, x: Tensor, inplace: bool = False) -> Tensor:
        return x.clamp_(min=0) if inplace else x.clamp(min=0)


def test_a_bound_methods_positional_inplace_flag_counts_without_its_instance() -> None:
    """A bound method called with ``inplace`` by position changes its input (the flag's place
    is counted without ``self``), and looking it up keeps no reference to the instance."""
    activation = _Activation()
    graph = fx.Graph()
    x = graph.placeholder("x")
    changed = graph.call_function(activation.clamp, (x, True))
    kept = graph.call_function(activation.clamp, (x,))
    graph.output((changed, kept))
    gm = fx.GraphModule(nn.Module(), graph)
    assert alias_base(changed, gm) is x
    assert alias_base(kept, gm) is kept
    instance = weakref.ref(activation)
    del activation, changed, kept, graph, gm, x
    gc.collect()
    assert instance() is None
