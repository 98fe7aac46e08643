"""repconv/fold/rules/token_reshape.py alone: a reshape of a token tensor (a linear layer's
output, a (batch, features) tensor, or another such reshape) that keeps the last dim, with
literal sizes, is the identity on features (a 0-d map); sizes read from a tensor's shape, a
changed last dim and reshapes of channels-first tensors are not this rule's."""

from __future__ import annotations

import torch
from helpers.graphs import traced
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import token_reshape
from repconv.fold.rules.base import Unary


class LeViTStyle(nn.Module):
    """timm LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``, without the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x).flatten(0, 1)
        return y.reshape_as(x).view(-1, 8).reshape(2, 5, 8)


def test_reshapes_of_tokens_keeping_the_features_are_identities() -> None:
    x = randn(2, 5, 8, seed=0)
    graph = traced(LeViTStyle(), x)
    expected = {"flatten": "linear", "reshape_as": "flatten", "view": "reshape_as",
                "reshape": "view"}
    for name, source in expected.items():
        answer = graph.lower(token_reshape.lower, name)
        assert isinstance(answer, Unary), name
        assert answer.source is graph.node(source) and answer.free, name
        assert answer.label == name
        assert answer.affine.nd == 0 and answer.affine.is_identity(), name
        assert answer.affine.in_channels == 8, name


def test_reshape_of_a_2d_input() -> None:
    class Flat(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.reshape(x, (3, 2, 4))

    answer = traced(Flat(), randn(6, 4, seed=0)).lower(token_reshape.lower, "reshape")
    assert isinstance(answer, Unary) and answer.affine.nd == 0 and answer.affine.in_channels == 4


class NotTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor, image: Tensor) -> tuple[Tensor, ...]:
        y = self.linear(x)
        from_shape = y.reshape(x.shape[0], -1, 8)  # sizes read from a tensor: tied to it
        merged = y.flatten(1)  # the last dim changes
        channels_first = self.conv(image).flatten(2)  # not a token tensor
        return from_shape, merged, channels_first


def test_other_reshapes_are_not_this_rules() -> None:
    graph = traced(NotTokens(), randn(2, 5, 8, seed=0), randn(1, 8, 3, 3, seed=1))
    for name in ("reshape", "flatten", "flatten_1"):
        assert graph.lower(token_reshape.lower, name) is None, name
    assert set(graph.unmatched(token_reshape.lower)) == {
        n.name for n in graph.gm.graph.nodes if n.op not in ("placeholder", "output")}
