"""Refusals: each test is named after the trap it guards, asserts the reason the report gives and
that the model still computes what it did (BN statistics always randomized)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers.measure import count_bns, count_convs, rel_err
from helpers.reference_blocks import RepVGGBlock, randomize_bn
from helpers.tensors import randn, run
from torch import Tensor, nn

import repconv
from repconv.fold import folding, regions
from repconv.fold.graph import propagate_shapes, trace


def reasons(result: repconv.FuseResult) -> list[str]:
    return [s.reason for s in result.report.skipped]


def fuse_checked(model: nn.Module, shape: tuple[int, ...]) -> repconv.FuseResult:
    """Fuse on one input; check every output leaf on another, and the report's verification."""
    torch.manual_seed(0)
    result = repconv.fuse(model, randn(*shape, seed=0))
    assert result.report.verification.passed
    fresh = randn(*shape, seed=1)
    expected, got = run(model, fresh), run(result.model, fresh)
    if isinstance(expected, Tensor):
        expected, got = (expected,), (got,)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert rel_err(e, g) < 1e-5
    return result


# --------------------------------------------------------------------------- BatchNorm


class ConvBN(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def test_bn_without_running_statistics_is_not_folded() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    model = ConvBN(bn).eval()

    result = fuse_checked(model, (3, 4, 8, 8))

    assert count_bns(result.model) == 1
    assert count_convs(result.model) == 1
    (reason,) = reasons(result)
    assert "running statistics" in reason
    assert result.report.rewrites == []


def test_bn_with_running_statistics_is_folded() -> None:
    """The control for the test above: the same model with running stats loses its BN."""
    model = randomize_bn(ConvBN(nn.BatchNorm2d(4)), seed=1)
    result = fuse_checked(model, (3, 4, 8, 8))
    assert count_bns(result.model) == 0
    assert reasons(result) == []


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x)
        return self.bn(y), torch.relu(y)


def test_conv_output_with_two_users_keeps_bn() -> None:
    model = randomize_bn(TwoUsers(), seed=2)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_bns(result.model) == 1
    assert count_convs(result.model) == 1
    assert any("2 users" in r for r in reasons(result)), reasons(result)
    assert torch.equal(result.model.conv.weight, model.conv.weight)
    # the trap is real: folding the BN into the conv breaks the relu path
    naive = copy.deepcopy(model)
    naive.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(naive.conv, naive.bn)
    naive.bn = nn.Identity()
    x = randn(2, 4, 8, 8, seed=3)
    assert rel_err(run(model, x)[1], run(naive, x)[1]) > 0.1


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bn1(self.conv(x)), self.bn2(self.conv(x * 2))


def test_conv_shared_by_two_call_sites_keeps_both_bns() -> None:
    model = randomize_bn(SharedConv(), seed=3)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_bns(result.model) == 2
    assert count_convs(result.model) == 1
    assert reasons(result)
    assert all("shared" in r for r in reasons(result)), reasons(result)
    assert torch.equal(result.model.conv.weight, model.conv.weight)


class ConvWeightReadElsewhere(nn.Module):
    """The conv is called once, but its weight is also read directly (a regulariser term, a
    weight-norm statistic): fx records that as a get_attr of ``conv.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bn(self.conv(x)), self.conv.weight.sum(dim=(1, 2, 3))


def test_conv_whose_weight_is_read_elsewhere_keeps_bn() -> None:
    model = randomize_bn(ConvWeightReadElsewhere(), seed=4)
    result = fuse_checked(model, (2, 4, 8, 8))
    # folding the BN into conv.weight would change the second output, which reads that weight
    assert count_bns(result.model) == 1
    assert count_convs(result.model) == 1
    assert result.report.rewrites == []
    assert any("weight of conv" in reason for reason in reasons(result)), reasons(result)


# --------------------------------------------------------------------------- branch sums


class TwoBranchSum(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.bn_a = nn.BatchNorm2d(a.out_channels)
        self.bn_b = nn.BatchNorm2d(b.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


def test_misaligned_padding_branches_are_not_summed() -> None:
    """conv3x3 pad 1 and conv2x2 pad 0, both stride 2: on an even input both give 4x4, so torch
    adds them, but their windows have different centres (extent - 2*padding is 1 vs 2)."""
    model = randomize_bn(
        TwoBranchSum(nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.Conv2d(4, 4, 2, 2, 0, bias=False)),
        seed=5,
    )
    assert run(model.a, randn(1, 4, 8, 8, seed=0)).shape == (1, 4, 4, 4)
    assert run(model.b, randn(1, 4, 8, 8, seed=0)).shape == (1, 4, 4, 4)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_convs(result.model) == 2
    assert count_bns(result.model) == 0  # each branch's own BN still folds
    (reason,) = reasons(result)
    assert "misaligned" in reason
    assert "3 pad 1" in reason and "2 pad 0" in reason


def test_aligned_branches_are_summed() -> None:
    """The control: 3x3 pad 1 and 1x1 pad 0, both stride 2, share their centres."""
    model = randomize_bn(
        TwoBranchSum(nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.Conv2d(4, 4, 1, 2, 0, bias=False)),
        seed=5,
    )
    result = fuse_checked(model, (2, 4, 8, 8))
    assert count_convs(result.model) == 1
    assert reasons(result) == []


def test_branches_with_different_strides_are_not_summed() -> None:
    """conv5x5 stride 1 pad 0 and conv1x1 stride 2 both map 8x8 to 4x4, with different strides."""
    model = randomize_bn(
        TwoBranchSum(nn.Conv2d(4, 4, 5, 1, 0, bias=False), nn.Conv2d(4, 4, 1, 2, 0, bias=False)),
        seed=6,
    )

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_convs(result.model) == 2
    assert count_bns(result.model) == 0
    (reason,) = reasons(result)
    assert "stride" in reason
    assert "(1, 1)" in reason and "(2, 2)" in reason


# --------------------------------------------------------------------------- BN before a conv


class PreBN(nn.Module):
    def __init__(self, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, kernel_size, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(x))


def test_bn_before_zero_padded_conv_is_not_folded() -> None:
    model = randomize_bn(PreBN(3, 1), seed=7)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_bns(result.model) == 1
    (reason,) = reasons(result)
    assert "border" in reason


def test_bn_before_unpadded_pointwise_conv_is_folded() -> None:
    model = randomize_bn(PreBN(1, 0), seed=7)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_bns(result.model) == 0
    assert count_convs(result.model) == 1
    assert reasons(result) == []


# --------------------------------------------------------------------------- pooling


class ConvBNPool(nn.Module):
    def __init__(self, count_include_pad: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.conv(x)))


def test_avg_pool_excluding_padding_is_not_folded() -> None:
    model = randomize_bn(ConvBNPool(count_include_pad=False), seed=8)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert count_bns(result.model) == 0  # conv + BN before it still fold
    assert sum(isinstance(m, nn.AvgPool2d) for m in result.model.modules()) == 1
    (reason,) = reasons(result)
    assert "padding" in reason
    assert "avg pool" in reason


def test_avg_pool_after_bn_with_a_bias_keeps_the_border() -> None:
    """count_include_pad=True pools zeros at the border, but BN's shift is not zero there: a
    folded conv would average shifted values instead."""
    model = randomize_bn(ConvBNPool(count_include_pad=True), seed=8)

    result = fuse_checked(model, (2, 4, 8, 8))

    assert sum(isinstance(m, nn.AvgPool2d) for m in result.model.modules()) == 1
    (reason,) = reasons(result)
    assert "border" in reason


# --------------------------------------------------------------------------- analyse is pure


def _signature(analysis: regions.Analysis) -> list[tuple[object, ...]]:
    return [
        (
            r.root.name,
            r.sink.name,
            tuple(m.name for m in r.members),
            r.labels,
            r.macs_before,
            r.macs_after,
            folding.fold_region(r).weight,
            folding.fold_region(r).bias,
            r.affine.stride,
            r.affine.padding,
            r.affine.dilation,
            r.affine.groups,
        )
        for r in analysis.regions
    ]


def test_analyse_reads_the_graph_without_changing_it() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = RepVGGBlock(4, 4)
            self.pre = PreBN(3, 1)  # one refusal too
            self.two = TwoUsers()

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            a, b = self.two(self.pre(self.block(x))[:, :4])
            return F.relu(a), b

    model = randomize_bn(Model(), seed=9)
    gm = trace(model)
    propagate_shapes(gm, (randn(2, 4, 8, 8, seed=0),))
    code = gm.code
    nodes = [(n.name, n.op, str(n.target), len(n.users)) for n in gm.graph.nodes]
    state = {k: v.clone() for k, v in gm.state_dict().items()}

    first = regions.analyse(gm)
    second = regions.analyse(gm)

    assert gm.code == code
    assert [(n.name, n.op, str(n.target), len(n.users)) for n in gm.graph.nodes] == nodes
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    # the RepVGG block and the BN after it are one region; pre.conv and two.conv are refused
    assert [r.sink.name for r in first.regions] == ["pre_bn"]
    assert len(first.skips) == 2
    sig1, sig2 = _signature(first), _signature(second)
    assert len(sig1) == len(sig2)
    for a, b in zip(sig1, sig2):
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, Tensor) else x == y
    assert [(s.where, s.reason) for s in first.skips] == [(s.where, s.reason) for s in second.skips]


class PoolFromShape(nn.Module):
    """Global average pooling written as ``F.avg_pool2d(y, y.size()[2:])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return F.avg_pool2d(y, y.size()[2:])


def test_avg_pool_window_read_from_the_shape_is_not_baked_in() -> None:
    model = randomize_bn(PoolFromShape(), seed=6)
    result = fuse_checked(model, (1, 3, 16, 16))
    assert count_bns(result.model) == 0
    assert any("window from the input's shape" in r for r in reasons(result)), reasons(result)
    x = randn(2, 3, 21, 21, seed=1)
    assert rel_err(run(model, x), run(result.model, x)) < 1e-5
