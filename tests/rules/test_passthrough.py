"""repconv/fold/rules/passthrough.py alone: identities in eval mode (nn.Identity, eval
dropout, ``.contiguous()`` of a contiguous value, ``.clone()``, ``.detach()``, ``+x``) become the
identity map; dropout in train mode is refused; ``.contiguous()`` of a value that was not
contiguous copies (a later ``.view`` may rely on it), so it is not this rule's."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers.graphs import traced
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import passthrough
from repconv.fold.rules.base import Refusal, Unary


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.identity = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop2d(self.drop(self.identity(x)))
        x = F.dropout(x, 0.3, training=False).contiguous()
        return operator.pos(x.clone().detach())


EXPECTED = {  # node -> (label, free: a fold may leave it where it runs)
    "identity": ("Identity", True), "drop": ("Dropout", True), "drop2d": ("Dropout2d", True),
    "dropout": ("dropout", True), "contiguous": ("contiguous", True), "clone": ("clone", False),
    "detach": ("detach", True), "pos": ("pos", True),
}


def test_eval_identities_are_the_identity_map() -> None:
    x = randn(2, 3, 4, 5, seed=0)
    graph = traced(Identities().eval(), x)
    names = [n.name for n in graph.gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert names == list(EXPECTED)
    source = graph.node("x")
    for name, (label, free) in EXPECTED.items():
        answer = graph.lower(passthrough.lower, name)
        assert isinstance(answer, Unary), name
        assert (answer.label, answer.free, answer.source) == (label, free, source), name
        assert answer.affine.is_identity() and answer.affine.in_channels == 3, name
        source = graph.node(name)


def test_identity_on_features_of_a_2d_input() -> None:
    class Flat(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.detach()

    answer = traced(Flat(), randn(4, 6, seed=0)).lower(passthrough.lower, "detach")
    assert isinstance(answer, Unary) and answer.affine.nd == 0 and answer.affine.is_identity()


@pytest.mark.parametrize("dropout", [nn.Dropout(0.1), nn.Dropout2d(0.1), nn.AlphaDropout(0.1)],
                         ids=["Dropout", "Dropout2d", "AlphaDropout"])
def test_dropout_in_train_mode_is_refused(dropout: nn.Module) -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = dropout

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(x)

    graph = traced(Wrap().eval(), randn(1, 3, 4, 4, seed=0))
    graph.gm.drop.train()
    assert graph.lower(passthrough.lower, "drop") == Refusal("dropout drop is in train mode")


def test_functional_dropout_in_training_is_not_this_rules() -> None:
    class Training(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x, 0.0, training=True) + F.dropout(x, 0.0)

    graph = traced(Training(), randn(1, 3, 4, 4, seed=0))
    assert graph.unmatched(passthrough.lower) == ["dropout", "dropout_1", "add"]


def test_contiguous_of_a_non_contiguous_value_is_not_this_rules() -> None:
    class Transposed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.transpose(2, 3).contiguous().view(1, 3, -1)

    x = randn(1, 3, 4, 5, seed=0)
    graph = traced(Transposed(), x)
    assert not x.transpose(2, 3).is_contiguous()
    assert graph.lower(passthrough.lower, "contiguous") is None


def test_other_ops_are_not_this_rules() -> None:
    class Others(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(x).neg()

    graph = traced(Others(), randn(1, 3, 4, 4, seed=0))
    assert graph.unmatched(passthrough.lower) == ["relu", "neg"]
