"""The faithfulness proof of a trace takes each conv's and linear layer's output from the eager
forward it is checked against (`CallMemo`) where the graph gives the layer exactly the
arguments it had there, so proving a trace costs its cheap ops, not a second forward; any other
call runs, and an unfaithful trace is still refused."""

from __future__ import annotations

import pytest
import torch
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn
from torch import Tensor, fx, nn

from repconv.errors import TraceError
from repconv.fold.calls import BoundCall, CallMemo, bind_call, record_calls
from repconv.fold.capture import _check_faithful, capture
from repconv.fold.graph import propagate_shapes, trace
from repconv.measure.opcount import count_ops
from repconv.samples import repvgg_tiny


def _recorded(model: nn.Module, x: Tensor) -> tuple[CallMemo, object]:
    memo = CallMemo()
    _, output = record_calls(model, (x.clone(),), keep_tensors=False, memo=memo)
    return memo, output


def _traced(model: nn.Module, x: Tensor) -> tuple[CallMemo, object, fx.GraphModule, BoundCall]:
    """The eager forward's memo and output, then the model's symbolic trace and the call."""
    memo, expected = _recorded(model, x)
    bound = bind_call(model, (x,), {})
    assert bound is not None
    return memo, expected, trace(model), bound


def test_a_faithful_trace_is_proven_without_running_its_convs_again() -> None:
    model = randomize_bn(repvgg_tiny(), seed=3).eval()
    x = randn(1, 3, 40, 40, seed=0)
    memo, expected, gm, bound = _traced(model, x)
    plain = count_ops(lambda: propagate_shapes(gm, (x.clone(),)))
    recalled = count_ops(lambda: _check_faithful(gm, bound, expected, memo.recall("")))
    assert (plain.convs, plain.matmuls) == (12, 1)
    assert (recalled.convs, recalled.matmuls) == (0, 0)
    got = propagate_shapes(gm, (x.clone(),), memo.recall(""))
    assert isinstance(got, Tensor) and isinstance(expected, Tensor)
    assert torch.equal(got, expected)
    # the shapes the proof records are those of a real run
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")


class _Counter(nn.Module):
    """Reads state its forward changes: each call multiplies by one more, so a trace (taken
    after the eager run) holds another constant than the eager forward used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.conv(x) * self.calls


def test_a_trace_that_differs_outside_its_layers_is_still_refused() -> None:
    model = _Counter().eval()
    x = randn(1, 3, 8, 8, seed=1)
    # traced after the eager run, at calls == 2: the graph multiplies by 2, the eager run by 1
    memo, expected, gm, bound = _traced(model, x)
    with pytest.raises(TraceError, match="other values than the module"):
        _check_faithful(gm, bound, expected, memo.recall(""))
    # and the whole capture does not take the symbolic trace
    memo, expected = _recorded(model, x)
    try:
        captured = capture(model, bound, expected, memo.recall(""))
    except TraceError:
        return
    assert captured.route != "symbolic"


class _Twice(nn.Module):
    """One conv called twice, the second time on the first call's output; the second call's
    output is then changed in place, and the input through ``.data`` (no version counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = self.conv(y.relu())
        z.mul_(2)
        x.data.zero_()
        return z + y


def test_each_call_is_matched_by_rank_on_what_it_saw() -> None:
    model = _Twice().eval()
    x = randn(2, 4, 6, 6, seed=2)
    memo, expected = _recorded(model, x)
    gm = trace(model)
    recalled = count_ops(lambda: propagate_shapes(gm, (x.clone(),), memo.recall("")))
    assert recalled.convs == 0  # both calls: their arguments and outputs were copied as made
    memo, expected = _recorded(model, x)
    got = propagate_shapes(gm, (x.clone(),), memo.recall(""))
    assert isinstance(got, Tensor) and isinstance(expected, Tensor)
    assert torch.equal(got, expected)


def test_a_call_is_recalled_only_on_exactly_its_recorded_arguments() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3)).eval()
    x = randn(1, 3, 7, 7, seed=4)
    memo, expected = _recorded(model, x)
    layer_call = memo.calls["0"][0]
    nudged = x.clone()
    nudged[0, 0, 3, 3] += 1e-6
    assert layer_call.returns_for((nudged,), {}) is None
    assert layer_call.returns_for((x.to(torch.float64),), {}) is None
    channels_last = x.clone().contiguous(memory_format=torch.channels_last)
    assert layer_call.returns_for((channels_last,), {}) is None  # other strides, other kernels
    assert layer_call.returns_for((x.clone(),), {"extra": 1}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_call.returns_for((x.clone(),), {}) is None  # fx keeps no autocast context
    same = layer_call.returns_for((x.clone(),), {})
    assert same is not None and isinstance(expected, Tensor)
    assert torch.equal(same, expected) and same.data_ptr() != expected.data_ptr()
    assert layer_call.returns_for((x.clone(),), {}) is None  # each call's output serves once


def test_what_the_forward_does_after_a_call_does_not_change_its_record() -> None:
    conv = nn.Conv2d(3, 3, 1).eval()
    memo = CallMemo()
    x = randn(1, 3, 4, 4, seed=5)
    seen = x.clone()
    record_calls(nn.Sequential(conv), (x,), keep_tensors=False, memo=memo)
    x.add_(1)
    x.data.mul_(3)  # no version counted: only a copy made at the call tells
    assert memo.calls["0"][0].returns_for((x,), {}) is None
    got = memo.calls["0"][0].returns_for((seen,), {})
    assert got is not None and torch.equal(got, conv(seen).detach())


def test_a_layer_changed_in_place_since_its_call_runs_again() -> None:
    conv = nn.Conv2d(3, 3, 1).eval()
    memo = CallMemo()
    x = randn(1, 3, 4, 4, seed=8)
    record_calls(nn.Sequential(conv), (x,), keep_tensors=False, memo=memo)
    with torch.no_grad():
        conv.weight.mul_(2)
    assert memo.calls["0"][0].returns_for((x.clone(),), {}) is None


class _Autocast(nn.Module):
    """Runs its conv under autocast: fx records no autocast context, so its trace runs the
    conv in float32 where the forward ran it in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
        return self.bn(y.float())


def test_a_trace_that_drops_an_autocast_context_is_refused() -> None:
    model = randomize_bn(_Autocast(), seed=5).eval()
    x = randn(1, 3, 16, 16, seed=9)
    memo, expected, gm, bound = _traced(model, x)
    assert not torch.equal(propagate_shapes(gm, (x.clone(),)), expected)  # it differs
    with pytest.raises(TraceError, match="other values than the module"):
        _check_faithful(gm, bound, expected, memo.recall(""))


def test_only_costly_layers_are_recorded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    memo, _ = _recorded(model, randn(1, 3, 8, 8, seed=6))
    assert sorted(memo.calls) == ["0", "4"]
    assert all(len(calls) == 1 for calls in memo.calls.values())


def test_a_forward_signature_read_once_is_inspects_own() -> None:
    """The call records bind each call to its forward's signature, read once per function."""
    import functools
    import inspect

    from repconv.fold.calls import forward_signature

    class Keywords(nn.Module):
        def forward(self, x: Tensor, scale: float = 2.0, *, shift: float = 0.0) -> Tensor:
            return x * scale + shift

    class Star(nn.Module):
        def forward(*args: Tensor) -> Tensor:  # no self: a leading *args
            return args[1]

    class Wrapped(nn.Module):
        @functools.wraps(Keywords.forward)
        def forward(self, *args: object, **kwargs: object) -> Tensor:
            return Keywords.forward(self, *args, **kwargs)  # type: ignore[arg-type]

    instance = Keywords()
    instance.forward = lambda y: y  # type: ignore[method-assign]
    for module in (Keywords(), Keywords(), Star(), Wrapped(), nn.Conv2d(1, 1, 1), instance):
        assert forward_signature(module) == inspect.signature(module.forward)


def test_the_memo_is_let_go_once_the_first_capture_is_proven() -> None:
    """The recorded layer arguments and outputs are the model's activations: they go before any
    region is folded."""
    from repconv.driver.scope import fuse_pass

    model = randomize_bn(repvgg_tiny(), seed=4).eval()
    fuser = fuse_pass(model, (randn(1, 3, 32, 32, seed=7),), seed=0,
                      progress=lambda *_: None, unshare=True)
    assert fuser.memo is None
    assert fuser.report.rewrites
