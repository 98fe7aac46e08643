"""Every operation of ``repconv.algebra`` against direct torch computation in float64.

Each fused ``Affine`` is evaluated two ways (``to_module`` and a direct ``F.convNd`` call on its
fields) and compared with the unfused ops run one after another, on several odd and even input
sizes; ``Affine.output_size`` is checked against the real output shape at the same time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from helpers.measure import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from repconv.errors import AlgebraError
from repconv.fold import algebra as A

F64 = torch.float64
TOL = 1e-10
CONV_MODULE: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
BN_MODULE: dict[int, type[nn.Module]] = {
    0: nn.BatchNorm1d,
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- helpers


def make_conv(
    nd: int,
    cin: int,
    cout: int,
    kernel: int | tuple[int, ...] = 1,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    bias: bool = True,
    padding_mode: str = "zeros",
) -> nn.Module:
    """A float64 ConvNd (nn.Linear for nd == 0) with random weights and bias."""
    if nd == 0:
        module: nn.Module = nn.Linear(cin, cout, bias=bias, dtype=F64)
    else:
        module = CONV_MODULE[nd](
            cin,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            dtype=F64,
        )
    with torch.no_grad():
        module.weight.normal_()
        if module.bias is not None:
            module.bias.normal_()
    return module


def conv_affine(module: nn.Module) -> A.Affine:
    if isinstance(module, nn.Linear):
        return A.from_conv(module.weight, module.bias)
    return A.from_conv(
        module.weight,
        module.bias,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
    )


def make_bn(nd: int, channels: int, affine: bool = True) -> nn.Module:
    """An eval BatchNorm with running statistics and affine parameters far from 0 and 1."""
    bn = BN_MODULE[nd](channels, affine=affine, eps=1e-3, dtype=F64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, dtype=F64) * 4 + 3)
        bn.running_var.copy_(torch.rand(channels, dtype=F64) * 20 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(channels, dtype=F64) * 3)
            bn.bias.copy_(torch.randn(channels, dtype=F64) * 2 - 1)
    return bn.eval()


def bn_affine(bn: nn.Module, nd: int) -> A.Affine:
    return A.from_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, nd)


def bn_ref(bn: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
        )

    return run


def apply_affine(a: A.Affine, x: Tensor) -> Tensor:
    """The map ``a`` by its definition, through F.convNd / a grouped matmul (not to_module)."""
    if a.nd == 0:
        g = a.groups
        w = a.weight.reshape(g, a.out_channels // g, -1)
        xg = x.reshape(x.shape[0], g, -1)
        return torch.einsum("goi,ngi->ngo", w, xg).reshape(x.shape[0], -1) + a.bias
    padding: Sequence[int] = a.padding
    if a.padding_mode != "zeros":
        pads = [p for p in reversed(a.padding) for _ in range(2)]
        x = F.pad(x, pads, mode=a.padding_mode)
        padding = (0,) * a.nd
    return CONV_FN[a.nd](x, a.weight, a.bias, a.stride, padding, a.dilation, a.groups)


def input_sizes(nd: int) -> list[tuple[int, ...]]:
    """Odd, even and mixed spatial sizes."""
    if nd == 0:
        return [()]
    sizes = [(n,) * nd for n in (7, 8, 9)]
    if nd > 1:
        sizes.append((7, 8, 9)[:nd])
        sizes.append((8, 9, 7)[:nd])
    return sizes


def check(
    a: A.Affine,
    ref: Callable[[Tensor], Tensor],
    in_channels: int,
    tol: float = TOL,
    sizes: Sequence[tuple[int, ...]] | None = None,
) -> None:
    """``a`` (both evaluations) matches ``ref`` and its output_size matches, for each size."""
    assert a.weight.dtype == F64 and a.bias.dtype == F64
    module = A.to_module(a, F64)
    for size in sizes if sizes is not None else input_sizes(a.nd):
        x = torch.randn(2 if a.nd else 5, in_channels, *size, dtype=F64)
        expected = ref(x)
        with torch.no_grad():
            got_module = module(x)
        got_direct = apply_affine(a, x)
        assert rel_err(expected, got_module) < tol, size
        assert rel_err(expected, got_direct) < tol, size
        assert tuple(expected.shape[2:]) == a.output_size(size), size


def seq(*fns: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return run


# --------------------------------------------------------------- from_conv / to_module


# (id, nd, cin, cout, kernel, kwargs)
ROUND_TRIP = [
    ("1d_k3", 1, 4, 6, 3, {"padding": 1}),
    ("1d_k5_s2", 1, 4, 6, 5, {"stride": 2, "padding": 2}),
    ("1d_dil_g2", 1, 4, 6, 3, {"padding": 2, "dilation": 2, "groups": 2}),
    ("1d_reflect", 1, 4, 4, 3, {"padding": 1, "padding_mode": "reflect"}),
    ("2d_3x3", 2, 4, 6, 3, {"padding": 1}),
    ("2d_3x3_nobias", 2, 4, 6, 3, {"padding": 1, "bias": False}),
    ("2d_grouped", 2, 8, 8, 3, {"padding": 1, "groups": 4}),
    ("2d_depthwise", 2, 6, 6, 3, {"padding": 1, "groups": 6}),
    ("2d_depthwise_mult", 2, 4, 8, 3, {"padding": 1, "groups": 4}),
    ("2d_dilated", 2, 4, 6, 3, {"padding": 2, "dilation": 2}),
    ("2d_dilated_aniso", 2, 4, 6, (3, 5), {"padding": (2, 1), "dilation": (2, 1)}),
    ("2d_1x3", 2, 4, 6, (1, 3), {"padding": (0, 1)}),
    ("2d_3x1", 2, 4, 6, (3, 1), {"padding": (1, 0)}),
    ("2d_1x5", 2, 4, 6, (1, 5), {"padding": (0, 2)}),
    ("2d_2x3_even", 2, 4, 6, (2, 3), {"padding": (0, 1)}),
    ("2d_2x2", 2, 4, 6, 2, {}),
    ("2d_s2", 2, 4, 6, 3, {"stride": 2, "padding": 1}),
    ("2d_s2x1", 2, 4, 6, 3, {"stride": (2, 1), "padding": 1}),
    ("2d_reflect", 2, 4, 6, 3, {"padding": 1, "padding_mode": "reflect"}),
    ("2d_replicate", 2, 4, 6, 3, {"padding": 1, "padding_mode": "replicate"}),
    ("2d_circular", 2, 4, 6, 3, {"padding": 1, "padding_mode": "circular"}),
    ("2d_same", 2, 4, 6, 3, {"padding": "same"}),
    ("2d_same_dil", 2, 4, 6, 3, {"padding": "same", "dilation": 2}),
    ("2d_same_1x5", 2, 4, 6, (1, 5), {"padding": "same"}),
    ("2d_same_even_dil2", 2, 4, 6, 2, {"padding": "same", "dilation": 2}),
    ("2d_valid", 2, 4, 6, 3, {"padding": "valid"}),
    ("3d_3x3x3", 3, 4, 6, 3, {"padding": 1}),
    ("3d_1x3x3_g2_s", 3, 4, 6, (1, 3, 3), {"padding": (0, 1, 1), "stride": (1, 2, 2), "groups": 2}),
    ("3d_dilated", 3, 4, 4, (3, 1, 3), {"padding": (2, 0, 1), "dilation": (2, 1, 1)}),
    ("0d_linear", 0, 5, 7, 1, {}),
    ("0d_linear_nobias", 0, 5, 7, 1, {"bias": False}),
]


@pytest.mark.parametrize(
    ("nd", "cin", "cout", "kernel", "kwargs"),
    [case[1:] for case in ROUND_TRIP],
    ids=[case[0] for case in ROUND_TRIP],
)
def test_from_conv_round_trip(nd: int, cin: int, cout: int, kernel, kwargs: dict) -> None:
    module = make_conv(nd, cin, cout, kernel, **kwargs)
    a = conv_affine(module)
    assert a.nd == nd
    assert (a.in_channels, a.out_channels) == (cin, cout)
    if nd == 0:
        assert a.weight.shape == (cout, cin)
    check(a, module, cin)
    rebuilt = A.to_module(a, F64)
    assert type(rebuilt) is type(module)
    if nd:
        assert rebuilt.padding_mode == module.padding_mode
        assert rebuilt.dilation == module.dilation
        assert rebuilt.groups == module.groups


def test_from_conv_same_even_kernel_refused() -> None:
    module = make_conv(2, 4, 4, (2, 3), padding="same")
    with pytest.raises(AlgebraError, match="asymmetric"):
        conv_affine(module)


def test_from_conv_does_not_alias_module() -> None:
    module = make_conv(2, 4, 4, 3, padding=1)
    before = module.weight.detach().clone()
    a = A.scaled(A.add(conv_affine(module), A.identity(4, 2)), 3.0)
    A.to_module(a, torch.float32)
    assert torch.equal(module.weight, before)


# ----------------------------------------------------------------------------- from_bn


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("nd", [0, 1, 2, 3])
def test_from_bn(nd: int, affine: bool) -> None:
    bn = make_bn(nd, 6, affine)
    a = bn_affine(bn, nd)
    assert a.groups == 6 and a.is_pointwise
    check(a, bn_ref(bn), 6)


def test_diagonal_scaled_zero_pad() -> None:
    scale = torch.randn(5, dtype=F64) * 3
    shift = torch.randn(5, dtype=F64) * 2
    check(A.diagonal(scale, shift, 2), lambda x: x * scale[:, None, None] + shift[:, None, None], 5)
    check(A.diagonal(scale, shift, 0), lambda x: x * scale + shift, 5)
    conv = make_conv(2, 5, 3, 3, padding=1)
    check(A.scaled(conv_affine(conv), -2.5), lambda x: -2.5 * conv(x), 5)
    check(A.zero_pad(5, (1, 2)), lambda x: F.pad(x, [2, 2, 1, 1]), 5)
    # zero padding then an unpadded conv is the padded conv
    unpadded = make_conv(2, 5, 3, 3)
    check(
        A.then(A.zero_pad(5, (1, 2)), conv_affine(unpadded)),
        seq(lambda x: F.pad(x, [2, 2, 1, 1]), unpadded),
        5,
    )


# ---------------------------------------------------------------------- identity / groups


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
def test_identity(nd: int) -> None:
    a = A.identity(6, nd)
    assert a.is_identity()
    check(a, lambda x: x, 6)


def test_identity_plus_grouped_conv() -> None:
    """The trap: identity written with g groups has K[i, i mod (C/g), centre] = 1."""
    conv = make_conv(2, 8, 8, 3, padding=1, groups=4)
    fused = A.add(conv_affine(conv), A.identity(8, 2))
    assert fused.groups == 4
    check(fused, lambda x: conv(x) + x, 8)
    delta = fused.weight - conv.weight.detach()
    expected = torch.zeros_like(delta)
    for i in range(8):
        expected[i, i % 2, 1, 1] = 1.0
    assert (delta - expected).abs().max() < 1e-12


def test_identity_plus_depthwise() -> None:
    conv = make_conv(2, 6, 6, 3, padding=1, groups=6)
    fused = A.add(conv_affine(conv), A.identity(6, 2))
    assert fused.groups == 6
    check(fused, lambda x: conv(x) + x, 6)


def test_identity_plus_grouped_conv_1d_3d() -> None:
    for nd in (1, 3):
        conv = make_conv(nd, 6, 6, 3, padding=1, groups=3)
        check(A.add(conv_affine(conv), A.identity(6, nd)), lambda x, c=conv: c(x) + x, 6)


# ----------------------------------------------------------------------------- regroup


@pytest.mark.parametrize(("cin", "cout", "groups"), [(8, 8, 4), (6, 6, 6), (4, 8, 4), (6, 9, 3)])
def test_regroup_dense(cin: int, cout: int, groups: int) -> None:
    conv = make_conv(2, cin, cout, 3, padding=1, groups=groups)
    dense = A.regroup(conv_affine(conv), 1)
    assert dense.groups == 1 and dense.weight.shape == (cout, cin, 3, 3)
    check(dense, conv, cin)


def test_regroup_partial_and_refused() -> None:
    conv = make_conv(2, 8, 8, 3, padding=1, groups=4)
    a = conv_affine(conv)
    two = A.regroup(a, 2)
    assert two.groups == 2 and two.weight.shape == (8, 4, 3, 3)
    check(two, conv, 8)
    assert A.regroup(a, 4) is a
    with pytest.raises(AlgebraError):
        A.regroup(a, 3)


# --------------------------------------------------------------------------- avg pool


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "divisor"),
    [
        ((3, 3), (1, 1), (1, 1), None),
        ((3, 3), (2, 2), (1, 1), None),
        ((2, 2), (2, 2), (0, 0), None),
        ((3, 1), (1, 1), (1, 0), None),
        ((3, 3), (1, 1), (1, 1), 4.0),
    ],
)
def test_from_avgpool(kernel, stride, padding, divisor) -> None:
    a = A.from_avgpool(5, kernel, stride, padding, divisor)
    check(
        a,
        lambda x: F.avg_pool2d(
            x,
            kernel,
            stride,
            padding,
            count_include_pad=True,
            divisor_override=int(divisor) if divisor else None,
        ),
        5,
    )


# --------------------------------------------------------------------------------- add


def _sum_of(modules: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    return lambda x: sum(m(x) for m in modules)


# (id, nd, channels, [(kernel, kwargs), ...], expected kernel_size or None)
ADD_CASES = [
    ("3x3+1x1", 2, 4, [(3, {"padding": 1}), (1, {})], (3, 3)),
    ("3x3+1x1+id_like", 2, 4, [(3, {"padding": 1}), (1, {}), (1, {"bias": False})], (3, 3)),
    (
        "acnet",
        2,
        4,
        [(3, {"padding": 1}), ((1, 3), {"padding": (0, 1)}), ((3, 1), {"padding": (1, 0)})],
        (3, 3),
    ),
    (
        "acnet_k5_s2",
        2,
        4,
        [
            (5, {"padding": 2, "stride": 2}),
            ((1, 5), {"padding": (0, 2), "stride": 2}),
            ((5, 1), {"padding": (2, 0), "stride": 2}),
        ],
        (5, 5),
    ),
    ("dilated+3x3", 2, 4, [(3, {"padding": 2, "dilation": 2}), (3, {"padding": 1})], (5, 5)),
    (
        "dilated+dilated+1x1",
        2,
        4,
        [(3, {"padding": 2, "dilation": 2}), (5, {"padding": 4, "dilation": 2}), (1, {})],
        None,
    ),
    (
        "groups_gcd",
        2,
        8,
        [(3, {"padding": 1, "groups": 4}), (1, {"groups": 2}), (3, {"padding": 1, "groups": 8})],
        (3, 3),
    ),
    ("even_k2_k4", 2, 4, [(2, {}), (4, {"padding": 1})], (4, 4)),
    ("even_mixed", 2, 4, [((2, 3), {"padding": (0, 1)}), ((4, 1), {"padding": (1, 0)})], (4, 3)),
    ("stride2", 2, 4, [(3, {"padding": 1, "stride": 2}), (1, {"stride": 2})], (3, 3)),
    (
        "reflect+1x1",
        2,
        4,
        [(3, {"padding": 1, "padding_mode": "reflect"}), (1, {})],
        (3, 3),
    ),
    ("1d", 1, 4, [(5, {"padding": 2}), (3, {"padding": 1}), (1, {"groups": 2})], (5,)),
    (
        "3d",
        3,
        4,
        [(3, {"padding": 1}), ((1, 3, 3), {"padding": (0, 1, 1)}), (1, {"groups": 4})],
        (3, 3, 3),
    ),
    ("0d", 0, 5, [(1, {}), (1, {"bias": False})], ()),
]


@pytest.mark.parametrize(
    ("nd", "channels", "specs", "kernel_size"),
    [case[1:] for case in ADD_CASES],
    ids=[case[0] for case in ADD_CASES],
)
def test_add(nd: int, channels: int, specs, kernel_size) -> None:
    modules = [make_conv(nd, channels, channels, k, **kw) for k, kw in specs]
    fused = A.add(*(conv_affine(m) for m in modules))
    if kernel_size is not None:
        assert fused.kernel_size == kernel_size
    check(fused, _sum_of(modules), channels)


def test_add_groups_is_gcd() -> None:
    modules = [make_conv(2, 12, 12, 3, padding=1, groups=g) for g in (4, 6)]
    fused = A.add(*(conv_affine(m) for m in modules))
    assert fused.groups == 2
    check(fused, _sum_of(modules), 12)


def test_add_with_identity_and_bn_branch() -> None:
    """RepVGG: conv3x3-BN + conv1x1-BN + BN, all on the same input."""
    c = 6
    conv3, conv1 = make_conv(2, c, c, 3, padding=1, bias=False), make_conv(2, c, c, 1, bias=False)
    bn3, bn1, bn0 = make_bn(2, c), make_bn(2, c), make_bn(2, c)
    fused = A.add(
        A.then(conv_affine(conv3), bn_affine(bn3, 2)),
        A.then(conv_affine(conv1), bn_affine(bn1, 2)),
        bn_affine(bn0, 2),
    )
    assert fused.kernel_size == (3, 3) and fused.groups == 1
    check(fused, lambda x: bn3(conv3(x)) + bn1(conv1(x)) + bn0(x), c)


def test_add_misaligned_refused() -> None:
    a = conv_affine(make_conv(2, 4, 4, 3, padding=1))
    b = conv_affine(make_conv(2, 4, 4, 1, padding=1))
    with pytest.raises(AlgebraError, match="misaligned"):
        A.add(a, b)


def test_add_stride_mismatch_refused() -> None:
    a = conv_affine(make_conv(2, 4, 4, 3, padding=1, stride=2))
    b = conv_affine(make_conv(2, 4, 4, 3, padding=1))
    with pytest.raises(AlgebraError, match="stride"):
        A.add(a, b)


def test_add_other_refusals() -> None:
    a = conv_affine(make_conv(2, 4, 4, 3, padding=1, padding_mode="reflect"))
    b = conv_affine(make_conv(2, 4, 4, 3, padding=1))
    with pytest.raises(AlgebraError, match="padding modes"):
        A.add(a, b)
    with pytest.raises(AlgebraError):
        A.add(conv_affine(make_conv(2, 4, 4, 1)), conv_affine(make_conv(2, 4, 6, 1)))
    with pytest.raises(AlgebraError):
        A.add(conv_affine(make_conv(2, 4, 4, 1)), conv_affine(make_conv(2, 6, 4, 1)))


@pytest.mark.parametrize(
    "specs",
    [
        [(2, {"padding": 1, "dilation": 2}), (1, {})],
        [(3, {"padding": 2, "dilation": 2}), (2, {"padding": 1, "dilation": 2})],
    ],
    ids=["k2d2p1+1x1", "k3d2p2+k2d2p1"],
)
def test_add_dilation_parity(specs) -> None:
    modules = [make_conv(2, 4, 4, k, **kw) for k, kw in specs]
    fused = A.add(*(conv_affine(m) for m in modules))
    check(fused, _sum_of(modules), 4)


# ------------------------------------------------------------------------------ concat


def test_concat_mixed_kernels_and_groups() -> None:
    modules = [
        make_conv(2, 8, 4, 3, padding=1, groups=2),
        make_conv(2, 8, 3, 1),
        make_conv(2, 8, 8, (1, 3), padding=(0, 1), groups=8),
        make_conv(2, 8, 5, 5, padding=2),
        make_conv(2, 8, 2, 3, padding=2, dilation=2, bias=False),
    ]
    fused = A.concat(*(conv_affine(m) for m in modules))
    assert fused.out_channels == 22 and fused.kernel_size == (5, 5)
    check(fused, lambda x: torch.cat([m(x) for m in modules], 1), 8)


@pytest.mark.parametrize("nd", [0, 1, 3])
def test_concat_other_nd(nd: int) -> None:
    k = 1 if nd == 0 else 3
    pad = 0 if nd == 0 else 1
    modules = [make_conv(nd, 4, 3, k, padding=pad), make_conv(nd, 4, 5, 1)]
    if nd:
        modules.append(make_conv(nd, 4, 4, k, padding=pad, groups=4))
    fused = A.concat(*(conv_affine(m) for m in modules))
    check(fused, lambda x: torch.cat([m(x) for m in modules], 1), 4)


def test_concat_with_identity_and_stride() -> None:
    a = make_conv(2, 4, 4, 3, padding=1, stride=2)
    b = make_conv(2, 4, 4, 1, stride=2, groups=2)
    fused = A.concat(conv_affine(a), conv_affine(b))
    check(fused, lambda x: torch.cat([a(x), b(x)], 1), 4)
    fused = A.concat(A.identity(4, 2), conv_affine(make_conv(2, 4, 4, 1)))
    assert fused.out_channels == 8


# -------------------------------------------------------------------------------- then

Step = Callable[[], tuple[A.Affine, Callable[[Tensor], Tensor]]]


def conv_step(nd: int, cin: int, cout: int, kernel=1, **kwargs) -> Step:
    def build() -> tuple[A.Affine, Callable[[Tensor], Tensor]]:
        module = make_conv(nd, cin, cout, kernel, **kwargs)
        return conv_affine(module), module

    return build


def bn_step(nd: int, channels: int, affine: bool = True) -> Step:
    def build() -> tuple[A.Affine, Callable[[Tensor], Tensor]]:
        bn = make_bn(nd, channels, affine)
        return bn_affine(bn, nd), bn_ref(bn)

    return build


def pool_step(channels: int, kernel: int, stride: int, padding: int) -> Step:
    def build() -> tuple[A.Affine, Callable[[Tensor], Tensor]]:
        a = A.from_avgpool(channels, (kernel,) * 2, (stride,) * 2, (padding,) * 2)
        return a, lambda x: F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True)

    return build


# (id, in channels, first, second)
THEN_CASES: list[tuple[str, int, Step, Step]] = [
    ("1x1_nobias>3x3_pad", 4, conv_step(2, 4, 6, bias=False), conv_step(2, 6, 5, 3, padding=1)),
    ("1x1_bias>3x3_pad0", 4, conv_step(2, 4, 6), conv_step(2, 6, 5, 3)),
    ("3x3>1x1", 4, conv_step(2, 4, 6, 3, padding=1), conv_step(2, 6, 5)),
    ("3x3_s2>3x3", 4, conv_step(2, 4, 6, 3, padding=1, stride=2), conv_step(2, 6, 5, 3)),
    ("3x3_s2>3x3_s2", 4, conv_step(2, 4, 6, 3, stride=2), conv_step(2, 6, 5, 3, stride=2)),
    ("3x3>1x1_s2", 4, conv_step(2, 4, 6, 3, padding=1), conv_step(2, 6, 5, stride=2)),
    ("1x3>3x1", 4, conv_step(2, 4, 6, (1, 3), padding=(0, 1)), conv_step(2, 6, 5, (3, 1))),
    (
        "1x3_nobias>3x1_pad",
        4,
        conv_step(2, 4, 6, (1, 3), padding=(0, 1), bias=False),
        conv_step(2, 6, 5, (3, 1), padding=(1, 0)),
    ),
    (
        "grouped>grouped",
        8,
        conv_step(2, 8, 8, 3, padding=1, groups=4),
        conv_step(2, 8, 12, 3, groups=4),
    ),
    ("grouped>dense", 8, conv_step(2, 8, 8, 3, padding=1, groups=4), conv_step(2, 8, 6, 3)),
    ("dense>grouped", 8, conv_step(2, 8, 8, 3, padding=1), conv_step(2, 8, 6, 3, groups=2)),
    ("g4>g2", 8, conv_step(2, 8, 8, 3, padding=1, groups=4), conv_step(2, 8, 6, 3, groups=2)),
    (
        "1x1_g2>3x3_g4_pad",
        8,
        conv_step(2, 8, 8, groups=2, bias=False),
        conv_step(2, 8, 8, 3, padding=1, groups=4),
    ),
    (
        "dw>dw",
        6,
        conv_step(2, 6, 6, 3, padding=1, groups=6),
        conv_step(2, 6, 6, 3, groups=6),
    ),
    (
        "dw_s2>dw",
        6,
        conv_step(2, 6, 6, 3, padding=1, groups=6, stride=2),
        conv_step(2, 6, 6, 3, groups=6),
    ),
    (
        "dw>dw_dil",
        6,
        conv_step(2, 6, 6, 3, padding=1, groups=6),
        conv_step(2, 6, 6, 3, groups=6, dilation=2),
    ),
    ("dw_mult>dw", 4, conv_step(2, 4, 8, 3, groups=4), conv_step(2, 8, 8, 3, groups=8)),
    ("dilated>3x3", 4, conv_step(2, 4, 6, 3, padding=2, dilation=2), conv_step(2, 6, 5, 3)),
    ("3x3>dilated", 4, conv_step(2, 4, 6, 3, padding=1), conv_step(2, 6, 5, 3, dilation=2)),
    ("even2x2>3x3", 4, conv_step(2, 4, 6, 2), conv_step(2, 6, 5, (3, 2))),
    ("conv>bn", 4, conv_step(2, 4, 6, 3, padding=1), bn_step(2, 6)),
    ("conv_s2_g2>bn", 4, conv_step(2, 4, 6, 3, padding=1, stride=2, groups=2), bn_step(2, 6)),
    ("dw>bn_noaffine", 6, conv_step(2, 6, 6, 3, padding=1, groups=6), bn_step(2, 6, False)),
    ("bn>1x1", 6, bn_step(2, 6), conv_step(2, 6, 5)),
    ("bn>3x3_pad0", 6, bn_step(2, 6), conv_step(2, 6, 5, 3)),
    ("bn>bn", 6, bn_step(2, 6), bn_step(2, 6)),
    (
        "1x1_s2_nobias>3x3_pad",
        4,
        conv_step(2, 4, 6, stride=2, bias=False),
        conv_step(2, 6, 5, 3, padding=1),
    ),
    ("1x1_nobias>avgpool", 4, conv_step(2, 4, 6, bias=False), pool_step(6, 3, 1, 1)),
    ("1x1_nobias>avgpool_s2", 4, conv_step(2, 4, 6, bias=False), pool_step(6, 3, 2, 1)),
    ("3x3>avgpool_pad0", 4, conv_step(2, 4, 6, 3, padding=1), pool_step(6, 2, 2, 0)),
    (
        "1x1_bias>3x3_reflect",
        4,
        conv_step(2, 4, 6),
        conv_step(2, 6, 5, 3, padding=1, padding_mode="reflect"),
    ),
    (
        "3x3_reflect>3x3",
        4,
        conv_step(2, 4, 6, 3, padding=1, padding_mode="reflect"),
        conv_step(2, 6, 5, 3),
    ),
    ("1d_k5>k3_s2", 4, conv_step(1, 4, 6, 5, padding=2), conv_step(1, 6, 5, 3, stride=2)),
    ("1d_conv>bn", 4, conv_step(1, 4, 6, 3, padding=1), bn_step(1, 6)),
    ("3d_conv>conv", 4, conv_step(3, 4, 6, 3, padding=1), conv_step(3, 6, 5, (1, 3, 3))),
    ("3d_conv>bn", 4, conv_step(3, 4, 6, 3, padding=1, groups=2), bn_step(3, 6)),
    ("0d_linear>linear", 5, conv_step(0, 5, 7), conv_step(0, 7, 3)),
    ("0d_bn>bn", 5, bn_step(0, 5), bn_step(0, 5)),
]


@pytest.mark.parametrize(
    ("cin", "first", "second"),
    [case[1:] for case in THEN_CASES],
    ids=[case[0] for case in THEN_CASES],
)
def test_then(cin: int, first: Step, second: Step) -> None:
    a, ref_a = first()
    b, ref_b = second()
    check(A.then(a, b), seq(ref_a, ref_b), cin)


def test_then_chain_of_three() -> None:
    """DBB-style 1x1 -> BN -> unpadded kxk, composed in either association."""
    c1, bn, c3 = make_conv(2, 4, 6, bias=False), make_bn(2, 6), make_conv(2, 6, 5, 3)
    fused = A.then(A.then(conv_affine(c1), bn_affine(bn, 2)), conv_affine(c3))
    check(fused, seq(c1, bn_ref(bn), c3), 4)
    other = A.then(conv_affine(c1), A.then(bn_affine(bn, 2), conv_affine(c3)))
    check(other, seq(c1, bn_ref(bn), c3), 4)


@pytest.mark.parametrize("order", ["bn>linear", "linear>bn"])
def test_then_0d_bn_linear(order: str) -> None:
    bn, linear = make_bn(0, 5), make_conv(0, 5, 5)
    if order == "bn>linear":
        fused = A.then(bn_affine(bn, 0), conv_affine(linear))
        ref = lambda x: F.linear(bn_ref(bn)(x), linear.weight, linear.bias)  # noqa: E731
    else:
        fused = A.then(conv_affine(linear), bn_affine(bn, 0))
        ref = lambda x: bn_ref(bn)(F.linear(x, linear.weight, linear.bias))  # noqa: E731
    check(fused, ref, 5)


def test_then_bn_before_padded_conv_refused() -> None:
    bn, conv = make_bn(2, 6), make_conv(2, 6, 5, 3, padding=1)
    with pytest.raises(AlgebraError, match="border"):
        A.then(bn_affine(bn, 2), conv_affine(conv))


def test_then_zero_preserving_bn_before_padded_conv() -> None:
    """A BN with zero mean and no affine sends zero to zero: composing with padding is exact."""
    bn = BN_MODULE[2](6, affine=False, dtype=F64).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(6, dtype=F64) * 10 + 0.1)
    conv = make_conv(2, 6, 5, 3, padding=1)
    check(A.then(bn_affine(bn, 2), conv_affine(conv)), seq(bn_ref(bn), conv), 6)


def test_then_other_refusals() -> None:
    a3 = conv_affine(make_conv(2, 4, 6, 3, padding=1, bias=False))
    b3 = conv_affine(make_conv(2, 6, 6, 3, padding=1))
    with pytest.raises(AlgebraError, match="border"):
        A.then(a3, b3)
    strided = conv_affine(make_conv(2, 4, 6, 1, stride=2))
    reflect = conv_affine(make_conv(2, 6, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(AlgebraError):
        A.then(strided, reflect)
    with pytest.raises(AlgebraError):
        A.then(a3, conv_affine(make_conv(2, 5, 6, 1)))
    with pytest.raises(AlgebraError):
        A.then(a3, conv_affine(make_conv(1, 6, 6, 1)))
    pool = A.from_avgpool(6, (3, 3), (1, 1), (1, 1))
    with pytest.raises(AlgebraError, match="border"):
        A.then(conv_affine(make_conv(2, 4, 6, 1)), pool)


def test_then_bias_tolerance_before_padded_conv() -> None:
    """A bias below ZERO_BIAS_TOLERANCE (relative to the weights) counts as zero; above, refused."""
    first = make_conv(2, 4, 6, 1)
    second = make_conv(2, 6, 5, 3, padding=1)
    with torch.no_grad():
        first.bias.fill_(1e-12)
    check(A.then(conv_affine(first), conv_affine(second)), seq(first, second), 4, tol=1e-9)
    with torch.no_grad():
        first.bias.fill_(1e-3)
    with pytest.raises(AlgebraError, match="border"):
        A.then(conv_affine(first), conv_affine(second))


# --------------------------------------------------------------------------- to_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nd", [0, 2])
def test_to_module_dtype(nd: int, dtype: torch.dtype) -> None:
    if nd:
        conv, bn = make_conv(nd, 4, 6, 3, padding=1), make_bn(nd, 6)
        fused = A.then(conv_affine(conv), bn_affine(bn, nd))
        ref = seq(conv, bn_ref(bn))
    else:  # a Linear, then a BatchNorm1d alone (groups=C, written densely)
        linear, bn = make_conv(0, 4, 6), make_bn(0, 4)
        fused = A.add(conv_affine(linear), conv_affine(linear))
        ref = lambda x: 2 * linear(x)  # noqa: E731
        bn_module = A.to_module(bn_affine(bn, 0), dtype)
        assert isinstance(bn_module, nn.Linear) and bn_module.weight.dtype == dtype
    module = A.to_module(fused, dtype)
    assert module.weight.dtype == dtype and module.bias.dtype == dtype
    reference = A.to_module(fused, F64)
    assert reference.weight.dtype == F64
    assert torch.equal(module.weight, reference.weight.to(dtype))
    assert torch.equal(module.bias, reference.bias.to(dtype))
    if dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 4, *(8,) * nd, dtype=F64)
        with torch.no_grad():
            err = rel_err(ref(x), module(x.to(dtype)))
        assert err < (1e-5 if dtype == torch.float32 else TOL)


def _fold_native(w: Tensor, b: Tensor, bn: dict[str, Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Conv-BN folding done entirely in the checkpoint's own low-precision dtype."""
    scale = bn["weight"] / torch.sqrt(bn["var"] + eps)
    return w * scale.reshape(-1, 1, 1, 1), (b - bn["mean"]) * scale + bn["bias"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float64_math_loses_less_than_native_fold(dtype: torch.dtype) -> None:
    cin, cout, eps = 16, 32, 1e-3
    w = (torch.randn(cout, cin, 3, 3) * 0.2).to(dtype)
    b = torch.randn(cout).to(dtype)
    stats = {
        "mean": (torch.randn(cout) * 3 + 2).to(dtype),
        "var": (torch.rand(cout) * 8 + 0.05).to(dtype),
        "weight": (torch.randn(cout) * 2).to(dtype),
        "bias": (torch.randn(cout) * 2).to(dtype),
    }
    x = torch.randn(4, cin, 9, 9, dtype=F64)
    # ground truth: the low-precision checkpoint evaluated unfused in float64
    truth = F.batch_norm(
        F.conv2d(x, w.double(), b.double(), padding=1),
        stats["mean"].double(),
        stats["var"].double(),
        stats["weight"].double(),
        stats["bias"].double(),
        training=False,
        eps=eps,
    )
    fused = A.then(
        A.from_conv(w, b, padding=1),
        A.from_bn(stats["mean"], stats["var"], stats["weight"], stats["bias"], eps, 2),
    )
    ours = A.to_module(fused, dtype)
    assert ours.weight.dtype == dtype
    native_w, native_b = _fold_native(w, b, stats, eps)
    assert native_w.dtype == dtype
    # evaluate both weight sets in float64 so only the weight rounding is compared
    err_ours = rel_err(truth, F.conv2d(x, ours.weight.double(), ours.bias.double(), padding=1))
    err_native = rel_err(truth, F.conv2d(x, native_w.double(), native_b.double(), padding=1))
    assert err_ours <= err_native, (err_ours, err_native)
    assert err_ours < (2e-3 if dtype == torch.float16 else 2e-2)


# ------------------------------------------------------------------- Affine properties


def test_affine_properties() -> None:
    a = conv_affine(make_conv(2, 8, 6, (3, 5), padding=(2, 2), dilation=(2, 1), groups=2))
    assert a.kernel_size == (3, 5) and a.extent == (5, 5)
    assert a.in_channels == 8 and a.out_channels == 6
    assert a.macs_per_output() == 4 * 15
    assert not a.is_pointwise and not a.is_identity()
    pw = conv_affine(make_conv(2, 4, 3, 1, groups=1))
    assert torch.equal(pw.dense_matrix(), pw.weight.reshape(3, 4))
    assert not A.diagonal(torch.ones(4), torch.ones(4), 2).is_identity()
    assert A.identity(4, 0).is_identity()
    assert not A.zero_pad(4, (1, 1)).is_identity()


# ------------------------------------------------------------ property: add of branches


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _aligned(shrink: int, pad: int, dil: int) -> tuple[int, int, int] | None:
    """(kernel, dilation, padding) near (pad, dil) with ``extent - 2 * padding == shrink``."""
    for p in (pad, 0, 1, 2, 3):
        for d in (dil, 3 - dil):
            k, rest = divmod(shrink + 2 * p - 1, d)
            if rest == 0 and 0 <= k <= 4:
                return k + 1, d, p
    return None


@st.composite
def branch_lists(draw: st.DrawFn) -> tuple[int, list[dict]]:
    """1-4 conv branches on one input; later branches are often aligned with the first one per
    dim (so that add() has something to fuse), else drawn freely (so that it must refuse)."""
    channels = draw(st.sampled_from([4, 6]))
    count = draw(st.sampled_from([2, 3, 4, 1]))
    shared_stride = draw(st.booleans())
    stride0 = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    specs: list[dict] = []
    for i in range(count):
        kernel, dilation, padding = [], [], []
        for dim in range(2):
            k = draw(st.integers(1, 5))
            d = draw(st.integers(1, 2))
            p = draw(st.integers(0, 3))
            found = _aligned(specs[0]["shrink"][dim], p, d) if i else None
            if found and draw(st.integers(0, 4)):  # aligned 4 times in 5 where possible
                k, d, p = found
            # every branch must produce an output on the smallest input (7)
            p = max(p, math.ceil((d * (k - 1) + 1 - 7) / 2))
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
        specs.append(
            {
                "kernel": tuple(kernel),
                "dilation": tuple(dilation),
                "padding": tuple(padding),
                "stride": stride0
                if shared_stride
                else draw(st.tuples(st.integers(1, 2), st.integers(1, 2))),
                "groups": draw(st.sampled_from(_divisors(channels))),
                "bias": draw(st.booleans()),
                "shrink": tuple(
                    d * (k - 1) + 1 - 2 * p
                    for k, d, p in zip(kernel, dilation, padding, strict=True)
                ),
            }
        )
    return channels, specs


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(branch_lists())
def test_add_property(case: tuple[int, list[dict]]) -> None:
    channels, specs = case
    modules = [
        make_conv(
            2,
            channels,
            channels,
            s["kernel"],
            stride=s["stride"],
            padding=s["padding"],
            dilation=s["dilation"],
            groups=s["groups"],
            bias=s["bias"],
        )
        for s in specs
    ]
    inputs = {n: torch.randn(1, channels, n, n + 1, dtype=F64) for n in range(7, 11)}
    with torch.no_grad():
        outputs = {n: [m(x) for m in modules] for n, x in inputs.items()}
    shapes_differ = any(len({o.shape for o in outs}) > 1 for outs in outputs.values())
    strides_differ = len({s["stride"] for s in specs}) > 1
    shrink_differs = len({s["shrink"] for s in specs}) > 1
    try:
        fused = A.add(*(conv_affine(m) for m in modules))
    except AlgebraError as error:
        assert shapes_differ or strides_differ or shrink_differs, (str(error), specs)
        return
    assert fused.groups == math.gcd(*(s["groups"] for s in specs))
    module = A.to_module(fused, F64)
    for n, x in inputs.items():
        expected = sum(outputs[n])
        with torch.no_grad():
            got = module(x)
        assert rel_err(expected, got) < 1e-9, (n, specs)
        assert rel_err(expected, apply_affine(fused, x)) < 1e-9, (n, specs)
        assert tuple(expected.shape[2:]) == fused.output_size((n, n + 1))


@pytest.mark.parametrize("groups_a,groups_b", [(1, 4), (4, 1), (8, 1), (1, 8), (2, 4), (4, 4)])
@pytest.mark.parametrize("kernels", [(1, 3), (3, 1), (1, 1)])
def test_then_mixes_groups_without_dense_kernels(groups_a: int, groups_b: int,
                                                 kernels: tuple[int, int]) -> None:
    """A pointwise map before or after a grouped (depthwise) kernel, or the reverse: the block
    by block products equal running the two convs."""
    gen = torch.Generator().manual_seed(groups_a * 10 + groups_b)
    ka, kb = kernels
    a = A.from_conv(torch.randn(8, 8 // groups_a, ka, ka, generator=gen, dtype=F64),
                    torch.randn(8, generator=gen, dtype=F64), padding=ka // 2, groups=groups_a)
    b = A.from_conv(torch.randn(16, 8 // groups_b, kb, kb, generator=gen, dtype=F64),
                    torch.randn(16, generator=gen, dtype=F64), groups=groups_b)
    composed = A.then(a, b)
    x = torch.randn(2, 8, 9, 7, generator=gen, dtype=F64)
    assert rel_err(apply_affine(b, apply_affine(a, x)), apply_affine(composed, x)) < 1e-12
