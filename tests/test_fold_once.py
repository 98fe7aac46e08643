"""Fold once, keep little (issue 14): analysis reads geometry, each region's numbers are folded
once in float64 where it is applied, and with ``release`` the tensors no fused op reads any
more are handed back as their region is applied."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers.measure import rel_err
from helpers.reference_blocks import RepVGGBlock, make_block, randomize_bn
from helpers.third_party_models import BY_NAME, shaped_input
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import repconv
from repconv.fold import algebra, folding, regions
from repconv.fold.graph import propagate_shapes, trace

aten = torch.ops.aten


def _input(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _Float64Copies(TorchDispatchMode):
    """How often each watched tensor is converted to float64 (``.double()``, or a copy into
    float64 memory), by storage."""

    def __init__(self, watched: list[Tensor]) -> None:
        super().__init__()
        self.watched = {_storage(t) for t in watched}
        self.counts: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("dtype") == torch.float64:
            source = args[0]
        elif func is aten.copy_.default and args[0].dtype == torch.float64:
            source = args[1]
        else:
            source = None
        if isinstance(source, Tensor) and not source.is_meta and _storage(source) in self.watched:
            self.counts[_storage(source)] += 1
        return func(*args, **kwargs)


class _LargeAllocations(TorchDispatchMode):
    """Ops that make new memory of at least ``numel`` elements (views and meta tensors are
    not memory)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(a) for a in args if isinstance(a, Tensor) and not a.is_meta}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, Tensor) and not t.is_meta and t.numel() >= self.numel
                    and _storage(t) not in inputs):
                self.ops.append(str(func))
        return out


def _branchy_net(*blocks: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(*(make_block(name, 16) for name in blocks)), seed=1).eval()


def _traced(model: nn.Module, *shape: int) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (_input(*shape),))
    return gm


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_analysis_reads_geometry_only() -> None:
    """Finding the regions (cuts and refusals included) makes no memory at the scale of a kernel:
    their numbers are folded only where each region is applied."""
    model = _branchy_net("RepVGGBlock", "ACBlock", "MobileOneBlock", "ScaledDilatedBlock")
    gm = _traced(model, 2, 16, 12, 12)
    smallest = min(m.weight.numel() for m in _convs(model).values())

    with _LargeAllocations(smallest) as analysis:
        found = regions.analyse(gm)
    with _LargeAllocations(smallest) as folds:
        folded = [folding.fold_region(r) for r in found.regions]

    assert len(found.regions) == 4
    assert analysis.ops == []
    assert len(folds.ops) >= 4  # the folds themselves do make them
    assert all(algebra.same_geometry(f, r.affine) for f, r in zip(folded, found.regions))


def test_each_conv_is_converted_to_float64_once() -> None:
    """Analysis, fold and local check share one float64 copy of each folded conv's weight (they
    made three before)."""
    model = _branchy_net("RepVGGBlock", "ACBlock", "MobileOneBlock", "ScaledDilatedBlock")
    convs = _convs(model)

    with _Float64Copies([m.weight for m in convs.values()]) as conversions:
        result = repconv.fuse(model, _input(2, 16, 12, 12), check=False)

    folded = {path for r in result.report.rewrites for path in r.sources if path in convs}
    assert len(result.report.rewrites) == 4 and len(folded) == len(convs)
    assert conversions.counts == Counter({_storage(convs[p].weight): 1 for p in folded})


def test_a_decision_on_numbers_reads_only_its_part() -> None:
    """Whether a 1x1 conv may come before a zero-padded kxk conv or pool depends on its bias:
    analysis folds the numbers of that 1x1 part alone, once however often it repeats, and never
    the kxk conv's."""
    model = _branchy_net("DiverseBranchBlock", "DiverseBranchBlock")
    convs = _convs(model)
    pointwise = {p for p, m in convs.items() if p.endswith(("kxk_conv1", "avg_conv"))}

    with _Float64Copies([m.weight for m in convs.values()]) as analysis:
        found = regions.analyse(_traced(model, 2, 16, 12, 12))
    with _Float64Copies([m.weight for m in convs.values()]) as fusing:
        result = repconv.fuse(model, _input(2, 16, 12, 12), check=False)

    assert len(found.regions) == len(result.report.rewrites) == 2
    assert analysis.counts == Counter({_storage(convs[p].weight): 1 for p in pointwise})
    assert fusing.counts == Counter({_storage(m.weight): 2 if p in pointwise else 1
                                     for p, m in convs.items()})


def test_values_a_geometry_cannot_tell_are_folded_for_that_part() -> None:
    """Groups a product of two grouped convs keeps depend on its numbers: analysis folds them for
    that part, and agrees with the region's fold."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 1, groups=4, bias=False),
                                       nn.Conv2d(8, 8, 1, groups=2, bias=False),
                                       nn.BatchNorm2d(8)), seed=2).eval()
    gm = trace(model)
    propagate_shapes(gm, (_input(1, 8, 6, 6),))

    (region,) = regions.analyse(gm).regions

    assert region.affine.groups == folding.fold_region(region).groups == 2
    result = repconv.fuse(model, _input(1, 8, 6, 6))
    (conv,) = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 2
    x = _input(3, 8, 9, 7, seed=1)
    with torch.no_grad():
        assert rel_err(model(x), result.model(x)) < 1e-6


class _Shared(nn.Module):
    """Folds whose tensors are free once applied (a RepVGG block, ``bn``, ``tied_bn``) beside
    tensors something else still holds: ``conv`` is registered twice, ``tied`` shares its weight
    with ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.alias = self.conv
        self.tied = nn.Conv2d(8, 8, 1, bias=False)
        self.tied_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1, bias=False)
        self.head.weight = self.tied.weight

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.block(x))
        x = F.relu(self.bn(self.conv(x)))
        return F.relu(self.tied_bn(self.tied(x))) + self.head(x)


def _empty(tensors: list[Tensor]) -> None:
    with torch.no_grad():
        for tensor in tensors:
            tensor.set_()


def test_release_hands_back_what_no_fused_op_reads() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_Shared(), seed=3).eval()
    x, other = _input(1, 8, 10, 10), _input(2, 8, 7, 9, seed=1)
    with torch.no_grad():
        expected = model(other)
    kept = repconv.fuse(copy.deepcopy(model), x, check=False)
    released: list[Tensor] = []

    def release(tensors: list[Tensor]) -> None:
        released.extend(tensors)
        _empty(tensors)  # as the pipeline does: the memory goes, a later use fails loudly

    freed = repconv.fuse(model, x, check=False, release=release)

    gone = [*model.block.parameters(), *model.block.buffers(), *model.bn.parameters(),
            *model.bn.buffers(), *model.tied_bn.parameters(), *model.tied_bn.buffers()]
    assert {id(t) for t in released} == {id(t) for t in gone}
    assert all(t.numel() == 0 for t in gone)
    assert model.conv.weight.numel() > 0 and model.tied.weight.numel() > 0
    assert len(freed.report.rewrites) == len(kept.report.rewrites) == 3
    assert freed.originals == {} and kept.originals
    assert freed.report.before == kept.report.before  # counted before anything was released
    with torch.no_grad():
        got, reference = freed.model(other), kept.model(other)
    assert torch.equal(got, reference)
    assert rel_err(expected, got) < 1e-5


def test_a_model_fused_again_at_other_sizes_releases_nothing() -> None:
    """A forward that decides on the input's size is fused again across the decision, from the
    original's tensors: none is handed back."""
    spec = BY_NAME["size_flag_child"]
    released: list[Tensor] = []

    result = repconv.fuse(spec.training(0), shaped_input(spec.example), check=False,
                          release=released.extend)

    assert result.sizes and result.report.rewrites
    assert released == []


def test_release_is_refused_with_the_verification() -> None:
    with pytest.raises(ValueError, match="check=False"):
        repconv.fuse(_branchy_net("RepVGGBlock"), _input(1, 16, 8, 8),
                     release=lambda tensors: None)


def test_a_temporary_is_overwritten_only_when_the_caller_gives_it_up() -> None:
    torch.manual_seed(0)
    conv = algebra.from_conv(torch.randn(4, 4, 3, 3), torch.randn(4), padding=1)
    bn = algebra.diagonal(torch.rand(4) + 0.5, torch.randn(4), 2)
    small = algebra.from_conv(torch.randn(4, 4, 1, 1), None)
    expected = algebra.add(algebra.then(conv, bn), small)
    weight = conv.weight.clone()

    kept = algebra.then(conv, bn)
    assert torch.equal(conv.weight, weight)
    scaled = algebra.then(conv, bn, scratch=True)
    assert scaled.weight is conv.weight and torch.equal(scaled.weight, kept.weight)

    total = algebra.add(scaled, small, scratch=(True, False))
    assert total.weight is scaled.weight and torch.equal(total.weight, expected.weight)
    assert torch.equal(total.bias, expected.bias)
    again = algebra.add(kept, small)
    assert again.weight is not kept.weight and torch.equal(again.weight, expected.weight)
