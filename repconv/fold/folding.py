"""Folding lowered ops into one `Affine` of their region's root, in graph order with
`algebra.then` / `add` / `concat`: the engine region analysis runs on geometry alone (a failed
fold is a `Split` saying where to cut and why) and `fold_region` runs on numbers, once per
region, where it is applied."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import Tensor, fx

from repconv.errors import AlgebraError
from repconv.fold import algebra
from repconv.fold.algebra import Affine
from repconv.fold.graph import data_users, tensor_shape
from repconv.fold.region import Region
from repconv.fold.rules import LinearOp, Sum, Unary
from repconv.fold.rules.base import channels, spatial_dims


@dataclass(frozen=True)
class Expr:
    root: fx.Node
    affine: Affine
    members: frozenset[fx.Node]
    macs: int


@dataclass(frozen=True)
class Split:
    """Fold failed at ``node``: make ``boundaries`` region outputs; ``drop`` the node if it can
    no longer be a linear op (a sum or concat whose terms cannot be combined)."""

    node: fx.Node
    reason: str
    boundaries: tuple[fx.Node, ...]
    drop: bool


def inputs_of(op: LinearOp) -> tuple[fx.Node, ...]:
    if isinstance(op, Unary):
        return (op.source,)
    if isinstance(op, Sum):
        return tuple(term for term, _ in op.terms)
    return op.parts


def inner_inputs(
    node: fx.Node, ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node]
) -> tuple[fx.Node, ...]:
    """The inputs of ``node`` that lie inside its region (folded into it, not its root)."""
    return tuple(s for s in inputs_of(ops[node]) if s in ops and s not in boundaries)


def numel(node: fx.Node) -> int:
    shape = tensor_shape(node)
    return math.prod(shape[1:]) if shape is not None else 0

Decided = dict[tuple[fx.Node, frozenset[fx.Node]], Affine | str]


def fold(
    ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node],
    numbers: algebra.Float64Copies | None = None, decided: Decided | None = None,
) -> dict[fx.Node, Expr] | Split:
    """Each node's value as an affine map of its region's root, in graph order: its geometry,
    or with ``numbers`` its float64 numbers (each layer tensor converted once, by ``numbers``).
    A decision of the geometry fold that reads numbers folds those of the part it asks about
    (`then_by_numbers`)."""
    exprs: dict[fx.Node, Expr] = {}
    # values whose tensors this fold made and nothing else holds: their last reader may reuse them
    scratch: set[fx.Node] = set()

    def value(source: fx.Node) -> Expr:
        if source in ops and source not in boundaries:
            return exprs[source]
        root = algebra.identity(channels(source), spatial_dims(source))
        return Expr(source, root if numbers else algebra.geometry_only(root), frozenset(), 0)

    def leaf_map(affine: Affine) -> Affine:
        return numbers.affine(affine) if numbers else algebra.geometry_only(affine)

    def leaf(op: Unary) -> Affine:
        return leaf_map(op.affine)

    # a value's numbers are kept until its last reader in the region has folded them; after that
    # only its geometry (for the cost check): a region's intermediate kernels are not all held
    pending = {node: 0 for node in ops}
    for node in ops:
        for source in inner_inputs(node, ops, boundaries):
            pending[source] += 1
    for node, op in ops.items():
        sources = inputs_of(op)
        parts = [value(source) for source in sources]
        union = frozenset().union(*(p.members for p in parts))
        inner = inner_inputs(node, ops, boundaries)
        spent = tuple(s in scratch and pending[s] == 1 for s in sources)
        try:
            if isinstance(op, Unary):
                (part,), layer = parts, leaf(op)
                try:
                    affine = layer if not part.members else algebra.then(
                        part.affine, layer, scratch=spent[0])
                    for after in op.then:
                        affine = algebra.then(affine, leaf_map(after), scratch=bool(
                            numbers) and affine.weight is not layer.weight)
                except algebra.ValuesNeeded:
                    affine = then_by_numbers(ops, node, part, {} if decided is None
                                              else decided)
                macs = part.macs + op_macs(node, op.affine)
            else:
                if isinstance(op, Sum):
                    terms = [algebra.scaled(p.affine, c) for p, (_, c) in zip(parts, op.terms)]
                    affine = algebra.add(*terms, scratch=tuple(
                        term.weight is not p.affine.weight or own
                        for term, p, own in zip(terms, parts, spent)))
                else:
                    if any(p.affine.nd != spatial_dims(node) for p in parts):
                        # maps of the last dim (tokens) stacked along dim 1: not their features
                        raise AlgebraError("the parts are maps of the last dim, stacked along "
                                           "another")
                    affine = algebra.concat(*(p.affine for p in parts))
                # work the branches share (a depthwise conv feeding them all) counts once
                macs = sum(op_macs(m, ops[m].affine) for m in union
                           if isinstance(ops[m], Unary))
                merged = numel(node) * affine.macs_per_output()
                if merged > macs and not algebra.is_per_channel(affine):
                    # branches of different shapes stacked: every output channel would read
                    # every input channel through the largest kernel
                    reason = (f"cost: one conv would take {merged:,} MACs per sample, the "
                              f"{len(parts)} branches it merges {macs:,}")
                    shared = frozenset.intersection(*(p.members for p in parts))
                    ends = tuple(n for n in ops if n in shared and any(
                        u in union and u not in shared for u in data_users(n)))
                    # cut where the shared work ends: the branches after it may still merge
                    return (Split(node, reason, ends, drop=False) if ends
                            else Split(node, reason, inner, drop=True))
        except AlgebraError as exc:
            # a map that does not compose on its own (a pad with a value whose neighbour does
            # not cancel it) is no linear op at all
            return Split(node, str(exc), inner, drop=not isinstance(op, Unary) or not inner)
        assert len({p.root for p in parts}) == 1, "multi-root nodes are dropped before folding"
        exprs[node] = Expr(parts[0].root, affine, union | {node}, macs)
        if numbers is not None:
            held = [p.affine.weight for p, used_up in zip(parts, spent) if not used_up]
            if isinstance(op, Unary):
                held.append(layer.weight)
            # a layer's copy the probe is done with is the fold's alone, like what it made
            first = isinstance(op, Unary) and not parts[0].members
            if (numbers.disposable(affine.weight) if first
                    else new_storage(affine.weight, held)):
                scratch.add(node)
        for source in inner:
            pending[source] -= 1
            if not pending[source] and numbers is not None:
                scratch.discard(source)
                exprs[source] = replace(exprs[source],
                                        affine=algebra.geometry_only(exprs[source].affine))
    return exprs


def new_storage(weight: Tensor, held: list[Tensor]) -> bool:
    """``weight`` is none of ``held`` (a layer's float64 copy, which the local check reads, or a
    value another node still reads), nor a view of one."""
    mine = weight.untyped_storage().data_ptr()
    return all(mine != other.untyped_storage().data_ptr() for other in held)


def then_by_numbers(ops: dict[fx.Node, LinearOp], node: fx.Node, part: Expr,
                     decided: Decided) -> Affine:
    """The geometry of ``node``'s op (its maps in turn) after ``part`` where it depends on
    numbers: the part's (a bias before a zero-padded conv), and a layer's only where a later
    map reads the product or the product's groups depend on them. Raises the AlgebraError of a
    fold that is not exact."""
    op = ops[node]
    assert isinstance(op, Unary)
    key = (node, part.members)
    if key not in decided:
        copies = algebra.Float64Copies()
        value = None
        if part.members:
            folded = fold({m: ops[m] for m in ops if m in part.members}, {op.source}, copies)
            assert not isinstance(folded, Split), "a value whose geometry folds has numbers"
            value = folded[op.source].affine
        maps = (op.affine, *op.then)
        try:
            for i, after in enumerate(maps):
                if value is None:
                    value = copies.affine(after)
                    continue
                try:  # the last map's geometry is all its result needs
                    if i < len(maps) - 1:
                        raise algebra.ValuesNeeded
                    value = algebra.then(value, algebra.geometry_only(after))
                except algebra.ValuesNeeded:
                    value = algebra.then(value, copies.affine(after))
            assert value is not None
            decided[key] = algebra.geometry_only(value)
        except AlgebraError as exc:
            decided[key] = str(exc)
    result = decided[key]
    if isinstance(result, str):
        raise AlgebraError(result)
    return result


def op_macs(node: fx.Node, affine: Affine) -> int:
    """What an op costs in the budget a fused conv is held to: per-channel maps (BN, scale,
    identity) add no multiply-accumulates a conv would not do anyway."""
    return 0 if algebra.is_per_channel(affine) else numel(node) * affine.macs_per_output()


def fused_macs(node: fx.Node, expr: Expr) -> int:
    return numel(node) * expr.affine.macs_per_output()

def fold_region(region: Region, numbers: algebra.Float64Copies | None = None) -> Affine:
    """The region's map in float64, folded from its ops: its one fold, where it is applied.
    The float64 copies of its layers' tensors stay in ``numbers`` for its local check."""
    folded = fold(dict(zip(region.members, region.ops)), {region.sink},
                   numbers or algebra.Float64Copies())
    assert not isinstance(folded, Split), "a region whose geometry folded folds"
    affine = folded[region.sink].affine
    for after in region.then:
        affine = algebra.then(affine, after, scratch=True)
    return affine
