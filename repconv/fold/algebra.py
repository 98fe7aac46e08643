"""The algebra of linear maps that are exactly one convolution.

An `Affine` is the map ``x -> conv(x, weight, stride, padding, dilation, groups) + bias`` of one
N-d convolution (N = 0 is a fully connected layer on ``(batch, channels)`` inputs). Every op
repconv folds (conv, eval BatchNorm, identity, average pooling, zero padding, channel scale,
constant multiply, sum and concat of branches, composition) is an operation on these values.

All math runs in float64; `to_module` casts once at the end, so fp16/bf16 checkpoints lose less
precision than fusing in their own dtype. Functions are pure: they never touch a module or graph.
An operation that would not be exact raises `AlgebraError` whose message is the reason.

The same functions fold geometry alone: an `Affine` whose tensors are on the meta device has
shapes, groups and strides but no numbers (`geometry_only`). Its result's shape is worked out,
not computed (torch's meta kernels are Python code: slow, and the first use imports the whole
compiler stack). The few decisions that read numbers (a bias before a zero-padded conv, groups a
product keeps, an exact identity) raise `ValuesNeeded` on such a map, and the caller folds the
numbers of just that part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repconv.errors import AlgebraError

# A bias this small, relative to its channel's weights, counts as zero when deciding whether a
# map sends zero to zero. It covers float32 rounding of constants that cancel a bias (DBB's
# pad(t - c) + c); local verification of every rewrite backs it with a measurement.
ZERO_BIAS_TOLERANCE = 1e-5


class ValuesNeeded(Exception):
    """A decision that reads a map's numbers was asked of its geometry alone."""


def _read_values(*tensors: Tensor) -> None:
    if any(t.is_meta for t in tensors):
        raise ValuesNeeded


def _geometry(*maps: Affine) -> bool:
    """The maps are geometry alone (`geometry_only`): a result's shape is worked out."""
    return any(m.weight.is_meta for m in maps)


def _shaped(*shape: int) -> Tensor:
    return torch.empty(shape, dtype=torch.float64, device="meta")


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_MODULE: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE_MODULE: dict[int, type[nn.Module]] = {
    1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d
}


@dataclass(frozen=True)
class Affine:
    """One convolution as a value: ``weight`` is (out, in // groups, *kernel), float64."""

    weight: Tensor
    bias: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    # A transposed conv keeps torch's (in, out // groups, *kernel) weight layout.
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Input span of one output position per dim: dilation * (kernel - 1) + 1."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    @property
    def is_pointwise(self) -> bool:
        return all(e == 1 for e in self.extent)

    def macs_per_output(self) -> int:
        """Multiply-accumulates per output element."""
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def output_size(self, input_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            (n + 2 * p - e) // s + 1
            for n, p, e, s in zip(input_size, self.padding, self.extent, self.stride)
        )

    def is_identity(self) -> bool:
        if self.transposed or self.in_channels != self.out_channels or not self.is_pointwise:
            return False
        if any(s != 1 for s in self.stride) or any(p != 0 for p in self.padding):
            return False
        _read_values(self.weight, self.bias)
        if self.bias.any():
            return False
        # each group's square block must be the identity; no need to expand the groups
        block = self.out_channels // self.groups
        blocks = self.weight.reshape(self.groups, block, block)
        return bool(torch.equal(blocks, torch.eye(block, dtype=blocks.dtype).expand_as(blocks)))

    def dense_matrix(self) -> Tensor:
        """(out, in) matrix of a pointwise map, groups expanded."""
        return regroup(self, 1).weight.reshape(self.out_channels, self.in_channels)


def _tuple(value: int | tuple[int, ...] | list[int], nd: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    return tuple(int(v) for v in value)


def from_conv(
    weight: Tensor,
    bias: Tensor | None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    as_float64: bool = True,
) -> Affine:
    """A convolution (or, for a 2-d weight, a linear layer) with torch's argument conventions.

    ``as_float64=False`` keeps the layer's own tensors (no copy): for lowering a whole
    checkpoint, whose convs `Float64Copies` converts one at a time where they are folded."""
    weight = weight.detach().double() if as_float64 else weight.detach()
    nd = weight.dim() - 2
    dilation_t = _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            padding_t = (0,) * nd
        else:  # "same": torch puts an odd total on the right, which no symmetric padding matches
            totals = [d * (k - 1) for d, k in zip(dilation_t, weight.shape[2:])]
            if any(t % 2 for t in totals):
                raise AlgebraError("padding='same' with an even kernel pads asymmetrically")
            padding_t = tuple(t // 2 for t in totals)
    else:
        padding_t = _tuple(padding, nd)
    if padding_mode != "zeros" and not any(padding_t):
        padding_mode = "zeros"
    out = weight.shape[0]
    if bias is None:
        bias_t = torch.zeros(out, dtype=weight.dtype)
    else:
        bias_t = bias.detach().double() if as_float64 else bias.detach()
    return Affine(
        weight, bias_t, _tuple(stride, nd), padding_t, dilation_t, groups, padding_mode
    )


class Float64Copies:
    """Each layer tensor's float64 copy, made once: a region's local check and then its fold
    read the same copies (a large kernel is converted once, and only while its region is worked
    on). After `spend` (the check has read them) each copy is handed out once more, to a fold
    that may overwrite it. Copies are cut from ``workspace`` while it has room: memory the
    previous region's copies used, which the system need not hand out (and zero) again."""

    def __init__(self, workspace: Tensor | None = None) -> None:
        # each copy beside its source, which stays alive: its memory is not reused meanwhile
        self._copies: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}
        self._spent = False
        self._handed: set[int] = set()
        self._room = workspace.view(-1) if workspace is not None else None
        self.wanted = 0  # float64 elements copied: the workspace the next region may want

    def _double(self, tensor: Tensor) -> Tensor:
        self.wanted += tensor.numel()
        room = self._room
        if (room is None or not tensor.is_contiguous() or tensor.device != room.device
                or tensor.numel() > room.numel()):
            return tensor.double()
        self._room = room[tensor.numel():]
        return room[:tensor.numel()].view(tensor.shape).copy_(tensor)

    def of(self, tensor: Tensor) -> Tensor:
        if tensor.dtype == torch.float64 or not tensor.is_floating_point():
            return tensor
        # the same memory seen as the same view: a layer's tensor, however it was reached
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape),
               tensor.stride())
        if not self._spent:
            if key not in self._copies:
                self._copies[key] = (tensor, self._double(tensor))
            return self._copies[key][1]
        _, copy = self._copies.pop(key, (tensor, None))
        copy = self._double(tensor) if copy is None else copy
        self._handed.add(id(copy))
        return copy

    def spend(self) -> None:
        self._spent = True

    def disposable(self, tensor: Tensor) -> bool:
        """``tensor`` is a copy handed out after `spend`: nothing else reads it."""
        return id(tensor) in self._handed

    def affine(self, a: Affine) -> Affine:
        """``a`` with float64 tensors (itself when they already are)."""
        weight, bias = self.of(a.weight), self.of(a.bias)
        return a if weight is a.weight and bias is a.bias else replace(a, weight=weight, bias=bias)


def from_conv_transpose(
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    output_padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Affine:
    """A transposed convolution; weight in torch's (in, out // groups, *kernel) layout."""
    weight = weight.detach().double()
    out = weight.shape[1] * groups
    bias_t = torch.zeros(out, dtype=torch.float64) if bias is None else bias.detach().double()
    return Affine(weight, bias_t, tuple(stride), tuple(padding), tuple(dilation), groups,
                  transposed=True, output_padding=tuple(output_padding))


def is_per_channel(a: Affine) -> bool:
    """``a`` is a per-channel ``x * scale + shift`` (BatchNorm, layer scale, identity)."""
    if a.transposed or not a.is_pointwise or any(a.padding) or any(s != 1 for s in a.stride):
        return False
    return a.groups == a.out_channels and a.in_channels == a.out_channels


def _transposed_then(a: Affine, b: Affine) -> Affine:
    """A per-channel map after a transposed conv scales its output axis: weight dim 1 within
    each group (torch's own fusion helper gets this wrong for groups > 1)."""
    if not a.transposed or not is_per_channel(b):
        raise AlgebraError("a transposed conv folds only with a BN or channel scale after it")
    if _geometry(a, b):
        return a  # the output axis scaled: the same shapes
    scale, shift = b.weight.reshape(-1), b.bias
    g = a.groups
    grouped = a.weight.reshape(g, a.in_channels // g, a.out_channels // g, *a.kernel_size)
    factor = scale.reshape(g, 1, a.out_channels // g, *([1] * a.nd))
    return replace(a, weight=(grouped * factor).reshape(a.weight.shape),
                   bias=a.bias * scale + shift)


def diagonal(scale: Tensor, shift: Tensor, nd: int) -> Affine:
    """Per-channel ``x * scale + shift``: a depthwise pointwise convolution."""
    scale = scale.detach().double().reshape(-1)
    channels = scale.numel()
    return Affine(
        scale.reshape(channels, 1, *([1] * nd)),
        shift.detach().double().reshape(-1).expand(channels).clone(),
        (1,) * nd,
        (0,) * nd,
        (1,) * nd,
        channels,
    )


def identity(channels: int, nd: int) -> Affine:
    return diagonal(torch.ones(channels), torch.zeros(channels), nd)


def bn_statistics_problem(running_mean: Tensor, running_var: Tensor) -> str | None:
    """Why BatchNorm statistics make no per-channel map (NaN/Inf, a negative variance), or
    None."""
    if not (torch.isfinite(running_mean).all() and torch.isfinite(running_var).all()):
        return "running statistics contain NaN or Inf"
    if (running_var < 0).any():
        return "negative running_var entries"
    return None


def from_bn(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    nd: int,
) -> Affine:
    """Eval BatchNorm: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    inv_std = (running_var.detach().double() + eps).rsqrt()
    scale = inv_std if weight is None else weight.detach().double() * inv_std
    shift = -running_mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return diagonal(scale, shift, nd)


def from_avgpool(
    channels: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    divisor: float | None = None,
) -> Affine:
    """Average pooling counting padded zeros (count_include_pad=True): a depthwise box filter."""
    nd = len(kernel_size)
    weight = torch.full(
        (channels, 1, *kernel_size),
        1.0 / (divisor if divisor else math.prod(kernel_size)),
        dtype=torch.float64,
    )
    return Affine(
        weight, torch.zeros(channels, dtype=torch.float64), stride, padding, (1,) * nd, channels
    )


def zero_pad(channels: int, padding: tuple[int, ...]) -> Affine:
    """Symmetric zero padding: the identity with a border of zeros."""
    return replace(identity(channels, len(padding)), padding=padding)


def scaled(a: Affine, factor: float) -> Affine:
    if factor == 1 or _geometry(a):
        return a
    return replace(a, weight=a.weight * factor, bias=a.bias * factor)


def geometry_only(a: Affine) -> Affine:
    """``a`` with float64 tensors on the meta device: its shape, groups and strides, no
    numbers and no storage."""
    return replace(a, weight=_shaped(*a.weight.shape), bias=_shaped(*a.bias.shape))


def same_geometry(a: Affine, b: Affine) -> bool:
    """The two maps have the same kernel shape, groups, strides, padding and dilation."""
    return a.weight.shape == b.weight.shape and a.bias.shape == b.bias.shape and all(
        getattr(a, name) == getattr(b, name) for name in (
            "stride", "padding", "dilation", "groups", "padding_mode", "transposed",
            "output_padding"))


def regroup(a: Affine, groups: int) -> Affine:
    """The same map written with fewer groups (``groups`` divides ``a.groups``), block-diagonally.

    Output channel o of group j reads input slice j; in the coarser grouping its group j' holds
    ``a.groups // groups`` old groups, so its kernel sits at offset
    ``(j mod ratio) * in_per_group``.
    This is what makes identity-with-groups correct: K[i, i mod (C/g), centre] = 1.
    """
    if groups == a.groups:
        return a
    if a.groups % groups:
        raise AlgebraError(f"cannot write a {a.groups}-group conv with {groups} groups")
    ratio = a.groups // groups
    out_per_group = a.out_channels // a.groups
    in_per_group = a.weight.shape[1]
    if _geometry(a):
        return replace(a, weight=_shaped(a.out_channels, in_per_group * ratio, *a.kernel_size),
                       groups=groups)
    weight = a.weight.new_zeros(a.out_channels, in_per_group * ratio, *a.kernel_size)
    rows = torch.arange(a.out_channels)
    offsets = (rows // out_per_group % ratio) * in_per_group
    weight[rows[:, None], offsets[:, None] + torch.arange(in_per_group)] = a.weight
    return replace(a, weight=weight, groups=groups)


def _materialize_dilation(a: Affine, dims: list[int]) -> Affine:
    """Insert the zeros of dilation into the kernel for ``dims``, leaving dilation 1 there."""
    if not any(a.dilation[d] > 1 for d in dims):
        return a
    shape = list(a.weight.shape)
    index: list[slice] = [slice(None), slice(None)]
    dilation = list(a.dilation)
    for d in range(a.nd):
        if d in dims:
            shape[2 + d] = a.extent[d]
            index.append(slice(None, None, a.dilation[d]))
            dilation[d] = 1
        else:
            index.append(slice(None))
    if _geometry(a):
        return replace(a, weight=_shaped(*shape), dilation=tuple(dilation))
    weight = a.weight.new_zeros(shape)
    weight[tuple(index)] = a.weight
    return replace(a, weight=weight, dilation=tuple(dilation))


def _common_dilation(branches: list[Affine]) -> list[Affine]:
    """Rewrite branches to one dilation per dim; a size-1 kernel dim takes any dilation."""
    out = list(branches)
    nd = branches[0].nd
    for d in range(nd):
        wide = {b.dilation[d] for b in out if b.kernel_size[d] > 1}
        common = wide.pop() if len(wide) == 1 else 1
        pad = max(b.padding[d] for b in out)
        if any((pad - b.padding[d]) % common for b in out):
            common = 1  # kernels sit between each other's dilated taps: spell out the zeros
        fixed = []
        for b in out:
            if b.kernel_size[d] == 1:
                dilation = list(b.dilation)
                dilation[d] = common
                b = replace(b, dilation=tuple(dilation))
            elif b.dilation[d] != common:
                b = _materialize_dilation(b, [d])
            fixed.append(b)
        out = fixed
    return out


@dataclass(frozen=True)
class _Frame:
    """Where branches of one input meet: the shared kernel size, padding and groups, and the
    branches rewritten to one dilation."""

    branches: list[Affine]
    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    padding_mode: str

    def offsets(self, b: Affine) -> tuple[int, ...]:
        """Where ``b``'s kernel sits in the frame, per dim (centre-aligned)."""
        return tuple((p - bp) // dil for p, bp, dil in zip(self.padding, b.padding, b.dilation))

    def template(self) -> Affine:
        return replace(self.branches[0], padding=self.padding, groups=self.groups,
                       padding_mode=self.padding_mode)


def _common_frame(branches: list[Affine], what: str) -> _Frame:
    """The frame every branch kernel fits in, centre-aligned per dim.

    Two convs read the same window of their shared input iff they have equal stride and equal
    ``extent - 2 * padding`` per dim (then their outputs have equal size for every input size
    and equal centres). The frame's padding is the largest; a branch with padding p sits at
    offset ``(P - p) / dilation`` in the frame.
    """
    first = branches[0]
    if any(b.transposed for b in branches):
        raise AlgebraError(f"cannot {what} a transposed conv with other branches")
    for b in branches[1:]:
        if b.nd != first.nd:
            raise AlgebraError(f"cannot {what} a {b.nd}-d and a {first.nd}-d conv")
        if b.in_channels != first.in_channels:
            raise AlgebraError(
                f"cannot {what} maps of {first.in_channels} and {b.in_channels} input channels"
            )
        if b.stride != first.stride:
            raise AlgebraError(f"stride mismatch: {first.stride} vs {b.stride}")
    modes = {b.padding_mode for b in branches if any(b.padding)}
    if len(modes) > 1:
        raise AlgebraError(f"padding modes differ: {sorted(modes)}")
    branches = _common_dilation(branches)
    padding: list[int] = []
    kernel: list[int] = []
    for d in range(first.nd):
        shrink = {b.extent[d] - 2 * b.padding[d] for b in branches}
        if len(shrink) > 1:
            detail = ", ".join(f"{b.kernel_size[d]} pad {b.padding[d]}" for b in branches)
            raise AlgebraError(f"padding misaligned in dim {d}: kernels {detail}")
        pad = max(b.padding[d] for b in branches)
        dilation = branches[0].dilation[d]
        padding.append(pad)
        kernel.append(max(b.kernel_size[d] + 2 * (pad - b.padding[d]) // dilation
                          for b in branches))
    return _Frame(branches, tuple(kernel), tuple(padding),
                  math.gcd(*(b.groups for b in branches)), modes.pop() if modes else "zeros")


def _framed_kernels(frame: _Frame) -> list[Tensor]:
    """Each branch's kernel written out in the frame (its groups too)."""
    kernels = []
    for b in (regroup(b, frame.groups) for b in frame.branches):
        pads: list[int] = []
        for d in reversed(range(b.nd)):  # F.pad lists the last dim first
            offset = frame.offsets(b)[d]
            pads += [offset, frame.kernel[d] - b.kernel_size[d] - offset]
        kernels.append(F.pad(b.weight, pads) if b.nd else b.weight)
    return kernels


def add(*branches: Affine, scratch: tuple[bool, ...] = ()) -> Affine:
    """Sum of maps applied to the same input: kernels summed in a common centred frame.

    Each branch is added into one accumulator where it sits, without writing out its padding
    or its groups: at checkpoint scale a dense 3x3 kernel is hundreds of MB in float64.
    ``scratch[i]``: branch i's weight is the caller's temporary, which nothing reads after this
    call; when that branch fills the frame the sum accumulates in it, without a copy."""
    frame = _common_frame(list(branches), "add")
    if len({b.out_channels for b in branches}) > 1:
        raise AlgebraError("cannot add branches with different output channels")
    first = frame.branches[0]
    out_channels = first.out_channels
    shape = (out_channels, first.in_channels // frame.groups, *frame.kernel)
    if _geometry(*frame.branches):
        return replace(frame.template(), weight=_shaped(*shape), bias=_shaped(out_channels))
    # a branch that fills the frame (RepVGG's 3x3) starts the sum: one copy, no zero fill
    index = next((i for i, b in enumerate(frame.branches) if b.groups == frame.groups
                  and tuple(b.weight.shape) == shape), None)
    start = None if index is None else frame.branches[index]
    if start is None:
        weight = first.weight.new_zeros(shape)
    elif start.weight is not branches[index].weight or (index < len(scratch) and scratch[index]):
        weight = start.weight  # a temporary: the caller's, or the frame's (dilation spelled out)
    else:
        weight = start.weight.clone()
    for b in frame.branches:
        if b is start:
            continue
        window = tuple(slice(o, o + k) for o, k in zip(frame.offsets(b), b.kernel_size))
        if b.groups == frame.groups:
            weight[(slice(None), slice(None), *window)] += b.weight
            continue
        # b has ratio times the groups: its kernels fill a block diagonal (see `regroup`)
        ratio, in_per_group = b.groups // frame.groups, b.weight.shape[1]
        rows = torch.arange(out_channels)
        offsets = (rows // (out_channels // b.groups) % ratio) * in_per_group
        columns = offsets[:, None] + torch.arange(in_per_group)
        weight[(rows[:, None], columns, *window)] += b.weight
    return replace(frame.template(), weight=weight,
                   bias=torch.stack([b.bias for b in branches]).sum(0))


def concat(*branches: Affine) -> Affine:
    """Maps of the same input stacked along output channels (torch.cat on dim 1)."""
    if len(branches) == 1:
        return branches[0]  # cat([x]) is x, not a dense channel map
    if len({b.groups for b in branches}) == 1 and branches[0].groups == 1:
        dense = list(branches)
    else:
        dense = [regroup(b, 1) for b in branches]
    frame = _common_frame(dense, "concatenate")
    if _geometry(*dense):
        out = sum(b.out_channels for b in branches)
        return replace(frame.template(), weight=_shaped(out, dense[0].in_channels, *frame.kernel),
                       bias=_shaped(out), groups=1)
    return replace(frame.template(), weight=torch.cat(_framed_kernels(frame)),
                   bias=torch.cat([b.bias for b in branches]), groups=1)


def _apply_weight_to_constant(a: Affine, per_channel: Tensor) -> Tensor:
    """a's weights (no bias) applied to a spatially constant input ``per_channel``."""
    # (out, in // groups); sum(dim=()) would sum everything, so 0-d weights are used as they are
    taps = a.weight.flatten(2).sum(-1) if a.nd else a.weight
    per_group = per_channel.reshape(a.groups, -1)  # (groups, in // groups)
    out_per_group = a.out_channels // a.groups
    return (taps.reshape(a.groups, out_per_group, -1) * per_group[:, None, :]).sum(-1).reshape(-1)


def _check_then_exact(a: Affine, b: Affine) -> None:
    """b after a is one conv only where b's padding never meets a value a produced from padding.

    Where b pads with zeros, the composite conv instead evaluates a outside its domain. That
    equals zero only when a is pointwise and unpadded in that dim and a maps zero to zero.
    """
    for d in range(b.nd):
        if b.padding[d] == 0:
            continue
        if a.extent[d] != 1 or a.padding[d] != 0:
            raise AlgebraError(
                f"a {a.kernel_size} conv before a padded conv: the borders would differ"
            )
        if b.padding_mode != "zeros" and a.stride[d] != 1:
            raise AlgebraError(f"{b.padding_mode} padding after a strided conv is not one conv")
    if b.padding_mode == "zeros" and any(b.padding):
        _read_values(a.weight, a.bias)
        # per channel: a small channel's border error would hide under a large one's scale
        limits = ZERO_BIAS_TOLERANCE * a.weight.abs().reshape(a.out_channels, -1).amax(1)
        if bool((a.bias.abs() > limits).any()):
            raise AlgebraError(
                "a bias before a zero-padded conv (e.g. BN before a padded conv): borders differ"
            )
    if any(a.padding) and any(b.padding) and a.padding_mode != b.padding_mode:
        raise AlgebraError(f"padding modes differ: {a.padding_mode} then {b.padding_mode}")


def then(a: Affine, b: Affine, scratch: bool = False) -> Affine:
    """b applied to the output of a, as one conv: stride multiplies, padding is
    ``a.padding + b.padding * a.stride``, kernel is b's taps spread by a's stride and convolved
    with a's kernel. ``scratch``: a's weight is the caller's temporary, which nothing reads
    after this call: a per-channel b scales it in place."""
    if b.in_channels != a.out_channels:
        raise AlgebraError(f"{a.out_channels} channels feed a map of {b.in_channels}")
    if b.nd != a.nd:
        raise AlgebraError(f"cannot compose a {a.nd}-d and a {b.nd}-d map")
    if a.transposed or b.transposed:
        return _transposed_then(a, b)
    if is_per_channel(b):  # a BN or channel scale after a conv: scale its output rows
        if _geometry(a, b):
            return a  # the same shapes
        scale, shift = b.weight.reshape(-1), b.bias
        factor = scale.reshape(-1, *([1] * (a.weight.dim() - 1)))
        weight = a.weight.mul_(factor) if scratch else a.weight * factor
        return replace(a, weight=weight, bias=a.bias * scale + shift)
    _check_then_exact(a, b)
    nd = a.nd
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
    padding = tuple(pa + pb * sa for pa, pb, sa in zip(a.padding, b.padding, a.stride))
    mode = b.padding_mode if any(b.padding) else a.padding_mode
    if _geometry(a, b):
        return _then_geometry(a, b, stride, padding, mode)
    bias = b.bias + _apply_weight_to_constant(b, a.bias)
    if a.is_pointwise:
        weight, groups = _compose_pointwise(a, b)
        dilation = tuple(db * sa for db, sa in zip(b.dilation, a.stride))
        return Affine(weight, bias, stride, padding, dilation, groups, mode)
    if b.is_pointwise and all(s == 1 for s in b.stride):
        weight, groups = _compose_pointwise_after(a, b)
        return Affine(weight, bias, stride, padding, a.dilation, groups, mode)
    a1 = _materialize_dilation(a, list(range(nd)))
    spacing = tuple(db * sa for db, sa in zip(b.dilation, a.stride))
    if a.groups == b.groups:
        groups = a.groups
        out_per_group, mid_per_group = b.out_channels // groups, a.out_channels // groups
        blocks = []
        for j in range(groups):
            b_block = b.weight[j * out_per_group : (j + 1) * out_per_group]
            a_block = a1.weight[j * mid_per_group : (j + 1) * mid_per_group]
            blocks.append(_CONV_TRANSPOSE[nd](b_block, a_block, stride=spacing))
        weight = torch.cat(blocks)
    else:
        dense_a, dense_b = regroup(a1, 1), regroup(b, 1)
        weight = _CONV_TRANSPOSE[nd](dense_b.weight, dense_a.weight, stride=spacing)
        groups = _coarsest_groups(weight, math.gcd(a.groups, b.groups))
        weight = _ungroup(weight, groups)
    return Affine(weight, bias, stride, padding, (1,) * nd, groups, mode)


def _then_geometry(a: Affine, b: Affine, stride: tuple[int, ...], padding: tuple[int, ...],
                   mode: str) -> Affine:
    """`then`'s conv worked out from the shapes: the kernel of b's taps spread over a's, and
    the groups both keep (coarser ones only where the product's numbers are block-diagonal)."""
    if a.is_pointwise:
        kernel, dilation = b.kernel_size, tuple(db * sa for db, sa in zip(b.dilation, a.stride))
    elif b.is_pointwise and all(s == 1 for s in b.stride):
        kernel, dilation = a.kernel_size, a.dilation
    else:
        spacing = tuple(db * sa for db, sa in zip(b.dilation, a.stride))
        kernel = tuple((k - 1) * step + e for k, step, e in zip(b.kernel_size, spacing, a.extent))
        dilation = (1,) * a.nd
    if a.groups == b.groups or math.gcd(a.groups, b.groups) == 1:
        groups = a.groups if a.groups == b.groups else 1
    else:
        raise ValuesNeeded  # see `_coarsest_groups`
    return Affine(_shaped(b.out_channels, a.in_channels // groups, *kernel),
                  _shaped(b.out_channels), stride, padding, dilation, groups, mode)


def _compose_pointwise(a: Affine, b: Affine) -> tuple[Tensor, int]:
    """Kernel of b after a pointwise a: each of b's taps multiplied by a's matrix."""
    if a.groups == b.groups:
        g = a.groups
        a_mat = a.weight.reshape(g, a.out_channels // g, -1)  # (g, mid/g, in/g)
        b_w = b.weight.reshape(g, b.out_channels // g, b.weight.shape[1], -1)  # (g, o/g, mid/g, k)
        weight = torch.einsum("gomk,gmi->goik", b_w, a_mat)
        return weight.reshape(b.out_channels, a_mat.shape[-1], *b.kernel_size), g
    # one side dense: multiply block by block, never writing the grouped side out densely
    # (a depthwise kernel written densely is channels times larger, and so is the product)
    if b.groups == 1:
        g = a.groups
        a_mat = a.weight.reshape(g, a.out_channels // g, -1)  # (g, mid/g, in/g)
        b_w = b.weight.reshape(b.out_channels, g, a.out_channels // g, -1)  # (o, g, mid/g, k)
        weight = torch.einsum("ogmk,gmi->ogik", b_w, a_mat)
        return weight.reshape(b.out_channels, a.in_channels, *b.kernel_size), 1
    if a.groups == 1:
        g = b.groups
        a_mat = a.weight.reshape(g, a.out_channels // g, a.in_channels)  # (g, mid/g, in)
        b_w = b.weight.reshape(g, b.out_channels // g, b.weight.shape[1], -1)  # (g, o/g, mid/g, k)
        weight = torch.einsum("gomk,gmi->goik", b_w, a_mat)
        return weight.reshape(b.out_channels, a.in_channels, *b.kernel_size), 1
    a_mat = a.dense_matrix()
    b_dense = regroup(b, 1).weight
    weight = torch.einsum("omk,mi->oik", b_dense.reshape(*b_dense.shape[:2], -1), a_mat)
    weight = weight.reshape(b.out_channels, a.in_channels, *b.kernel_size)
    groups = _coarsest_groups(weight, math.gcd(a.groups, b.groups))
    return _ungroup(weight, groups), groups


def _compose_pointwise_after(a: Affine, b: Affine) -> tuple[Tensor, int]:
    """Kernel of a pointwise b after a: b's matrix applied to a's output channels."""
    if a.groups == b.groups:
        g = a.groups
        b_mat = b.weight.reshape(g, b.out_channels // g, -1)
        a_w = a.weight.reshape(g, a.out_channels // g, a.weight.shape[1], -1)
        weight = torch.einsum("gom,gmik->goik", b_mat, a_w)
        return weight.reshape(b.out_channels, a.weight.shape[1], *a.kernel_size), g
    if b.groups == 1:  # block by block, as in `_compose_pointwise`
        g = a.groups
        a_w = a.weight.reshape(g, a.out_channels // g, a.weight.shape[1], -1)  # (g, mid/g, in/g, k)
        b_mat = b.weight.reshape(b.out_channels, g, a.out_channels // g)  # (o, g, mid/g)
        weight = torch.einsum("ogm,gmik->ogik", b_mat, a_w)
        return weight.reshape(b.out_channels, a.in_channels, *a.kernel_size), 1
    if a.groups == 1:
        g = b.groups
        b_mat = b.weight.reshape(g, b.out_channels // g, -1)  # (g, o/g, mid/g)
        a_w = a.weight.reshape(g, a.out_channels // g, a.in_channels, -1)  # (g, mid/g, in, k)
        weight = torch.einsum("gom,gmik->goik", b_mat, a_w)
        return weight.reshape(b.out_channels, a.in_channels, *a.kernel_size), 1
    b_mat = b.dense_matrix()
    a_dense = regroup(a, 1).weight
    weight = torch.einsum("om,mik->oik", b_mat, a_dense.reshape(*a_dense.shape[:2], -1))
    weight = weight.reshape(b.out_channels, a.in_channels, *a.kernel_size)
    groups = _coarsest_groups(weight, math.gcd(a.groups, b.groups))
    return _ungroup(weight, groups), groups


def _coarsest_groups(dense_weight: Tensor, candidate: int) -> int:
    """``candidate`` if the dense kernel is block-diagonal with that many groups, else 1."""
    if candidate == 1:
        return 1
    out, inp = dense_weight.shape[:2]
    mask = torch.zeros(out, inp, dtype=torch.bool)
    o, i = out // candidate, inp // candidate
    for j in range(candidate):
        mask[j * o : (j + 1) * o, j * i : (j + 1) * i] = True
    off_block = dense_weight.flatten(2).abs().sum(-1)[~mask]
    return candidate if not off_block.any() else 1


def _ungroup(dense_weight: Tensor, groups: int) -> Tensor:
    """Inverse of regroup(..., 1): keep each output channel's own input block."""
    if groups == 1:
        return dense_weight
    out, inp = dense_weight.shape[:2]
    o, i = out // groups, inp // groups
    return torch.cat(
        [dense_weight[j * o : (j + 1) * o, j * i : (j + 1) * i] for j in range(groups)]
    )


def uninitialised(kind: type[nn.Module], *args: Any, device: torch.device | str = "cpu",
                  **kwargs: Any) -> nn.Module:
    """``kind(*args, **kwargs)`` (a layer with parameters and no buffers) with tensors that hold
    no numbers yet: made on the meta device (no random initialisation, no storage), then given
    empty storage on ``device`` unless that is meta."""
    # not nn.utils.skip_init: its Module.to_empty runs the meta device's Python decompositions,
    # whose first use imports sympy (0.4 s of every conversion)
    module = kind(*args, device="meta", **kwargs)
    if torch.device(device).type != "meta":
        _give_storage(module, torch.device(device))
    return module


def _give_storage(module: nn.Module, device: torch.device) -> None:
    for name, meta in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype,
                                                       device=device), meta.requires_grad))


def empty_module(a: Affine, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The nn.ConvNd (nn.Linear for 0-d) of ``a``'s geometry, its tensors uninitialised (on the
    meta device: no storage at all)."""
    place = {"dtype": dtype, "device": torch.device(device)}
    geometry = {"stride": a.stride, "padding": a.padding, "dilation": a.dilation,
                "groups": a.groups, **place}
    if a.nd == 0:
        return uninitialised(nn.Linear, a.in_channels, a.out_channels, **place)
    if a.transposed:
        return uninitialised(_CONV_TRANSPOSE_MODULE[a.nd], a.in_channels, a.out_channels,
                             a.kernel_size, output_padding=a.output_padding, **geometry)
    return uninitialised(_CONV_MODULE[a.nd], a.in_channels, a.out_channels, a.kernel_size,
                         padding_mode=a.padding_mode, **geometry)


def module_tensors(a: Affine) -> dict[str, Tensor]:
    """``a``'s tensors under the names `empty_module`'s layer gives them."""
    return {"weight": a.dense_matrix() if a.nd == 0 else a.weight, "bias": a.bias}


def fill_module(module: nn.Module, a: Affine, device: torch.device | None = None) -> nn.Module:
    """``module`` (an `empty_module` of ``a``'s geometry) holding ``a``'s numbers, each cast once
    to the module's dtype; one made on the meta device is given storage on ``device``."""
    if module.weight.is_meta:
        _give_storage(module, device or a.weight.device)
    with torch.no_grad():
        for name, tensor in module_tensors(a).items():
            getattr(module, name).copy_(tensor)
    return module


def to_module(a: Affine, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
    """The nn.ConvNd (nn.Linear for 0-d) computing ``a``, with weights cast once to ``dtype``;
    made in ``dtype`` on ``device`` at once, so a large kernel is never held twice."""
    module = empty_module(a, dtype, device or torch.device("cpu"))
    return fill_module(module, a)
