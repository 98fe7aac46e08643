"""repconv/fold/rules/branch_sum.py alone: two input-dependent values of one shape added or
subtracted (operators, ``torch.add``/``sub``, methods, ``+=``) become a Sum of both with
coefficients ±1; broadcasting, a constant operand (a channel shift, not a branch) and ``alpha``
are not this rule's."""

from __future__ import annotations

import torch
from helpers.graphs import traced
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import branch_sum
from repconv.fold.rules.base import Sum


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        a, b = self.a(x), self.b(x)
        total = a + b
        total += b
        return (total, a - b, torch.add(a, b), torch.sub(a, b), a.add(b), a.sub(b),
                a.mean((2, 3), keepdim=True) + a, a + 1.0, torch.add(a, b, alpha=2))


def test_sums_and_differences_of_branches() -> None:
    graph = traced(Branches(), randn(1, 3, 6, 6, seed=0))
    a, b = graph.node("a"), graph.node("b")
    expected = {
        "add": Sum(((a, 1.0), (b, 1.0)), "add"),
        "add_1": Sum(((graph.node("add"), 1.0), (b, 1.0)), "add"),  # total += b
        "sub": Sum(((a, 1.0), (b, -1.0)), "sub"),
        "add_2": Sum(((a, 1.0), (b, 1.0)), "add"),  # torch.add
        "sub_1": Sum(((a, 1.0), (b, -1.0)), "sub"),  # torch.sub
        "add_3": Sum(((a, 1.0), (b, 1.0)), "add"),  # a.add(b)
        "sub_2": Sum(((a, 1.0), (b, -1.0)), "sub"),  # a.sub(b)
    }
    for name, answer in expected.items():
        assert graph.lower(branch_sum.lower, name) == answer, name


def test_broadcasting_constants_and_alpha_are_not_this_rules() -> None:
    graph = traced(Branches(), randn(1, 3, 6, 6, seed=0))
    # a per-sample mean broadcast over a, a constant shift, alpha=2
    for name in ("add_4", "add_5", "add_6"):
        assert graph.lower(branch_sum.lower, name) is None, name
    assert graph.unmatched(branch_sum.lower) == ["a", "b", "mean", "add_4", "add_5", "add_6"]
