"""One node of a traced module, lowered by one rule: what the rule tests call."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from repconv.fold.algebra import Affine, to_module
from repconv.fold.graph import GraphContext, propagate_shapes, trace
from repconv.fold.rules import Rule
from repconv.fold.rules.base import Concat, Refusal, Sum, Unary


@dataclass
class Traced:
    """A module traced with shapes, and the context rules read it through."""

    gm: fx.GraphModule
    ctx: GraphContext

    def node(self, name: str) -> fx.Node:
        found = next((n for n in self.gm.graph.nodes if n.name == name), None)
        assert found is not None, f"no node {name!r} in {[n.name for n in self.gm.graph.nodes]}"
        return found

    def lower(self, rule: Rule, name: str) -> Unary | Sum | Concat | Refusal | None:
        """``rule`` on node ``name``; the graph's code must be the same afterwards (rules only
        read)."""
        code = self.gm.code
        answer = rule(self.node(name), self.ctx)
        assert self.gm.code == code, "a rule changed the graph"
        return answer

    def unmatched(self, rule: Rule) -> list[str]:
        """The nodes ``rule`` answers None for."""
        return [n.name for n in self.gm.graph.nodes
                if n.op not in ("placeholder", "output") and rule(n, self.ctx) is None]


def traced(module: nn.Module, *inputs: Tensor) -> Traced:
    """``module`` traced as repconv traces it, shapes propagated on ``inputs``."""
    gm = trace(module)
    propagate_shapes(gm, inputs)
    return Traced(gm, GraphContext(gm))


def applied(affine: Affine, x: Tensor) -> Tensor:
    """The conv (or linear layer) ``affine`` describes, run in float64 on ``x``."""
    with torch.no_grad():
        return to_module(affine, torch.float64)(x.double())


def in_float64(module: nn.Module, *inputs: Tensor) -> Tensor:
    """A float64 copy of ``module`` run on ``inputs`` in float64: what an affine must match."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(x.double() for x in inputs))
