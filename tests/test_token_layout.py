"""Linear layers and BatchNorm1d over the features of tokens (timm's LeViT) fold; maps of the
last dim never mix with the channels-first maps of dim 1. Random BN statistics; outputs are
compared at other batch sizes and token counts than the fuse input; op counts are aten ops
executed."""

from __future__ import annotations

import pytest
import torch
from helpers import token_models as tm
from helpers.measure import executed, rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn
from torch import Tensor, nn

import repconv
from repconv.fold.slot import is_identity_slot

TOL = 1e-5


def fused(cls: type[nn.Module], example: Tensor, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed=seed)
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
    # each LinearNorm is one linear layer now, as LeViT's own fuse() makes it
    assert type(fused_model.ln1) is nn.Linear and fused_model.ln1.bias is not None
    assert type(fused_model.act) is nn.Hardswish


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
    from repconv.rewrite.surgery import replay_plan

    torch.manual_seed(9)
    model = randomize_bn(tm.TokenMlp(), seed=9)
    result = repconv.fuse(model, randn(1, 16, 8, seed=0))
    weights = result.model.state_dict()
    rebuilt = replay_plan(tm.TokenMlp(), result.plan, weights)
    rebuilt.load_state_dict(weights)
    x = randn(2, 9, 8, seed=1)
    assert executed(rebuilt, x).batchnorms == 0
    assert error(model, rebuilt, x) <= TOL


def test_a_replaced_module_keeps_its_attributes() -> None:
    """A parent may read a layer's plain attributes (a detector routes through ``m.f``): the
    fused layer that replaces the module carries them; one whose names clash with the layer's
    own (``in_features``) keeps its class, and the fused layer goes into its linear's slot."""
    torch.manual_seed(10)
    model = randomize_bn(tm.TokenMlp(), seed=10)
    model.ln1.f = -1
    model.ln2.in_features = "the module's own"
    result = repconv.fuse(model, randn(1, 16, 8, seed=0))
    fused_model = result.model
    assert type(fused_model.ln1) is nn.Linear and fused_model.ln1.f == -1
    assert type(fused_model.ln2) is tm.LinearNorm and is_identity_slot(fused_model.ln2.bn)
    assert fused_model.ln2.in_features == "the module's own"
    x = randn(2, 9, 8, seed=1)
    assert executed(fused_model, x).batchnorms == 0
    assert error(model, fused_model, x) <= TOL
    # a fresh model rebuilt from the plan carries them the same way
    from repconv.rewrite.surgery import replay_plan

    fresh = tm.TokenMlp()
    fresh.ln1.f = -1
    rebuilt = replay_plan(fresh, result.plan, fused_model.state_dict())
    assert type(rebuilt.ln1) is nn.Linear and rebuilt.ln1.f == -1


def test_a_conv_bn_sequence_becomes_its_conv() -> None:
    """``Conv2d_BN(nn.Sequential)`` (RepViT, EfficientViT) is replaced by the one conv."""
    torch.manual_seed(11)
    model = randomize_bn(nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                                      nn.BatchNorm2d(8)), nn.ReLU()), seed=11)
    fused_model = repconv.fuse(model, randn(1, 3, 8, 8, seed=0)).model
    assert type(fused_model[0]) is nn.Conv2d
    x = randn(2, 3, 11, 7, seed=1)
    assert error(model, fused_model, x) <= TOL


def test_each_token_rewrite_is_checked_against_the_ops_it_replaced() -> None:
    """The per-rewrite table compares a linear layer on tokens with ops that flattened them."""
    from repconv.verify.outputs import verify
    from repconv.verify.rewrites import RewriteCheck

    torch.manual_seed(12)
    model = randomize_bn(tm.TokenMlp(), seed=12)
    x = randn(1, 9, 8, seed=0)
    result = repconv.fuse(model, x, check=False)
    check = RewriteCheck(result.model, result.originals, result.report.rewrites, result.model)
    report = verify(model, result.model, (x,), rewrites=check, upcast=True)
    rows = {row.fused_module: row for row in report.rewrite_errors}
    assert report.passed and sorted(rows) == ["ln1", "ln2"]
    assert all(row.passed and not row.problem and row.magnitude_error < 1e-6
               for row in rows.values())
