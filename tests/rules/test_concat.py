"""repconv/fold/rules/concat.py alone: input-dependent values concatenated along channels
(``dim=1`` or its negative spelling) become a Concat of the parts in order, one part the
identity; other dims and constant parts are not this rule's."""

from __future__ import annotations

import torch
from helpers.graphs import traced
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import concat
from repconv.fold.rules.base import Concat, Unary


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.register_buffer("c", torch.ones(1, 2, 5, 5))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        a, b = self.a(x), self.b(x)
        return (torch.cat([a, b, x], dim=1), torch.concat((b, a), -3), torch.cat([a], 1),
                torch.cat([a, a], dim=0), torch.cat([a, a], dim=2), torch.cat([a, self.c], 1))


def test_concatenation_along_channels() -> None:
    graph = traced(Stacked(), randn(1, 3, 5, 5, seed=0))
    a, b, x = graph.node("a"), graph.node("b"), graph.node("x")
    assert graph.lower(concat.lower, "cat") == Concat((a, b, x))
    assert graph.lower(concat.lower, "concat") == Concat((b, a))
    single = graph.lower(concat.lower, "cat_1")  # cat([a]) copies a: a free identity
    assert isinstance(single, Unary) and single.source is a and single.free
    assert single.affine.is_identity() and single.affine.in_channels == 4


def test_other_dims_and_constant_parts_are_not_this_rules() -> None:
    graph = traced(Stacked(), randn(1, 3, 5, 5, seed=0))
    for name in ("cat_2", "cat_3", "cat_4"):  # dim 0, dim 2, a buffer as a part
        assert graph.lower(concat.lower, name) is None, name
    assert graph.unmatched(concat.lower) == ["a", "b", "cat_2", "cat_3", "c", "cat_4"]
