"""repconv/fold/rules/conv.py alone: convs, transposed convs and linear layers as modules or
functions become one Affine of their input holding the layer's own tensors; a weight two call
sites share, and padding='same' with an even kernel, are refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.graphs import applied, in_float64, traced
from helpers.measure import rel_err
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.graph import GraphContext
from repconv.fold.rules import conv
from repconv.fold.rules.base import Refusal, Unary

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


class Wrap(nn.Module):
    """``layer(x)``: the layer is the graph's node "layer"."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_module_is_an_affine_of_its_input(nd: int) -> None:
    layer = CONVS[nd](6, 4, 3, stride=2, padding=1, dilation=1, groups=2)
    model = Wrap(layer).eval()
    x = randn(2, 6, *SPATIAL[nd], seed=nd)
    graph = traced(model, x)
    answer = graph.lower(conv.lower, "layer")
    assert isinstance(answer, Unary)
    assert answer.source is graph.node("x")
    assert answer.label == f"Conv{nd}d" and not answer.free
    assert (answer.affine.stride, answer.affine.padding, answer.affine.groups) == (
        (2,) * nd, (1,) * nd, 2)
    # the layer's own tensors, not float64 copies: a checkpoint is not doubled in memory
    assert answer.affine.weight.data_ptr() == layer.weight.data_ptr()
    assert answer.affine.weight.dtype == torch.float32
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_dilated_reflect_padded_conv() -> None:
    model = Wrap(nn.Conv2d(3, 5, (3, 5), padding=(2, 4), dilation=2, padding_mode="reflect"))
    x = randn(1, 3, 12, 13, seed=0)
    answer = traced(model, x).lower(conv.lower, "layer")
    assert isinstance(answer, Unary) and answer.affine.padding_mode == "reflect"
    assert answer.affine.dilation == (2, 2)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8)])
def test_linear_module_is_a_map_of_the_last_dim(shape: tuple[int, ...]) -> None:
    model = Wrap(nn.Linear(8, 6))
    x = randn(*shape, seed=1)
    answer = traced(model, x).lower(conv.lower, "layer")
    assert isinstance(answer, Unary) and answer.label == "Linear"
    assert answer.affine.nd == 0  # token dims are batch dims
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_transposed_conv_module() -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    model = Wrap(layer)
    x = randn(1, 4, 5, 6, seed=2)
    answer = traced(model, x).lower(conv.lower, "layer")
    assert isinstance(answer, Unary) and answer.label == "ConvTranspose2d"
    assert answer.affine.transposed and answer.affine.output_padding == (1, 1)
    assert (answer.affine.in_channels, answer.affine.out_channels) == (4, 6)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


class Functional(nn.Module):
    """``F.conv2d`` / ``F.linear`` with the module's own (constant) weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))
        self.fc = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, stride=1, padding=1)
        return F.linear(y.mean((2, 3)), self.fc)


def test_functional_conv_and_linear_with_constant_weights() -> None:
    torch.manual_seed(0)
    model = Functional()
    x = randn(2, 3, 7, 7, seed=3)
    graph = traced(model, x)
    answer = graph.lower(conv.lower, "conv2d")
    assert isinstance(answer, Unary) and answer.label == "conv2d"
    assert answer.source is graph.node("x")
    with torch.no_grad():
        expected = F.conv2d(x.double(), model.weight.double(), model.bias.double(), padding=1)
    assert rel_err(expected, applied(answer.affine, x)) < 1e-12
    linear = graph.lower(conv.lower, "linear")
    assert isinstance(linear, Unary) and linear.label == "linear"
    assert linear.source is graph.node("mean") and linear.affine.nd == 0
    assert torch.equal(linear.affine.bias, torch.zeros(5))


class InputWeight(nn.Module):
    """A conv whose weight is an input: not a constant map of x."""

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight)


def test_weight_that_depends_on_an_input_is_not_lowered() -> None:
    graph = traced(InputWeight(), randn(1, 3, 5, 5, seed=0), randn(2, 3, 1, 1, seed=1))
    assert graph.lower(conv.lower, "conv2d") is None


class TwoCalls(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.layer(x))


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 1), nn.Linear(4, 4),
                                   nn.ConvTranspose2d(4, 4, 1)], ids=["conv", "linear",
                                                                       "transposed"])
def test_a_layer_called_twice_lowers_at_each_site_unless_unsharing_is_off(
        layer: nn.Module) -> None:
    """Each call site folds into a copy of its own (a detection head's conv on every pyramid
    level); with unsharing off, folding into the one layer would change the other site."""
    x = randn(1, 4, 3, 4, seed=0) if not isinstance(layer, nn.Linear) else randn(2, 4, seed=0)
    graph = traced(TwoCalls(layer), x)
    for name in ("layer", "layer_1"):
        lowered = graph.lower(conv.lower, name)
        assert isinstance(lowered, Unary) and lowered.source is graph.node(name).args[0]
    graph.ctx = GraphContext(graph.gm, unshare=False)
    reason = ("weight of layer is shared by 2 call sites; folding would change the others "
              "(unsharing is off)")
    for name in ("layer", "layer_1"):
        assert graph.lower(conv.lower, name) == Refusal(reason)


class CalledAndRead(nn.Module):
    """``layer`` called, and its weight read again by a functional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(3, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.layer(x), self.layer.weight)


def test_module_whose_weight_is_read_elsewhere_is_refused() -> None:
    """Swapping ``layer`` for a fused conv would change what the functional conv reads; the
    functional conv itself is rewritten as a new conv beside it, which changes no weight."""
    graph = traced(CalledAndRead(), randn(1, 3, 4, 4, seed=0))
    assert graph.lower(conv.lower, "layer") == Refusal(
        "weight of layer is shared by 2 call sites; folding would change the others")
    functional = graph.lower(conv.lower, "conv2d")
    assert isinstance(functional, Unary) and functional.source is graph.node("layer")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_with_an_even_kernel_is_refused() -> None:
    graph = traced(Wrap(nn.Conv2d(3, 3, 4, padding="same")), randn(1, 3, 8, 8, seed=0))
    assert graph.lower(conv.lower, "layer") == Refusal(
        "layer: padding='same' with an even kernel pads asymmetrically")


def test_same_padding_with_an_odd_kernel_is_symmetric() -> None:
    model = Wrap(nn.Conv2d(3, 3, (3, 5), padding="same", dilation=2))
    x = randn(1, 3, 9, 9, seed=0)
    answer = traced(model, x).lower(conv.lower, "layer")
    assert isinstance(answer, Unary) and answer.affine.padding == (2, 4)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


class NotConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(x)) * 2 + F.max_pool2d(x, 1)


def test_other_ops_are_not_this_rules() -> None:
    graph = traced(NotConvs().eval(), randn(1, 3, 4, 4, seed=0))
    assert graph.unmatched(conv.lower) == ["bn", "relu", "mul", "max_pool2d", "add"]
