"""Check one folded region alone, before it is applied: its conv against its own ops, both in
float64, on a small random input. The region's ops run first (`probe`), on its layers' tensors
converted once, which its fold then takes over; the folded conv runs on the fold's own float64
tensors (`local_error`). A checkpoint is never copied whole, and no kernel twice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, fx
from torch.func import functional_call

from repconv.fold import algebra
from repconv.fold.algebra import Affine
from repconv.fold.graph import tensor_dtype, tensor_shape
from repconv.fold.region import Region

T = TypeVar("T")

# A region whose fused output differs from the original by more than this, relative to the
# output's scale, in float64, is not rewritten: the algebra would be wrong, so keep the model.
LOCAL_TOLERANCE = 1e-6
LOCAL_CHECK_SIZE = 3  # at least, per dim: a border on each side and an interior position


def as_token_shape(value: T, like: object) -> T:
    """A linear layer on tokens replaces ops that flatten the tokens (LeViT's
    ``bn(linear(x).flatten(0, 1))``): the same elements in the same order, in ``like``'s
    shape."""
    if (isinstance(value, Tensor) and isinstance(like, Tensor) and value.shape != like.shape
            and value.numel() == like.numel() and value.shape[-1:] == like.shape[-1:]):
        return value.reshape(like.shape)  # type: ignore[return-value]  # a Tensor is a T
    return value


def region_module(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region as a standalone module of its root, for checking it alone."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {region.root: graph.placeholder("x")}

    def copy_node(node: fx.Node) -> fx.Node:
        if node not in env:
            env[node] = graph.node_copy(node, copy_node)
        return env[node]

    for member in region.members:
        copy_node(member)
    output = graph.output(env[region.sink])
    module = fx.GraphModule(gm, graph)
    # a slice of a map the region absorbs from after a concat (MixConv's BN) is part of it
    value = env[region.sink]
    dtype = tensor_dtype(region.sink) or torch.float32
    for index, after in enumerate(region.then):
        module.add_module(f"then_{index}", algebra.to_module(after, dtype))
        with graph.inserting_before(output):
            value = graph.call_module(f"then_{index}", (value,))
    if region.then:  # its code, generated with the module, lacks them
        output.args = (value,)
        module.recompile()
    return module


@dataclass(frozen=True)
class Probe:
    """A small random input of a region's root and its own ops' output on it, in float64: what
    its folded conv must reproduce."""

    x: Tensor
    expected: Tensor


def probe(gm: fx.GraphModule, region: Region, seed: int = 0,
          numbers: algebra.Float64Copies | None = None) -> Probe | None:
    """Run the region's ops in float64 on a small random input; ``numbers`` makes (and keeps,
    for the fold) the float64 copies of the layers' tensors. None where they do not run."""
    shape = tensor_shape(region.root)
    generator = torch.Generator().manual_seed(seed)
    # The maps are shift-invariant, so a small crop checks interior and borders alike at a
    # fraction of the cost of the model's full resolution: ``extent + stride`` positions give an
    # output whose window touches neither border between two that touch one each.
    geometry = region.affine
    spatial = [min(n, max(LOCAL_CHECK_SIZE, e + s))
               for n, e, s in zip(shape[2:], geometry.extent, geometry.stride)]
    # a 0-d map (a linear layer) acts on the last dim: the other dims are batch dims
    size = (1, *shape[1:]) if geometry.nd == 0 else (1, shape[1], *spatial)
    x = torch.randn(size, generator=generator, dtype=torch.float64)
    original = region_module(gm, region).eval()
    # the region's own tensors in float64, one region at a time: never a copy of the model
    numbers = numbers or algebra.Float64Copies()
    doubled = {name: numbers.of(t) for name, t in
               (*original.named_parameters(), *original.named_buffers())}
    try:
        with torch.no_grad():
            return Probe(x, functional_call(original, doubled, (x,)))
    except Exception:  # the region's ops do not run alone in float64: nothing proves the fold
        return None


def local_error(found: Probe | None, affine: Affine) -> float:
    """Scale-relative max error of ``affine`` (the region folded, in float64) on the probe
    (infinite without one)."""
    if found is None:
        return math.inf
    # the fused conv runs on the fold's own tensors: a layer on the meta device has no storage
    fused = algebra.empty_module(affine, torch.float64, "meta")
    with torch.no_grad():
        got = functional_call(fused, algebra.module_tensors(affine), (found.x,))
    expected = found.expected
    if affine.nd == 0:
        got = as_token_shape(got, expected)
    if expected.shape != got.shape:
        return math.inf
    scale = float(expected.abs().max())
    error = float((expected - got).abs().max())
    return error / scale if scale > 0 else error
