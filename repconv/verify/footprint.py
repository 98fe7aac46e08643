"""How much memory a forward pass will take, estimated before it runs, so that a shape a file
records or an option gives is refused in one line instead of the process being killed.

The estimate comes from a probe: one forward at a small size (each spatial dim at most
PROBE_SIZE, batch 1) of a copy sharing the model's tensors (what a forward caches on its
modules stays off the model), measuring the bytes of every module's output (each storage
once) and of the model's output, scaled by the ratio of input elements. Its convolutions and
linear layers give zeros of their output's shape without computing it (`ShapesOnly`): their
numbers would read every weight of the model once, 0.08 s of a 457 MB checkpoint's 1.2 s
`--skip-verify`, for a measure of bytes. Activations grow with
the input's elements for convolutional networks; attention inside a module's own forward grows
faster and is not seen (only module outputs are). A verification run holds more than one
forward: the call records of `fuse` keep every module's output once and the float64 reference
makes them again in twice the bytes (RUN_FACTOR), and each output is compared in float64, the
original's, the fused model's, the reference's and their differences (COMPARE_FACTOR, in
float32 bytes). Measured on a conv-BN of 48 parameters at 1 and 4 million input elements: 259
MB and 1.04 GB estimated, 270 MB and 750 MB peak above the interpreter. A model that does not
run at the probe's size is not estimated (its own forward is then the only check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from repconv.fold.calls import copy_sharing_tensors, eval_mode
from repconv.formats.limits import human
from repconv.verify.inputs import tensor_leaves

PROBE_SIZE = 32  # each spatial dim of the probe, at most (kept aligned as the example's)
RUN_FACTOR = 3  # every module's outputs: kept once in float32, made again in float64
COMPARE_FACTOR = 10  # the model's output: five float64 copies while it is compared


def _probe_size(size: int) -> int:
    align = min(size & -size, PROBE_SIZE)
    return min(size, max(align, PROBE_SIZE // align * align))


def _probe_inputs(inputs: Any) -> Any:
    """``inputs`` at batch 1 and small spatial sizes (dims from the third on)."""
    def shrink(x: Any) -> Any:
        if not isinstance(x, Tensor) or x.dim() < 2:
            return x
        shape = [1, x.shape[1], *(_probe_size(n) for n in x.shape[2:])]
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(shape, generator=generator).to(x.dtype) if x.is_floating_point()
                else x)
    return tree_map(shrink, inputs)


def _elements(inputs: Any) -> int:
    return sum(x.numel() for x in tensor_leaves(inputs))


def _spatial(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _each(value: int | tuple[int, ...] | list[int], nd: int) -> tuple[int, ...]:
    """A conv argument per dim, as torch expands it (a number or a one-item sequence)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values * nd if len(values) == 1 else values


def _conv_shape(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                stride: int | tuple[int, ...] = 1, padding: int | str | tuple[int, ...] = 0,
                dilation: int | tuple[int, ...] = 1, groups: int = 1) -> tuple[int, ...] | None:
    """The output shape of ``F.conv{1,2,3}d`` (torch's own arguments), or None where the call
    is not one this answers (its own run then says what is wrong with it)."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor) or weight.dim() < 3:
        return None
    nd = weight.dim() - 2
    if input.dim() not in (nd + 1, nd + 2) or input.dtype != weight.dtype:
        return None
    channels, size = input.shape[-nd - 1], tuple(input.shape[-nd:])
    strides, dilations = _each(stride, nd), _each(dilation, nd)
    if padding == "same":
        pads = None if any(s != 1 for s in strides) else (0,) * nd
    else:
        pads = (0,) * nd if padding == "valid" else _each(padding, nd)  # type: ignore[arg-type]
    if (pads is None or channels != weight.shape[1] * groups
            or any(len(values) != nd for values in (strides, dilations, pads))):
        return None
    spatial = size if padding == "same" else tuple(_spatial(n, k, s, p, d) for n, k, s, p, d in
                                                   zip(size, weight.shape[2:], strides, pads,
                                                       dilations))
    if any(n < 1 for n in spatial):
        return None
    return (*input.shape[:-nd - 1], weight.shape[0], *spatial)


def _linear_shape(input: Tensor, weight: Tensor, bias: Tensor | None = None
                  ) -> tuple[int, ...] | None:
    """The output shape of ``F.linear``, or None where this does not answer it."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        return None
    return None if input.dtype != weight.dtype else (*input.shape[:-1], weight.shape[0])


_SHAPES = {F.conv1d: _conv_shape, F.conv2d: _conv_shape, F.conv3d: _conv_shape,
           F.linear: _linear_shape}


class ShapesOnly(TorchFunctionMode):
    """Convolutions and linear layers answered with zeros of their output's shape: a forward
    that measures memory does not read the weights. (A function mode, not a dispatch mode,
    whose first use imports torch._dynamo: 0.8 s.)"""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        shape_of = _SHAPES.get(func)
        try:
            shape = shape_of(*args, **kwargs) if shape_of is not None else None
        except TypeError:  # not torch's arguments: its own call says what is wrong
            shape = None
        if shape is None:
            return func(*args, **kwargs)
        like = args[0] if args else kwargs["input"]
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


def output_bytes(model: nn.Module, inputs: Any) -> tuple[int, int]:
    """The bytes of every module's outputs in one forward of ``model`` on ``inputs`` (each
    storage counted once), and of the model's own output."""
    seen: dict[int, int] = {}
    kept: list[Tensor] = []  # alive until counted: a freed storage's address is reused

    def count(_module: nn.Module, _args: Any, output: Any) -> None:
        for leaf in tree_flatten(output)[0]:
            if isinstance(leaf, Tensor):
                storage = leaf.untyped_storage()
                seen.setdefault(storage.data_ptr(), storage.nbytes())
                kept.append(leaf)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad(), eval_mode(model), ShapesOnly():
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), sum(t.untyped_storage().nbytes() for t in tensor_leaves(output))


@dataclass
class MemoryBudget:
    """The memory limit of one forward, and the estimates held against it (one probe per
    model)."""

    limit: int
    source: str  # where the limit comes from, for the message
    # per input element: (every module's output bytes, the model's output bytes), or None
    _per_element: dict[int, tuple[float, float] | None] = field(default_factory=dict)

    def need(self, model: nn.Module, inputs: Any) -> int | None:
        """Estimated bytes of verifying ``model`` on ``inputs`` (None: not estimated)."""
        key = id(model)
        if key not in self._per_element:
            probe = _probe_inputs(inputs)
            try:  # on a copy: what a forward caches on its modules is not for the probe's size
                activations, output = output_bytes(copy_sharing_tensors(model), probe)
            except Exception:  # a model fixed to its own size: its forward is the only check
                self._per_element[key] = None
            else:
                elements = max(_elements(probe), 1)
                self._per_element[key] = (activations / elements, output / elements)
        per_element = self._per_element[key]
        if per_element is None:
            return None
        activations, output = (_elements(inputs) * b for b in per_element)
        inputs_bytes = sum(x.numel() * x.element_size() for x in tensor_leaves(inputs))
        return math.ceil(RUN_FACTOR * activations + COMPARE_FACTOR * output + 4 * inputs_bytes)

    def problem(self, model: nn.Module, inputs: Any) -> str | None:
        """Why ``model`` may not run on ``inputs`` ("needs about ... more than ..."), or None."""
        need = self.need(model, inputs)
        if need is None or need <= self.limit:
            return None
        return (f"needs about {human(need)} of memory, more than {self.source} "
                f"({human(self.limit)}); give a smaller --input-shape, or --max-memory if "
                "the machine has more")
