"""The float64 reference run upcasts each module's own tensors only while its forward runs, so
verifying a checkpoint never holds it twice over in float64; a model that reads a tensor
outside its owner's forward (a tied weight) is upcast whole instead, with the same result."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers.reference_blocks import randomize_bn
from torch import Tensor, nn

from repconv.verify.reference import Float64Reference, leaves


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                    nn.BatchNorm2d(8), nn.ReLU())
                                      for _ in range(4)))
        self.stem = nn.Conv2d(3, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class TiedHead(Stack):
    """Reads ``stem.weight`` in its own forward: outside the stem's forward."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.layers(self.stem(x))
        return y + F.conv2d(x, self.stem.weight)


def _float64_tensors(model: nn.Module) -> int:
    return sum(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()))


def _reference(model: nn.Module, x: Tensor) -> tuple[Float64Reference, list[Tensor] | None]:
    with torch.no_grad():
        expected, structure = leaves(model(x))
        reference = Float64Reference(model)
        return reference, reference.run((x,), expected, structure)


def test_one_module_at_a_time_in_float64() -> None:
    torch.manual_seed(0)
    model = randomize_bn(Stack(), seed=0)
    seen: list[int] = []
    for module in model.modules():
        module.register_forward_hook(lambda *_: seen.append(_float64_tensors(model)))
    x = torch.randn(1, 3, 8, 8)
    reference, got = _reference(model, x)
    assert got is not None and got[0].dtype == torch.float64 and not reference.whole_model
    # a conv has 2 tensors, a BatchNorm 4 (num_batches_tracked is an integer): never more
    assert max(seen) == 4
    assert _float64_tensors(model) == 0  # every tensor put back
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    assert torch.equal(got[0], exact)


def test_a_tied_weight_falls_back_to_the_whole_model() -> None:
    torch.manual_seed(1)
    model = randomize_bn(TiedHead(), seed=1)
    x = torch.randn(2, 3, 8, 8)
    reference, got = _reference(model, x)
    assert got is not None and reference.whole_model and not reference.problem
    assert _float64_tensors(model) == 0
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    assert torch.equal(got[0], exact)
