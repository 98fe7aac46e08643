"""A rewritten forward that is a chain of child calls runs as an nn.Sequential
(repconv/rewrite/chain.py): same outputs, no GraphModule call, the plan replays it, and a
module called any other way than with one tensor keeps its GraphModule."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.measure import rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn, run
from torch import Tensor, fx, nn

import repconv
from repconv.errors import InputError
from repconv.rewrite.plan import parse
from repconv.rewrite.surgery import replay_plan

TOL = 1e-5


class Branchy(nn.Module):
    """Two conv-BN branches summed, then the activation: folds to act(conv(x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.f = -1  # a detector's routing attribute, read by its parent

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, by_keyword: bool = False) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(Branchy(8) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            assert block.f == -1
            x = block(x=x) if self.by_keyword else block(x)
        return x


def _net(by_keyword: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net(by_keyword), seed=3).eval()


def _fused(model: nn.Module) -> repconv.FuseResult:
    return repconv.fuse(model, randn(1, 3, 16, 16, seed=1))


def test_a_block_folded_to_conv_and_activation_is_a_sequential() -> None:
    model = _net()
    result = _fused(model)
    for block in result.model.blocks:
        assert type(block) is nn.Sequential
        assert [type(m) for m in block] == [nn.Conv2d, nn.ReLU]
        assert block.f == -1  # carried: the parent still routes through it
    frames = [s for s in result.plan if s["kind"] == "frame"]
    assert frames and all(s["sequential"] for s in frames)
    for shape in [(1, 3, 16, 16), (2, 3, 23, 17)]:
        x = randn(*shape, seed=2)
        assert rel_err(run(model, x), run(result.model, x)) < TOL


def test_a_block_called_by_keyword_keeps_its_graph_module() -> None:
    model = _net(by_keyword=True)
    result = _fused(model)
    assert all(isinstance(b, fx.GraphModule) for b in result.model.blocks)
    assert not any(s.get("sequential") for s in result.plan)
    x = randn(2, 3, 20, 20, seed=2)
    assert rel_err(run(model, x), run(result.model, x)) < TOL


def test_the_plan_replays_the_sequential() -> None:
    model = _net()
    result = _fused(model)
    weights = result.model.state_dict()
    replayed = replay_plan(Net(), result.plan, weights)
    replayed.load_state_dict(weights)
    assert [type(b) for b in replayed.blocks] == [nn.Sequential] * 2
    x = randn(1, 3, 12, 12, seed=5)
    assert torch.equal(run(replayed, x), run(result.model, x))


def test_a_plan_written_before_the_field_replays_a_graph_module() -> None:
    result = _fused(_net())
    plan = copy.deepcopy(result.plan)
    for step in plan:
        step.pop("sequential", None)
    replayed = replay_plan(Net(), plan, result.model.state_dict())
    assert all(isinstance(b, fx.GraphModule) for b in replayed.blocks)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_sequential_field_that_is_not_a_bool_is_damage(value: object) -> None:
    result = _fused(_net())
    plan = copy.deepcopy(result.plan)
    next(s for s in plan if s["kind"] == "frame")["sequential"] = value
    with pytest.raises(InputError, match="damaged"):
        replay_plan(Net(), plan, result.model.state_dict())


def test_a_plan_running_a_non_chain_as_sequential_is_damage() -> None:
    """A frame step marked sequential whose replayed forward is no chain: its edits removed,
    the block's two branches and their sum remain."""
    result = _fused(_net())
    plan = copy.deepcopy(result.plan)
    frame = next(s for s in plan if s["kind"] == "frame")
    frame["edits"] = []
    frame["leaves"] = []
    with pytest.raises(InputError, match="damaged"):
        replay_plan(Net(), plan, result.model.state_dict())


class KeywordAtLargeSize(nn.Module):
    """Calls its block positionally at the example's size and by keyword above 40 px."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Branchy(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.block(x=x) if x.shape[-1] > 40 else self.block(x)


def test_a_keyword_call_seen_only_at_another_size_keeps_the_graph_module() -> None:
    """The size pass records the keyword call: the Sequential, whose forward takes ``input``,
    would raise there."""
    torch.manual_seed(0)
    model = randomize_bn(KeywordAtLargeSize(), seed=3).eval()
    result = _fused(model)
    assert isinstance(result.model.block, fx.GraphModule)
    assert result.report.verification.passed, result.report.verification.problem
    for side in (16, 64):
        x = randn(1, 3, side, side, seed=side)
        assert rel_err(run(model, x), run(result.model, x)) < TOL


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: the BN op inside the module's own forward, then its act."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                           self.bias, False, 0.0, self.eps)
        return self.act(x)


class ReadsItsNormWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) * self.bn.weight.abs().mean()


def test_a_sequential_keeps_the_tensors_its_module_held() -> None:
    """The folded BN op leaves its weight in the module, which the parent still reads: the
    Sequential of the act holds it under the same key."""
    torch.manual_seed(0)
    model = randomize_bn(ReadsItsNormWeight(), seed=3).eval()
    result = _fused(model)
    bn = result.model.bn
    assert type(bn) is nn.Sequential and [type(m) for m in bn] == [nn.SiLU]
    assert torch.equal(bn.weight, model.bn.weight)
    assert set(result.model.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert result.report.verification.passed, result.report.verification.problem
    x = randn(2, 3, 9, 11, seed=4)
    assert rel_err(run(model, x), run(result.model, x)) < TOL


def test_a_case_of_a_dispatched_module_marked_sequential_is_damage() -> None:
    frame = next(s for s in _fused(_net()).plan if s["kind"] == "frame")
    case = {**frame, "concrete": {**frame["concrete"], "big": False}, "sequential": True}
    step = {"kind": "cases", "scope": frame["scope"], "flags": ["big"], "cases": [case],
            "fallback": True}
    with pytest.raises(InputError, match="damaged"):
        parse([step])
    case["sequential"] = False
    assert len(parse([step])) == 1
