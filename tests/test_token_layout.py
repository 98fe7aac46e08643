"""Linear layers and BatchNorm1d over the features of tokens (timm's LeViT) fold; maps of the
last dim never mix with the channels-first maps of dim 1. Random BN statistics; outputs are
compared at other batch sizes and token counts than the fuse input; op counts are aten ops
executed."""

from __future__ import annotations

import pytest
import token_models as tm
import torch
from measure import rel_err
from test_user_models import executed, randn
from torch import Tensor, nn
from user_models import randomize_bns

import repconv

TOL = 1e-5


def fused(cls: type[nn.Module], example: Tensor, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = randomize_bns(cls(), seed=seed)
    return model, repconv.fuse(model, example).model


def error(model: nn.Module, fused_model: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return rel_err(model(x), fused_model(x))


@pytest.mark.parametrize("shape", [(1, 16, 8), (2, 16, 8), (3, 25, 8)])
def test_levit_mlp_loses_every_batchnorm(shape: tuple[int, ...]) -> None:
    model, fused_model = fused(tm.TokenMlp, randn(1, 16, 8, seed=0), seed=1)
    x = randn(*shape, seed=2)
    before, after = executed(model, x), executed(fused_model, x)
    assert before.batchnorms == 2 and after.batchnorms == 0, after.ops
    assert after.matmuls == before.matmuls == 2, after.ops
    assert after.total < before.total
    assert error(model, fused_model, x) <= TOL
    # the fused linear layer sits where the user's was; the BatchNorm slot passes tokens on
    assert isinstance(fused_model.ln1.linear, nn.Linear) and fused_model.ln1.linear.bias is not None
    assert isinstance(fused_model.ln1.bn, nn.Identity)


def test_linear_norm_chain_folds_into_one_linear() -> None:
    model, fused_model = fused(tm.TokenChain, randn(1, 9, 8, seed=0), seed=3)
    for shape in [(1, 9, 8), (4, 5, 8)]:
        x = randn(*shape, seed=4)
        before, after = executed(model, x), executed(fused_model, x)
        assert (before.matmuls, before.batchnorms) == (2, 2)
        assert (after.matmuls, after.batchnorms) == (1, 0), after.ops
        assert error(model, fused_model, x) <= TOL


def test_tokens_stacked_along_the_token_dim_are_not_one_linear() -> None:
    model, fused_model = fused(tm.TokenCat, randn(1, 6, 8, seed=0), seed=5)
    x = randn(2, 7, 8, seed=6)
    after = executed(fused_model, x)
    assert after.matmuls == 2 and after.batchnorms == 0, after.ops
    assert error(model, fused_model, x) <= TOL


def test_linear_over_length_never_mixes_with_channel_maps() -> None:
    model, fused_model = fused(tm.LengthMixer, randn(1, 3, 10, seed=0), seed=7)
    x = randn(3, 3, 10, seed=8)
    after = executed(fused_model, x)
    # conv+bn fold; the Linear over the length and the BN over channels after it cannot
    assert (after.convs, after.batchnorms, after.matmuls) == (1, 1, 1), after.ops
    assert error(model, fused_model, x) <= TOL


def test_token_plan_replays_on_a_fresh_model() -> None:
    """The deploy plan of a LeViT-style fold rebuilds the same model from the bare class."""
    from repconv.fuse import replay_plan

    torch.manual_seed(9)
    model = randomize_bns(tm.TokenMlp(), seed=9)
    result = repconv.fuse(model, randn(1, 16, 8, seed=0))
    weights = result.model.state_dict()
    rebuilt = replay_plan(tm.TokenMlp(), result.plan, weights)
    rebuilt.load_state_dict(weights)
    x = randn(2, 9, 8, seed=1)
    assert executed(rebuilt, x).batchnorms == 0
    assert error(model, rebuilt, x) <= TOL
