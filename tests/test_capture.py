"""Capture beyond torch.fx (repconv/fold/capture.py) and the rewrites it makes possible: what the
values route records, what it refuses, and how each fold lands in code torch.fx cannot trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.measure import executed, rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn, run
from torch import Tensor, nn

import repconv
from repconv.errors import TraceError
from repconv.fold.calls import BoundCall, bind_call
from repconv.fold.capture import DATA, SIZE, capture, capture_values, crossing_sizes
from repconv.fold.inplace import pad_value
from repconv.pipeline import Options, fuse_checkpoint
from repconv.rewrite.surgery import replay_plan

TOL = 1e-5


class CachedGrid(nn.Module):
    """A head caching a grid on ``self`` when the input's shape changes (YOLO's anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.shape: tuple[int, ...] = ()
        self.grid = torch.zeros(0)

    def forward(self, x: Tensor) -> Tensor:
        if self.shape != x.shape:
            self.grid = torch.arange(x.shape[-1], dtype=x.dtype)
            self.shape = x.shape
        return self.bn(self.conv(x)) + self.grid


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if x.mean() > 0 else -self.conv(x)


def _call(model: nn.Module, x: Tensor) -> BoundCall:
    bound = bind_call(model, (x,), {})
    assert bound is not None
    return bound


def test_values_route_records_size_decisions_and_puts_module_state_back() -> None:
    model = randomize_bn(CachedGrid(), seed=1).eval()
    x = randn(1, 4, 8, 8, seed=0)
    captured = capture(model, _call(model, x), run(model, x))
    assert captured.route == "values"
    assert [g.depends for g in captured.guards] == [SIZE]
    assert model.shape == x.shape and model.grid.shape == (8,)  # as the eager call left them
    assert not any(type(v).__name__.endswith("Proxy") for v in vars(model).values())


def test_a_decision_on_the_input_values_refuses_the_capture() -> None:
    model = ValueBranch().eval()
    x = randn(1, 4, 8, 8, seed=0)
    with pytest.raises(TraceError, match="decides on the values of its input"):
        capture_values(model, _call(model, x))


def test_a_size_threshold_gives_the_sizes_on_both_sides() -> None:
    class Flagged(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2 if x.shape[-1] > 40 else x

    model = Flagged()
    x = randn(1, 2, 32, 32, seed=0)
    captured = capture_values(model, _call(model, x))
    assert [(g.depends, g.threshold) for g in captured.guards] == [(SIZE, (0, -1, 40, 1.0))]
    assert [(1, 2, 41, 41)] in crossing_sizes(captured, [(1, 2, 32, 32)])
    assert DATA not in {g.depends for g in captured.guards}


class Untraceable(nn.Module):
    """Stops both routes: numpy in the forward."""

    def forward(self, x: Tensor) -> Tensor:
        return x * float(x.detach().numpy().std() * 0 + 1)


class WithOpaqueChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.odd = Untraceable()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        for part in y.chunk(2, 1):  # iteration: torch.fx stops here
            y = y + part.sum()
        return self.odd(y)


def test_a_child_that_stops_both_routes_is_kept_opaque_and_its_siblings_fold() -> None:
    model = randomize_bn(WithOpaqueChild(), seed=2).eval()
    x = randn(1, 3, 8, 8, seed=0)
    result = repconv.fuse(model, x)
    assert result.report.verification.passed
    assert any("opaque calls: odd" in note for note in result.report.notes)
    assert executed(result.model, x).batchnorms == 0
    assert rel_err(run(model, x), run(result.model, randn(1, 3, 8, 8, seed=0))) <= TOL


class AutocastAttention(nn.Module):
    """timm's LiteMLA (EfficientViT-B): ``autocast(device_type=x.device.type)`` stops both routes;
    its projection is a conv+BN module of its own (timm's ConvNormAct)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x.float() * x.mean()
        return self.proj(y)


class WithOpaqueAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.attention = AutocastAttention()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if y.shape[-1] > 4:  # torch.fx stops here
            y = y + self.attention(y)
        return y


def test_the_children_of_an_opaque_call_are_fused_in_place() -> None:
    """EfficientViT-B left 4 of 26 BatchNorms inside the opaque LiteMLA calls before."""
    model = randomize_bn(WithOpaqueAttention(), seed=4).eval()
    x = randn(1, 3, 8, 8, seed=0)
    result = repconv.fuse(model, x)
    assert result.report.verification.passed
    (note,) = [n for n in result.report.notes if "opaque calls: attention" in n]
    # what stopped it, in the user's terms: no class of repconv's tracer
    assert "got: `a traced value`" in note and "repconv." not in note
    assert executed(model, x).batchnorms == 2
    assert executed(result.model, x).batchnorms == 0
    for shape in ((1, 3, 8, 8), (2, 3, 12, 10)):
        assert rel_err(run(model, randn(*shape, seed=1)),
                       run(result.model, randn(*shape, seed=1))) <= TOL


class Projection(nn.Module):
    """transformers' EfficientNet final block: called with two tensors, reads one."""

    def __init__(self) -> None:
        super().__init__()
        self.project_conv = nn.Conv2d(8, 8, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(8)

    def forward(self, embeddings: Tensor, hidden_states: Tensor) -> Tensor:
        return self.project_bn(self.project_conv(hidden_states))


class TwoArgumentCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.projection = Projection()

    def forward(self, x: Tensor) -> Tensor:
        e = self.stem(x)
        return self.projection(e, e.relu())


def test_a_module_called_with_two_arguments_is_not_replaced_by_a_conv() -> None:
    model = randomize_bn(TwoArgumentCall(), seed=3).eval()
    x = randn(1, 3, 16, 16, seed=0)
    result = repconv.fuse(model, x)
    assert type(result.model.projection) is Projection
    assert result.report.verification.passed
    assert executed(result.model, x).batchnorms == 0
    for shape in [(2, 3, 16, 16), (1, 3, 9, 13)]:
        y = randn(*shape, seed=1)
        assert rel_err(run(model, y), run(result.model, y)) <= TOL


class SamePadConv(nn.Conv2d):
    """timm's Conv2dSame: padding decided from the input size in its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h = max((-(-height // self.stride[0]) - 1) * self.stride[0] + 3 - height, 0)
        pad_w = max((-(-width // self.stride[1]) - 1) * self.stride[1] + 3 - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SamePadConv(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).relu()


def test_a_bn_folds_into_the_weights_of_a_conv_whose_forward_stays() -> None:
    model = randomize_bn(SamePadNet(), seed=4).eval()
    x = randn(1, 3, 16, 16, seed=0)
    result = repconv.fuse(model, x)
    fused = result.model
    assert type(fused.conv) is SamePadConv and fused.conv.bias is not None
    assert model.conv.bias is None  # the user's model is left as it was
    assert executed(fused, x).batchnorms == 0
    for shape in [(1, 3, 16, 16), (2, 3, 17, 11), (1, 3, 33, 33)]:
        y = randn(*shape, seed=2)
        assert rel_err(run(model, y), run(fused, y)) <= TOL
    assert [step["kind"] for step in result.plan] == ["weights", "swap"]
    rebuilt = replay_plan(SamePadNet(), result.plan, fused.state_dict())
    rebuilt.load_state_dict(fused.state_dict())
    y = randn(2, 3, 21, 21, seed=3)
    assert rel_err(run(model, y), run(rebuilt.eval(), y)) <= TOL


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: a BN whose output is padded and then given border ``value`` in
    place (DBB writes BN(0) there; any other value is not one conv)."""

    def __init__(self, value: float | None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        out = F.pad(self.bn(x), [1, 1, 1, 1])
        bn = self.bn
        zero = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fill = (zero if self.value is None else torch.full_like(zero, self.value)).view(1, -1, 1, 1)
        out[:, :, 0:1, :] = fill
        out[:, :, -1:, :] = fill
        out[:, :, :, 0:1] = fill
        out[:, :, :, -1:] = fill
        return out


class BorderPad(nn.Module):
    def __init__(self, value: float | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.pad = BNAndPad(value)
        self.conv3 = nn.Conv2d(4, 4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.pad(self.conv1(x))).relu()


@pytest.mark.parametrize(("value", "folds"), [(None, True), (0.5, False)])
def test_a_border_written_with_the_bn_of_zero_folds_and_another_value_does_not(
        value: float | None, folds: bool) -> None:
    model = randomize_bn(BorderPad(value), seed=5).eval()
    x = randn(1, 4, 10, 10, seed=0)
    result = repconv.fuse(model, x)
    assert result.report.verification.passed
    assert (executed(result.model, x).convs == 1) is folds
    y = randn(2, 4, 7, 12, seed=1)
    assert rel_err(run(model, y), run(result.model, y)) <= TOL


def test_pad_value_is_the_pad_with_the_border_set() -> None:
    x, value = randn(2, 3, 4, 5, seed=0), torch.tensor([1.0, -2.0, 3.0])
    out = pad_value(x, [1, 1, 2, 2], value)
    assert torch.equal(out[:, :, 2:-2, 1:-1], x)
    border = out.clone()
    border[:, :, 2:-2, 1:-1] = float("nan")
    for channel, v in enumerate(value):
        kept = border[:, channel][~border[:, channel].isnan()]
        assert torch.equal(kept, torch.full_like(kept, float(v)))


class SharedHead(nn.Module):
    """effdet's HeadNet: one conv applied to every level, each level with its own BN."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(levels))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.bns[level](self.conv(features[level])).relu()
                for level in range(len(self.bns))]


class Pyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = SharedHead()

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.stem(x)]
        for _ in range(2):
            levels.append(F.avg_pool2d(levels[-1], 2))
        return self.head(levels)


@pytest.mark.parametrize("unshare", [True, False])
def test_a_layer_called_at_every_level_unshares_into_a_copy_per_level(unshare: bool) -> None:
    model = randomize_bn(Pyramid(), seed=6).eval()
    x = randn(1, 3, 32, 32, seed=0)
    result = repconv.fuse(model, x, unshare=unshare)
    assert result.report.verification.passed
    before, after = executed(model, x), executed(result.model, x)
    assert after.convs == before.convs and after.batchnorms == (0 if unshare else 3)
    growth = result.report.after.parameters - result.report.before.parameters
    if unshare:
        assert growth == 2 * 6 * 6 * 9 + 3 * 6 - 3 * 2 * 6  # two more 3x3 kernels, 3 biases, no BN
        assert any("unshared 1 layer(s)" in note and "head.conv (3 sites)" in note
                   for note in result.report.notes)
    else:
        assert growth == 0
        assert any("(unsharing is off)" in s.reason for s in result.report.skipped)
    y = randn(2, 3, 48, 40, seed=1)
    for a, b in zip(run(model, y), run(result.model, y)):
        assert rel_err(a, b) <= TOL


class FlaggedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(4, 4, 1, bias=False)
        self.side_bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor, big: bool = False) -> Tensor:
        if big:
            x = self.down_bn(self.down(x)).relu()
        return (self.bn(self.conv(x)) + self.side_bn(self.side(x))).relu()


class SizeFlagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = FlaggedBlock()

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.stem(x), big=x.shape[-1] > 24)


def test_a_size_flag_keeps_its_branch_and_each_side_is_fused(tmp_path: Path) -> None:
    """The block is rewritten once per value of its flag, each side folded, and a dispatcher
    picks the side at run time; the deploy file replays it on a fresh model."""
    model = randomize_bn(SizeFlagged(), seed=7).eval()
    result = repconv.fuse(model, randn(1, 3, 16, 16, seed=0))
    assert result.report.verification.passed
    assert any(shape[0][-1] > 24 for shape in result.sizes)  # verified across the flag
    assert [step["kind"] for step in result.plan][-1] == "cases"
    for size in (16, 25, 32, 40, 23):
        x = randn(2, 3, size, size, seed=size)
        assert executed(result.model, x).batchnorms == 0, size
        assert rel_err(run(model, x), run(result.model, x)) <= TOL, size
    torch.save({"state_dict": model.state_dict(), "input_shape": [1, 3, 16, 16]},
               tmp_path / "train.pt")
    fuse_checkpoint(tmp_path / "train.pt", tmp_path / "deploy.pt", Options(
        model=f"{__name__}:SizeFlagged"))
    fresh = repconv.load_deploy(SizeFlagged(), tmp_path / "deploy.pt")
    for size in (16, 32):
        x = randn(1, 3, size, size, seed=size)
        assert rel_err(run(model, x), run(fresh, x)) <= TOL, size
        assert executed(fresh, x).batchnorms == 0
