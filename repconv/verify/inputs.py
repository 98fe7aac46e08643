"""Which inputs verification runs both models on: the caller's samples, seeded random inputs
like the example, and other sizes, chosen to cross the guards a model may have on its input
size (a block called with ``big=x.shape[-1] > 96``, TF-style "same" padding, a stride that
must divide the size).

Example inputs are pytrees: a tensor per positional argument, or lists and dicts of tensors
(a torchvision detector takes a list of images). Seeded inputs, sizes and copies walk every
tensor leaf; a non-tensor leaf is passed as it is.

Sizes, by default (``vary``): batch 2 (1 if the example's is 2), and for each spatial dim n
(dims from the third on, of every leaf): a smaller size with the same power-of-two alignment,
an odd one (n // 2 | 1) and a larger one (max(2n, 128), aligned, at most LARGER_FACTOR times
the example's elements; else 2n). A size the original model does not run at is skipped with
the reason. ``shapes`` (``--shapes``) replaces them with the caller's own list; ``extra_shapes``
adds sizes (those crossing guards a capture saw); both are checked like ``--input-shape``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from repconv.errors import InputError
from repconv.formats.metadata import MAX_INPUT_ELEMENTS, shape_problem
from repconv.verify.report import SkippedRun

VARIATIONS = ("batch", "spatial")
LARGER_SIZE = 128  # the larger size is at least this many pixels (per spatial dim) ...
LARGER_FACTOR = 16  # ... unless that takes more than this many times the example's elements
Shapes = list[list[int]]  # one shape per tensor leaf of the inputs


def tensor_leaves(inputs: Any) -> list[Tensor]:
    return [leaf for leaf in tree_flatten(inputs)[0] if isinstance(leaf, Tensor)]


def leaf_shapes(inputs: Any) -> Shapes:
    return [list(leaf.shape) for leaf in tensor_leaves(inputs)]


def floating_to(inputs: Any, dtype: torch.dtype, *, copy: bool = False) -> Any:
    """Floating-point tensors in ``dtype`` (copies with ``copy``); others as they are."""
    def convert(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return x.to(dtype, copy=copy)
        return x.clone() if isinstance(x, Tensor) and copy else x
    return tree_map(convert, inputs)


def random_inputs(example_inputs: Any, seed: int,
                  shapes: Sequence[Sequence[int]] | None = None) -> Any:
    """Seeded normal inputs like ``example_inputs`` (each floating tensor leaf at its shape in
    ``shapes``, else its own); other leaves as they are."""
    generator = torch.Generator().manual_seed(seed)
    leaves, spec = tree_flatten(example_inputs)
    sizes = iter(shapes or [leaf.shape for leaf in leaves if isinstance(leaf, Tensor)])
    made = []
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            made.append(leaf)
            continue
        shape = tuple(next(sizes))
        made.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(leaf.dtype)
                    if leaf.is_floating_point() else leaf)
    return tree_unflatten(made, spec)


def _other_size(size: int) -> int:
    """Another spatial size with the same power-of-two alignment (up to 32), so a model that
    needs sizes divisible by its total stride still runs: 224 -> 160, 32 -> 64, 17 -> 12."""
    if size <= 2:
        return size
    align = min(size & -size, 32)
    other = size * 3 // 4 // align * align
    return other if align <= other != size else size + align


def _larger_size(size: int, least: int) -> int:
    """Twice ``size`` at least, and ``least``, up to its alignment (as above)."""
    if size <= 2:
        return size  # a model fixed to so small a size
    align = min(size & -size, 32)
    return -(-max(2 * size, least) // align) * align


def _spatial(shapes: Shapes, size: Any) -> Shapes:
    return [[*s[:2], *(size(n) for n in s[2:])] for s in shapes]


def varied_shapes(shapes: Shapes, vary: Sequence[str]) -> list[tuple[str, Shapes]]:
    """(label, shapes) of the batch and spatial variations of (N, C, *spatial) inputs."""
    variants = []
    if "batch" in vary and all(len(s) >= 2 for s in shapes):
        batch = 2 if shapes[0][0] != 2 else 1
        variants.append((f"batch {batch}", [[batch, *s[1:]] for s in shapes]))
    if "spatial" not in vary or not all(len(s) >= 3 for s in shapes):
        return variants
    elements = sum(math.prod(s) for s in shapes)
    larger = _spatial(shapes, lambda n: _larger_size(n, LARGER_SIZE))
    if sum(math.prod(s) for s in larger) > LARGER_FACTOR * elements:
        larger = _spatial(shapes, lambda n: _larger_size(n, 0))
    seen = [shapes]
    for other in (_spatial(shapes, _other_size),
                  _spatial(shapes, lambda n: n // 2 | 1 if n > 2 else n), larger):
        if other not in seen:
            seen.append(other)
            variants.append(("spatial " + "x".join(map(str, other[0][2:])), other))
    return variants


def check_listed(shapes: Sequence[Sequence[Sequence[int]]], example: Shapes,
                 what: str) -> list[Shapes]:
    """Sizes a caller lists: one shape per tensor input each, usable like --input-shape."""
    checked = []
    for index, run in enumerate(shapes, 1):
        run = [list(s) for s in run]
        if len(run) != len(example):
            raise InputError(f"{what} entry {index} gives {len(run)} shape(s); the model takes "
                             f"{len(example)} tensor input(s): give one shape per input, "
                             "joined by '+'")
        for shape, like in zip(run, example):
            problem = shape_problem(shape)
            if problem is None and len(shape) != len(like):
                problem = f"it has {len(shape)} dimensions, the example input {len(like)}"
            if problem is not None:
                raise InputError(f"{what} entry {index} {str(shape)[:80]} is not a usable "
                                 f"shape ({problem})")
        checked.append(run)
    return checked


@dataclass
class Planned:
    source: str
    seed: int | None
    shapes: Shapes
    given: Any = None  # the caller's tensors; else seeded at ``shapes``
    optional: bool = False  # a varied size: skipped where the original does not run

    def inputs(self, example: Any) -> Any:
        return self.given if self.given is not None else random_inputs(
            example, self.seed or 0, self.shapes)


def plan(inputs: Any, samples: Mapping[str, Any], seed: int, trials: int,
         vary: Sequence[str], shapes: Sequence[Sequence[Sequence[int]]] | None = None,
         extra_shapes: Sequence[Sequence[Sequence[int]]] = ()
         ) -> tuple[list[Planned], list[SkippedRun]]:
    """The inputs to compare on, in order, and the sizes left out with the reason."""
    example = leaf_shapes(inputs)
    planned = [Planned(label, None, leaf_shapes(given), given) for label, given in
               samples.items()]
    planned += [Planned("example" if t == 0 else f"example, seed {seed + t}", seed + t, example)
                for t in range(trials)]
    sizes: list[tuple[str, Shapes, bool]] = []
    if shapes is not None:
        sizes += [(f"listed {i}", s, False) for i, s in
                  enumerate(check_listed(shapes, example, "--shapes"), 1)]
    else:
        sizes += [(label, s, True) for label, s in varied_shapes(example, vary)]
    sizes += [(f"extra {i}", s, True) for i, s in
              enumerate(check_listed(extra_shapes, example, "extra_shapes"), 1)]
    skipped = []
    floating = all(x.is_floating_point() for x in tensor_leaves(inputs))
    for label, run, optional in sizes:
        if not floating:
            skipped.append(SkippedRun(label, run, "non-float inputs are used only as given"))
        elif sum(math.prod(s) for s in run) > MAX_INPUT_ELEMENTS:
            skipped.append(SkippedRun(label, run, f"more than {MAX_INPUT_ELEMENTS:,} "
                                                  "input elements"))
        else:
            planned.append(Planned(label, seed + len(planned) - len(samples), run,
                                   optional=optional))
    return planned, skipped
