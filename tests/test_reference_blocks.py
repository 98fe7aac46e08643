"""Sanity checks for the training-time reference blocks in ``reference_blocks.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers.reference_blocks import (
    BLOCK_NAMES,
    LAYER_SCALE_NAMES,
    ACBlock,
    BasicResBlock,
    Bottleneck,
    Branchy1d,
    Branchy3d,
    DBBWithInnerBN,
    DiverseBranchBlock,
    FiveBranchConcatBlock,
    MobileOneBlock,
    RepGhostBlock,
    RepMixer,
    RepVGGBlock,
    RepViTDWBlock,
    ScaledDilatedBlock,
    block_ndim,
    make_block,
    randomize_bn,
    tiny_net,
    tiny_net_example_input,
)
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# (id, constructor, input shape, expected output shape, affine when act=False)
CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], bool]] = [
    ("repvgg", lambda: RepVGGBlock(8, 8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("repvgg_s2", lambda: RepVGGBlock(8, 12, stride=2), (2, 8, 9, 9), (2, 12, 5, 5), True),
    ("repvgg_g4", lambda: RepVGGBlock(8, 8, groups=4), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("acb", lambda: ACBlock(6, 6), (2, 6, 9, 7), (2, 6, 9, 7), True),
    ("acb_k5_s2", lambda: ACBlock(6, 8, 5, 2, 2), (2, 6, 9, 7), (2, 8, 5, 4), True),
    ("dbb", lambda: DiverseBranchBlock(6, 6), (2, 6, 9, 9), (2, 6, 9, 9), True),
    ("dbb_s2", lambda: DiverseBranchBlock(6, 8, 3, 2), (2, 6, 9, 9), (2, 8, 5, 5), True),
    ("dbb_k5_g2", lambda: DiverseBranchBlock(6, 8, 5, 1, 2, 4), (2, 6, 9, 9), (2, 8, 9, 9), True),
    ("dbb_inner", lambda: DBBWithInnerBN(6, 6), (2, 6, 9, 9), (2, 6, 9, 9), True),
    ("dbb_inner_s2", lambda: DBBWithInnerBN(6, 8, 3, 2), (2, 6, 9, 9), (2, 8, 5, 5), True),
    ("dbb_inner_k5", lambda: DBBWithInnerBN(6, 6, 5, 1, 2), (2, 6, 8, 8), (2, 6, 8, 8), True),
    ("mobileone", lambda: MobileOneBlock(8, 8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("mobileone_dw_s2", lambda: MobileOneBlock(8, 8, 3, 2, 8), (2, 8, 9, 9), (2, 8, 5, 5), True),
    ("mobileone_pw", lambda: MobileOneBlock(8, 16, 1), (2, 8, 9, 9), (2, 16, 9, 9), True),
    ("repmixer", lambda: RepMixer(8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("repmixer_k5_nols", lambda: RepMixer(8, 5, False), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("repvit_dw", lambda: RepViTDWBlock(8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("repghost", lambda: RepGhostBlock(8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("repghost_k5", lambda: RepGhostBlock(8, 5), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("five", lambda: FiveBranchConcatBlock(6, 11), (2, 6, 9, 9), (2, 11, 9, 9), True),
    ("five_s2", lambda: FiveBranchConcatBlock(6, 14, 2), (2, 6, 9, 8), (2, 14, 5, 4), True),
    ("scaled_dil", lambda: ScaledDilatedBlock(8), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("scaled_dil_g2", lambda: ScaledDilatedBlock(8, 2), (2, 8, 9, 9), (2, 8, 9, 9), True),
    ("branchy1d", lambda: Branchy1d(6, 6), (2, 6, 17), (2, 6, 17), True),
    ("branchy1d_s2", lambda: Branchy1d(6, 8, 2), (2, 6, 17), (2, 8, 9), True),
    ("branchy3d", lambda: Branchy3d(4, 4), (2, 4, 5, 6, 7), (2, 4, 5, 6, 7), True),
    ("branchy3d_s2", lambda: Branchy3d(4, 6, 2, 2), (2, 4, 5, 6, 7), (2, 6, 3, 3, 4), True),
    ("basicres", lambda: BasicResBlock(8, 8), (2, 8, 9, 9), (2, 8, 9, 9), False),
    ("basicres_s2", lambda: BasicResBlock(8, 16, 2), (2, 8, 9, 9), (2, 16, 5, 5), False),
    ("bottleneck", lambda: Bottleneck(16, 16), (2, 16, 9, 9), (2, 16, 9, 9), False),
    ("bottleneck_s2", lambda: Bottleneck(8, 16, 2, 2), (2, 8, 9, 9), (2, 16, 5, 5), False),
]
IDS = [c[0] for c in CASES]


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _bn(bn: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm written out with F.batch_norm."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize(("name", "ctor", "in_shape", "out_shape", "affine"), CASES, ids=IDS)
def test_shape_and_train_forward(
    name: str,
    ctor: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    affine: bool,
) -> None:
    block = ctor()
    x = _randn(*in_shape)
    assert block.train()(x).shape == out_shape
    assert randomize_bn(block)(x).shape == out_shape
    assert not block.training


@pytest.mark.parametrize(("name", "ctor", "in_shape", "out_shape", "affine"), CASES, ids=IDS)
def test_randomize_bn_moves_stats(
    name: str,
    ctor: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    affine: bool,
) -> None:
    block = randomize_bn(ctor(), seed=3)
    bns = _bns(block)
    assert bns, "every reference block contains at least one BatchNorm"
    all_var = torch.cat([bn.running_var for bn in bns])
    all_mean = torch.cat([bn.running_mean for bn in bns])
    all_weight = torch.cat([bn.weight for bn in bns])
    assert not (0.8 <= all_var.mean().item() <= 1.2)
    assert all_mean.abs().mean().item() > 0.3
    assert (all_weight - 1).abs().mean().item() > 0.3
    for bn in bns:  # every single BN moved, not just the aggregate
        assert bn.running_var.min().item() >= 0.5
        assert (bn.running_var - 1).abs().min().item() >= 0.2
        assert bn.running_mean.abs().min().item() >= 0.25
        assert (bn.weight - 1).abs().min().item() >= 0.2
        assert (bn.weight.abs() - 1).abs().min().item() >= 0.2
        assert bn.bias.abs().max().item() > 0.0
    for pname, p in block.named_parameters():
        if pname.rsplit(".", 1)[-1] in LAYER_SCALE_NAMES:
            assert p.abs().min().item() >= 0.5


def test_randomize_bn_deterministic_and_seed_dependent() -> None:
    a = randomize_bn(RepMixer(8), seed=7)
    b = randomize_bn(RepMixer(8), seed=7)
    c = randomize_bn(RepMixer(8), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for key in ("norm.rbr_skip.running_mean", "mixer.rbr_skip.weight", "layer_scale"):
        assert torch.equal(sa[key], sb[key])
        assert not torch.equal(sa[key], sc[key])
    # layer scale moved away from its 1e-5 init
    assert a.layer_scale.abs().min().item() >= 0.5


@pytest.mark.parametrize(("name", "ctor", "in_shape", "out_shape", "affine"), CASES, ids=IDS)
def test_fx_trace_matches(
    name: str,
    ctor: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    affine: bool,
) -> None:
    block = randomize_bn(ctor(), seed=5)
    gm = torch.fx.symbolic_trace(block)
    x = _randn(*in_shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "ctor", "in_shape", "out_shape", "affine"), CASES, ids=IDS)
def test_fx_trace_has_no_frozen_constants(
    name: str,
    ctor: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    affine: bool,
) -> None:
    """Every get_attr is a real parameter/buffer, so the traced graph tracks later edits."""
    block = ctor().eval()
    gm = torch.fx.symbolic_trace(block)
    names = {n for n, _ in block.named_parameters()} | {n for n, _ in block.named_buffers()}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert node.target in names, node.target
    randomize_bn(block, seed=6)  # after tracing: shared tensors must be picked up
    x = _randn(*in_shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "ctor", "in_shape", "out_shape", "affine"), CASES, ids=IDS)
def test_eval_mode_is_affine(
    name: str,
    ctor: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    affine: bool,
) -> None:
    """f(x + y) - f(y) == f(x) - f(0) for an affine map (the fusable part)."""
    block = randomize_bn(ctor(), seed=2).double()
    x, y = _randn(*in_shape, seed=1, dtype=torch.float64), _randn(*in_shape, seed=2)
    y = y.double()
    with torch.no_grad():
        lhs = block(x + y) - block(y)
        rhs = block(x) - block(torch.zeros_like(x))
    if affine:
        torch.testing.assert_close(lhs, rhs)
    else:
        assert not torch.allclose(lhs, rhs)


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: RepVGGBlock(6, 6, act=True),
        lambda: ACBlock(6, 6, act=True),
        lambda: DiverseBranchBlock(6, 6, act=True),
        lambda: DBBWithInnerBN(6, 6, act=True),
        lambda: MobileOneBlock(6, 6, act=True),
        lambda: RepMixer(6, act=True),
        lambda: RepViTDWBlock(6, act=True),
        lambda: RepGhostBlock(6, act=True),
        lambda: FiveBranchConcatBlock(6, 10, act=True),
        lambda: ScaledDilatedBlock(6, act=True),
    ],
)
def test_act_appends_relu(ctor: Callable[[], nn.Module]) -> None:
    block = randomize_bn(ctor(), seed=4)
    x = _randn(2, 6, 7, 7)
    with torch.no_grad():
        y = block(x)
    assert (y >= 0).all()
    assert (y == 0).any()
    assert (y > 0).any()
    assert isinstance(list(block.modules())[-1], nn.ReLU)


# --------------------------------------------------------------------------------------
# equations spelled out with F.conv2d / F.batch_norm
# --------------------------------------------------------------------------------------


def _setup(block: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, Tensor]:
    return randomize_bn(block, seed=11).double(), _randn(*shape, seed=12, dtype=torch.float64)


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "groups"), [(6, 6, 1, 1), (6, 6, 1, 3), (6, 9, 2, 3), (4, 4, 2, 1)]
)
def test_repvgg_equation(cin: int, cout: int, stride: int, groups: int) -> None:
    blk, x = _setup(RepVGGBlock(cin, cout, stride, groups), (2, cin, 8, 9))
    d, p = blk.rbr_dense, blk.rbr_1x1
    ref = _bn(d.bn, F.conv2d(x, d.conv.weight, None, stride, 1, 1, groups))
    ref = ref + _bn(p.bn, F.conv2d(x, p.conv.weight, None, stride, 0, 1, groups))
    if cin == cout and stride == 1:
        ref = ref + _bn(blk.rbr_identity, x)
    else:
        assert blk.rbr_identity is None
    assert d.conv.weight.shape[-2:] == (3, 3)
    assert p.conv.weight.shape[-2:] == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1)])
def test_acnet_equation(k: int, stride: int) -> None:
    blk, x = _setup(ACBlock(4, 6, k, stride), (2, 4, 9, 8))
    q = k // 2
    ref = _bn(blk.square.bn, F.conv2d(x, blk.square.conv.weight, None, stride, (q, q)))
    ref = ref + _bn(blk.hor.bn, F.conv2d(x, blk.hor.conv.weight, None, stride, (0, q)))
    ref = ref + _bn(blk.ver.bn, F.conv2d(x, blk.ver.conv.weight, None, stride, (q, 0)))
    assert blk.hor.conv.weight.shape[-2:] == (1, k)
    assert blk.ver.conv.weight.shape[-2:] == (k, 1)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


@pytest.mark.parametrize(("k", "use_ls"), [(3, True), (5, True), (3, False)])
def test_repmixer_equation(k: int, use_ls: bool) -> None:
    c = 6
    blk, x = _setup(RepMixer(c, k, use_ls), (2, c, 8, 8))
    m = blk.mixer
    (branch,) = m.rbr_conv
    mixer = _bn(branch.bn, F.conv2d(x, branch.conv.weight, None, 1, k // 2, 1, c))
    mixer = mixer + _bn(m.rbr_scale.bn, F.conv2d(x, m.rbr_scale.conv.weight, None, 1, 0, 1, c))
    mixer = mixer + _bn(m.rbr_skip, x)
    norm = _bn(blk.norm.rbr_skip, x)
    assert blk.norm.rbr_scale is None
    assert len(blk.norm.rbr_conv) == 0
    scale = blk.layer_scale if use_ls else 1.0
    if use_ls:
        assert blk.layer_scale.shape == (c, 1, 1)
    ref = x + scale * (mixer - norm)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


@pytest.mark.parametrize(("k", "stride", "groups"), [(3, 1, 1), (3, 2, 1), (5, 1, 2)])
def test_dbb_equation(k: int, stride: int, groups: int) -> None:
    blk, x = _setup(DiverseBranchBlock(4, 6, k, stride, groups), (2, 4, 9, 9))
    p = k // 2
    o, one = blk.dbb_origin, blk.dbb_1x1
    ref = _bn(o.bn, F.conv2d(x, o.conv.weight, None, stride, p, 1, groups))
    ref = ref + _bn(one.bn, F.conv2d(x, one.conv.weight, None, stride, 0, 1, groups))
    t = F.conv2d(x, blk.kxk_conv1.weight, None, 1, 0, 1, groups)
    ref = ref + _bn(blk.kxk_bn, F.conv2d(t, blk.kxk_conv2.weight, None, stride, p, 1, groups))
    a = F.conv2d(x, blk.avg_conv.weight, None, 1, 0, 1, groups)
    ref = ref + _bn(blk.avg_bn, F.avg_pool2d(a, k, stride, p, count_include_pad=True))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1)])
def test_dbb_inner_bn_equals_bn_of_zero_padded_input(k: int, stride: int) -> None:
    """BNAndPad semantics: pad x with zeros first, then 1x1 -> BN -> kxk (padding 0)."""
    blk, x = _setup(DBBWithInnerBN(4, 6, k, stride), (2, 4, 9, 9))
    p = k // 2
    xp = F.pad(x, [p] * 4)
    o, one = blk.dbb_origin, blk.dbb_1x1
    ref = _bn(o.bn, F.conv2d(x, o.conv.weight, None, stride, p))
    ref = ref + _bn(one.bn, F.conv2d(x, one.conv.weight, None, stride, 0))
    t = _bn(blk.kxk_bn1, F.conv2d(xp, blk.kxk_conv1.weight))
    ref = ref + _bn(blk.kxk_bn2, F.conv2d(t, blk.kxk_conv2.weight, None, stride, 0))
    a = _bn(blk.avg_bn1, F.conv2d(xp, blk.avg_conv.weight))
    ref = ref + _bn(blk.avg_bn2, F.avg_pool2d(a, k, stride, 0))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)
        # and the border really is not zero: differs from the no-inner-BN zero padding
        t_zero = F.pad(_bn(blk.kxk_bn1, F.conv2d(x, blk.kxk_conv1.weight)), [p] * 4)
        assert not torch.allclose(t, t_zero)


@pytest.mark.parametrize(("groups", "stride", "cout"), [(1, 1, 6), (6, 2, 6), (2, 1, 8)])
def test_mobileone_equation(groups: int, stride: int, cout: int) -> None:
    blk, x = _setup(MobileOneBlock(6, cout, 3, stride, groups, num_branches=3), (2, 6, 8, 8))
    ref = sum(
        _bn(b.bn, F.conv2d(x, b.conv.weight, None, stride, 1, 1, groups)) for b in blk.rbr_conv
    )
    s = blk.rbr_scale
    ref = ref + _bn(s.bn, F.conv2d(x, s.conv.weight, None, stride, 0, 1, groups))
    if cout == 6 and stride == 1:
        ref = ref + _bn(blk.rbr_skip, x)
    else:
        assert blk.rbr_skip is None
    assert len(blk.rbr_conv) == 3
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


def test_mobileone_pointwise_has_no_scale_branch() -> None:
    assert MobileOneBlock(8, 8, kernel_size=1).rbr_scale is None
    with pytest.raises(ValueError, match="at least one branch"):
        MobileOneBlock(8, 16, num_branches=0, use_scale_branch=False)


def test_repvit_and_repghost_equations() -> None:
    c = 6
    blk, x = _setup(RepViTDWBlock(c), (2, c, 8, 8))
    inner = _bn(blk.conv.bn, F.conv2d(x, blk.conv.conv.weight, None, 1, 1, 1, c))
    inner = inner + F.conv2d(x, blk.conv1.weight, blk.conv1.bias, 1, 0, 1, c) + x
    assert blk.conv1.bias is not None
    assert blk.conv.conv.bias is None
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _bn(blk.bn, inner))

    blk, x = _setup(RepGhostBlock(c, 5), (2, c, 8, 8))
    cheap = blk.cheap_operation
    ref = _bn(cheap.bn, F.conv2d(x, cheap.conv.weight, None, 1, 2, 1, c))
    ref = ref + _bn(blk.fusion_bn, x)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


def test_invented_block_equations() -> None:
    blk, x = _setup(FiveBranchConcatBlock(4, 9, stride=2), (2, 4, 9, 8))
    assert blk.split == (3, 2, 4)

    def cb(seq: nn.Sequential, pad: tuple[int, int]) -> Tensor:
        return _bn(seq.bn, F.conv2d(x, seq.conv.weight, None, 2, pad))

    a = cb(blk.b3x3, (1, 1)) + cb(blk.b1x5, (0, 2))
    b = cb(blk.b5x1, (2, 0)) + cb(blk.b1x1, (0, 0))
    c = _bn(blk.pool_bn, F.avg_pool2d(x, 3, 2, 1, count_include_pad=True))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), torch.cat([a, b, c], 1))

    blk, x = _setup(ScaledDilatedBlock(6), (2, 6, 8, 8))
    d, q = blk.dilated, blk.point
    ref = 0.5 * _bn(d.bn, F.conv2d(x, d.conv.weight, None, 1, 2, 2))
    ref = ref - _bn(q.bn, F.conv2d(x, q.conv.weight))
    ref = ref + blk.channel_scale.view(1, -1, 1, 1) * x
    assert blk.channel_scale.shape == (6,)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)

    blk, x = _setup(Branchy1d(4, 4), (2, 4, 11))
    ref = _bn(blk.conv3.bn, F.conv1d(x, blk.conv3.conv.weight, None, 1, 1))
    ref = ref + _bn(blk.conv1.bn, F.conv1d(x, blk.conv1.conv.weight)) + _bn(blk.identity, x)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)

    blk, x = _setup(Branchy3d(3, 3), (2, 3, 5, 4, 6))
    ref = _bn(blk.conv3.bn, F.conv3d(x, blk.conv3.conv.weight, None, 1, 1))
    ref = ref + _bn(blk.conv1.bn, F.conv3d(x, blk.conv1.conv.weight)) + _bn(blk.identity, x)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


def test_resnet_block_equations() -> None:
    blk, x = _setup(BasicResBlock(4, 8, 2), (2, 4, 9, 9))
    h = F.relu(_bn(blk.bn1, F.conv2d(x, blk.conv1.weight, None, 2, 1)))
    h = _bn(blk.bn2, F.conv2d(h, blk.conv2.weight, None, 1, 1))
    sc = _bn(blk.shortcut.bn, F.conv2d(x, blk.shortcut.conv.weight, None, 2))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), F.relu(h + sc))

    blk, x = _setup(Bottleneck(8, 8), (2, 8, 7, 7))
    h = F.relu(_bn(blk.bn1, F.conv2d(x, blk.conv1.weight)))
    h = F.relu(_bn(blk.bn2, F.conv2d(h, blk.conv2.weight, None, 1, 1)))
    h = _bn(blk.bn3, F.conv2d(h, blk.conv3.weight))
    assert isinstance(blk.shortcut, nn.Identity)
    assert blk.conv1.out_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(blk(x), F.relu(h + x))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="divisible by groups"):
        RepVGGBlock(6, 8, groups=4)
    with pytest.raises(ValueError, match="at least in_channels"):
        FiveBranchConcatBlock(6, 7)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        make_block("RepMixer", 8, 16)
    with pytest.raises(ValueError, match="unknown block"):
        make_block("NoSuchBlock", 8)


# --------------------------------------------------------------------------------------
# registry / tiny nets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_make_block(name: str) -> None:
    blk = randomize_bn(make_block(name, 6, 8 if name == "FiveBranchConcatBlock" else 6))
    nd = block_ndim(name)
    x = _randn(2, 6, *([7] * nd))
    with torch.no_grad():
        y = blk(x)
    assert y.shape[0] == 2
    assert y.shape[2:] == x.shape[2:]


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_tiny_net(name: str) -> None:
    net = randomize_bn(tiny_net(name), seed=9)
    x = tiny_net_example_input(name, batch=2)
    assert x.dim() == 2 + block_ndim(name)
    gm = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    assert sum(p.numel() for p in net.parameters()) < 50_000
