"""A class's own deploy forward (repconv/rewrite/own_forward.py): taken only where its graph is the
forward's without the BatchNorm slots, so the slots are no longer called."""

from __future__ import annotations

import copy
import io

import torch
from helpers import reference_framework
from helpers.measure import executed, module_calls, rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn, run
from torch import Tensor, nn

import repconv
from repconv.rewrite.surgery import replay_plan

TOL = 1e-5


class Conv(nn.Module):
    """YOLO's Conv: ``forward_fuse`` is its deploy forward, the one its framework's fuse() sets."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    def forward_features(self, x: Tensor, scale: float = 2.0) -> Tensor:  # other parameters
        return self.conv(x) * scale


class WrongDeployForward(Conv):
    """A "deploy" method that computes something else (it drops the activation)."""

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Net(nn.Module):
    def __init__(self, kind: type[Conv] = Conv) -> None:
        super().__init__()
        self.layers = nn.Sequential(kind(3, 8), kind(8, 8), kind(8, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def test_the_class_deploy_forward_is_taken_and_no_slot_is_called() -> None:
    model = randomize_bn(Net(), seed=1).eval()
    x = randn(1, 3, 16, 16, seed=0)
    result = repconv.fuse(model, x)
    fused = result.model
    assert result.report.verification.passed
    assert any("class's own deploy forward" in note and "forward_fuse" in note
               for note in result.report.notes)
    convs = [m for m in fused.modules() if isinstance(m, Conv)]
    assert len(convs) == 3
    assert all(vars(m)["forward"].__func__ is Conv.forward_fuse for m in convs)
    assert module_calls(model, x)["BatchNorm2d"] == 3
    assert module_calls(fused, x)["BatchNorm2d"] == 0
    assert executed(fused, x).batchnorms == 0
    for shape in ((2, 3, 16, 16), (1, 3, 23, 17)):
        y = randn(*shape, seed=2)
        assert rel_err(run(model, y), run(fused, y)) <= TOL


def test_the_deploy_forward_survives_deepcopy_pickle_and_the_framework_fuse() -> None:
    model = randomize_bn(Net(), seed=2).eval()
    x = randn(1, 3, 16, 16, seed=0)
    fused = repconv.fuse(model, x).model
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copy_of in (copy.deepcopy(fused), loaded,
                    reference_framework.fuse(copy.deepcopy(loaded))):
        forwards = [vars(m)["forward"] for m in copy_of.modules() if isinstance(m, Conv)]
        assert all(f.__func__ is Conv.forward_fuse for f in forwards)
        # bound to the copy's own layer, not the original's
        assert all(f.__self__ is m for f, m in
                   zip(forwards, [m for m in copy_of.modules() if isinstance(m, Conv)]))
        assert rel_err(run(model, x), run(copy_of, x)) <= TOL


def test_a_method_that_computes_something_else_is_not_taken() -> None:
    model = randomize_bn(Net(WrongDeployForward), seed=3).eval()
    x = randn(1, 3, 16, 16, seed=0)
    result = repconv.fuse(model, x)
    assert result.report.verification.passed
    assert not any("deploy forward" in note for note in result.report.notes)
    assert all("forward" not in vars(m) for m in result.model.modules()
               if isinstance(m, WrongDeployForward))
    assert executed(result.model, x).batchnorms == 0
    assert rel_err(run(model, x), run(result.model, x)) <= TOL


def test_a_replayed_plan_takes_the_deploy_forward_again() -> None:
    """A state_dict deploy file rebuilds the model from its plan: the same forwards, proven
    again on the rebuilt model."""
    model = randomize_bn(Net(), seed=4).eval()
    x = randn(1, 3, 16, 16, seed=0)
    result = repconv.fuse(model, x)
    weights = result.model.state_dict()
    replayed = replay_plan(Net(), result.plan, weights)
    replayed.load_state_dict(weights)
    assert all(vars(m)["forward"].__func__ is Conv.forward_fuse
               for m in replayed.modules() if isinstance(m, Conv))
    assert module_calls(replayed, x)["BatchNorm2d"] == 0
    assert rel_err(run(model, x), run(replayed, x)) <= TOL


class CachingConv(Conv):
    """A method of the same parameters that sets state on ``self`` when it runs."""

    def forward_train(self, x: Tensor) -> Tensor:
        self.cache = nn.Identity()
        self.seen = True
        return self.act(self.conv(x))


def test_tracing_a_candidate_method_changes_nothing_on_the_model() -> None:
    model = randomize_bn(Net(CachingConv), seed=5).eval()
    x = randn(1, 3, 16, 16, seed=0)
    fused = repconv.fuse(model, x).model
    layers = [m for m in fused.modules() if isinstance(m, CachingConv)]
    # forward_train's graph is forward_fuse's, but it sets state no graph shows: refused, and
    # tracing it set nothing on the model; forward_fuse is taken
    assert all(vars(m)["forward"].__func__ is Conv.forward_fuse for m in layers)
    assert all(not hasattr(m, "cache") and not hasattr(m, "seen") for m in layers)
    assert rel_err(run(model, x), run(fused, x)) <= TOL


class CastingConv(Conv):
    """Both methods pass a dtype (an argument `_signature` cannot compare); the deploy method
    drops the activation: nothing proves them the same."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x))).to(torch.float32)

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.conv(x).to(torch.float32)


def test_graphs_that_cannot_be_compared_prove_nothing() -> None:
    model = randomize_bn(Net(CastingConv), seed=6).eval()
    x = randn(1, 3, 16, 16, seed=0)
    fused = repconv.fuse(model, x).model
    assert all("forward" not in vars(m) for m in fused.modules() if isinstance(m, CastingConv))
    assert rel_err(run(model, x), run(fused, x)) <= TOL
