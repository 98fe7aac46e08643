"""Find the linear regions of a traced graph: what folds into one conv, what does not, and why.

A linear region is a connected set of nodes the rules lowered, with one input (its root) and one
output (its sink) whose intermediate values nothing else reads as data (metadata reads such as
``x.ndim`` or ``x.shape`` are not uses of the values). Its value is one `Affine` of the root,
built by walking the region in graph order with `algebra.then` / `add` / `concat`.

Analysis only reads the graph. Where an operation is not exact or would cost more than the ops
it replaces, the node's inputs become region boundaries and the reason is kept as a cut; the
analysis repeats until it is stable, so the largest exact pieces still fold. A region with no
conv in it is never turned into one: a lone BatchNorm runs faster than the depthwise conv it
would become (docs/design.md "3. Rules and regions", "Never slower").

Analysis folds geometry alone (shapes, groups, strides: no numbers, no storage), so repeating it
costs no tensor work; the few decisions that read numbers fold those of the part they ask about.
Each region's numbers are folded once, in float64, by `fold_region` where it is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from repconv.fold import algebra
from repconv.fold.folding import (
    Decided,
    Expr,
    Split,
    fold,
    fold_region,
    fused_macs,
    inner_inputs,
    inputs_of,
)
from repconv.fold.graph import (
    GraphContext,
    alias_base,
    data_users,
    eager_differs,
    metadata_read,
    mutated_input,
    tensor_dtype,
    tensor_shape,
)
from repconv.fold.reasons import Skip, account, is_norm
from repconv.fold.region import Region
from repconv.fold.rules import RULES, LinearOp, Refusal, Unary
from repconv.fold.rules.base import channels


@dataclass
class Analysis:
    regions: list[Region] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)  # ops left as they are, and why
    cuts: list[Skip] = field(default_factory=list)  # where a larger fold was cut, and why


def _lower_all(
    gm: fx.GraphModule, ctx: GraphContext
) -> tuple[dict[fx.Node, LinearOp], dict[fx.Node, str]]:
    """Each node's linear op, and the reasons of the rules that refused theirs."""
    ops: dict[fx.Node, LinearOp] = {}
    refused: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if tensor_shape(node) is None or mutated_input(node, gm) is not None:
            continue  # in-place ops stay as they are: their effect is not in the data flow
        differs = eager_differs(ctx.submodule(node)) if node.op == "call_module" else None
        if differs:  # every rule reads the module's class: none may fold what else runs
            refused[node] = differs
            continue
        for rule in RULES:
            answer = rule(node, ctx)
            if answer is None:
                continue
            if isinstance(answer, Refusal):
                refused[node] = answer.reason
            else:
                ops[node] = answer
            break
    return ops, refused


def _drop_multi_root(ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node]) -> None:
    """Sums and concats of values with different roots are not maps of one input: they stay as
    they are, and their linear inputs become region outputs."""
    changed = True
    while changed:
        changed = False
        roots: dict[fx.Node, frozenset[fx.Node]] = {}
        for node, op in ops.items():
            found: set[fx.Node] = set()
            for source in inputs_of(op):
                inner = source in ops and source not in boundaries
                found |= roots[source] if inner else {source}
            roots[node] = frozenset(found)
            if len(found) > 1 and not isinstance(op, Unary):
                del ops[node]
                boundaries.update(s for s in inputs_of(op) if s in ops)
                changed = True
                break


# what a decision that reads numbers found (a geometry, or why the fold is not exact), by the
# node and the members of the value it folds into: one analysis asks each once
def _cost_split(
    ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node], exprs: dict[fx.Node, Expr]
) -> Split | None:
    """A region whose one conv costs more than its ops splits where a chain first grows."""

    def grows(node: fx.Node) -> bool:
        expr = exprs[node]
        return not algebra.is_per_channel(expr.affine) and fused_macs(node, expr) > expr.macs

    for sink in (n for n in ops if n in boundaries):
        if not grows(sink):
            continue
        node = next(m for m in ops if m in exprs[sink].members and grows(m))
        inner = inner_inputs(node, ops, boundaries)
        reason = (f"cost: one conv would take {fused_macs(node, exprs[node]):,} MACs per sample, "
                  f"the {len(exprs[node].members)} ops it replaces {exprs[node].macs:,}")
        return Split(node, reason, inner, drop=False)
    return None


def analyse(gm: fx.GraphModule, keep_own_forward: bool = False, unshare: bool = True
            ) -> Analysis:
    """The regions of ``gm`` (shapes already propagated) that fold into one conv, and what
    stays unfused and why. Reads the graph; changes nothing. With ``keep_own_forward`` (``gm``
    is the user's whole model), a chain does not fold ops written in the model's own forward:
    that would rewrite the root, its class and methods, to save an elementwise op. With
    ``unshare``, a layer called at several sites folds at each into a copy of its own."""
    ctx = GraphContext(gm, unshare)
    ops, refused = _lower_all(gm, ctx)
    cut_at: dict[fx.Node, str] = {}
    boundaries = {node for node in ops if any(user not in ops for user in data_users(node))}
    _drop_multi_root(ops, boundaries)
    decided: Decided = {}
    while True:
        folded = fold(ops, boundaries, decided=decided)
        if not isinstance(folded, Split):
            folded = (_structural_split(gm, ops, boundaries, folded)
                      or _cost_split(ops, boundaries, folded) or folded)
        if isinstance(folded, Split):
            cut_at.setdefault(folded.node, folded.reason)
            boundaries.update(folded.boundaries)
            if folded.drop:
                del ops[folded.node]
            _drop_multi_root(ops, boundaries)
            continue
        owner: dict[fx.Node, fx.Node] = {}
        shared: set[fx.Node] = set()
        for sink in (n for n in ops if n in boundaries):
            for member in folded[sink].members - {sink}:
                if owner.setdefault(member, sink) is not sink:
                    shared.add(member)
        if not shared:
            break
        # only the last shared node of each path must be computed once for both regions; what
        # feeds it folds into it
        boundaries.update(n for n in shared if any(u not in shared for u in data_users(n)))
        _drop_multi_root(ops, boundaries)
    regions, lone, singles = [], [], []
    for boundary in (n for n in ops if n in boundaries):
        expr, sink = folded[boundary], boundary
        members = tuple(n for n in ops if n in expr.members)
        # trailing identities (eval dropout in a parent's forward) pass the fused value on as
        # they are: leaving them keeps the rewrite inside the module that runs the rest
        tail: tuple[fx.Node, ...] = ()
        while len(members) > 1 and _is_passthrough(ops[sink]) and ops[sink].source in members:
            members, sink, tail = members[:-1], ops[sink].source, (sink, *tail)
        region = Region(
            root=expr.root,
            sink=sink,
            members=members,
            ops=tuple(ops[m] for m in members),
            affine=expr.affine,
            identity=False,  # known from its numbers: `_computes_identity`, `Converter`
            labels=tuple(ops[m].label for m in members),
            macs_before=expr.macs,
            macs_after=fused_macs(sink, expr),
            chain=all(isinstance(ops[m], Unary) for m in members),
            sources=tuple(inputs_of(ops[m])[0] for m in members),
            passthrough=tuple(_is_passthrough(ops[m]) for m in members),
            tail=tail,
        )
        root_shape, sink_shape = tensor_shape(region.root), tensor_shape(sink)
        if not region.chain and (root_shape is None or sink_shape is None
                                 or root_shape[:-1] != sink_shape[:-1]) and region.affine.nd == 0:
            # one linear layer in place of merged branches gives the root's token layout
            refused[sink] = ("its branches reshape the tokens: one linear layer would not give "
                             f"the shape {list(sink_shape or [])}")
            continue
        pieces = _without_own_ops(region, ops) if keep_own_forward and region.chain else None
        if pieces is not None:
            for node in region.members:
                if node not in {m for piece in pieces for m in piece.members} and is_norm(
                        ops[node].label):
                    refused[node] = ("runs in the model's own forward: folding it would rewrite "
                                     "the model's forward, its class and methods")
        for piece in [region] if pieces is None else pieces:
            if piece.convs and len(piece.members) > 1:
                regions.append(piece)
            elif piece.convs:
                singles.append(piece)
            elif not _computes_identity(piece):
                lone.append(piece)
    for absorbed, parts in _distributions(regions + singles, lone):
        owners = [owner for owner, _ in parts]
        regions = [r for r in regions if all(r is not o for o in owners)]
        regions += [absorbed, *(part for _, part in parts)]
        lone = [piece for piece in lone if piece.sink is not absorbed.sink]
    skips, cuts = account(regions, lone, refused, cut_at)
    return Analysis(regions, skips, cuts)


def _distributions(pieces: list[Region], lone: list[Region],
                   ) -> list[tuple[Region, list[tuple[Region, Region]]]]:
    """Per-channel maps after a concat of values that fold each on its own (MixConv's BN after
    the convs of each channel split): the map distributes over the parts, each part's conv
    absorbing its slice, ``bn(cat(a, b)) = cat(bn_a(a), bn_b(b))``. Each as (the map's region,
    marked absorbed; each part's region and that region with its slice appended), one group:
    applied all or none."""
    by_sink = {piece.sink: piece for piece in pieces}
    found = []
    for group, piece in enumerate(lone, start=1):
        cat = piece.root
        parts = cat.args[0] if cat.args else None
        if (cat.op != "call_function" or cat.target not in (torch.cat, torch.concat)
                or not isinstance(parts, (list, tuple)) or not piece.chain
                or data_users(cat) != [piece.members[0]]
                or (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) not in (
                    1, 1 - len(tensor_shape(cat) or ()))):
            continue
        owners = [by_sink.get(p) for p in parts]
        if any(o is None or data_users(p) != [cat] for o, p in zip(owners, parts)):
            continue
        folded = fold_region(piece)
        if not algebra.is_per_channel(folded):
            continue
        scale, shift = folded.weight.reshape(-1), folded.bias
        slices, start = [], 0
        for part, owner in zip(parts, owners):
            end = start + channels(part)
            after = algebra.diagonal(scale[start:end], shift[start:end], owner.affine.nd)
            slices.append((owner, replace(owner, then=(after,), group=group)))
            start = end
        found.append((replace(piece, absorbed=True, group=group), slices))
    return found


def _without_own_ops(region: Region, ops: dict[fx.Node, LinearOp]) -> list[Region] | None:
    """The chain's stretches between ops that run in the traced module's own forward (not
    inside a submodule), each as a chain of its own; None when it has no such op."""
    own = {m for m in region.members if m.op != "call_module" and not m.meta.get("nn_module_stack")}
    return split_chain(region, own) if own else None


def split_chain(region: Region, cut: set[fx.Node]) -> list[Region]:
    """The chain's stretches between the members in ``cut``, each as a chain of its own (a
    stretch of a chain that folded folds too)."""
    pieces: list[Region] = []
    stretch: list[int] = []
    for i, member in enumerate([*region.members, None]):
        if member is not None and member not in cut:
            stretch.append(i)
            continue
        if stretch:
            members = tuple(region.members[j] for j in stretch)
            ops = {m: region.ops[j] for j, m in zip(stretch, members)}
            folded = fold(ops, {members[-1]})
            assert not isinstance(folded, Split), "a stretch of a folded chain folds"
            expr = folded[members[-1]]
            pieces.append(replace(
                region, root=region.sources[stretch[0]], sink=members[-1], members=members,
                ops=tuple(ops.values()), affine=expr.affine,
                labels=tuple(region.labels[j] for j in stretch), macs_before=expr.macs,
                macs_after=fused_macs(members[-1], expr),
                sources=tuple(region.sources[j] for j in stretch),
                passthrough=tuple(region.passthrough[j] for j in stretch), tail=()))
        stretch = []
    return pieces


def _is_passthrough(op: LinearOp) -> bool:
    return isinstance(op, Unary) and op.free


def _structural_split(
    gm: fx.GraphModule, ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node],
    exprs: dict[fx.Node, Expr],
) -> Split | None:
    """Cut a region where one conv cannot stand for it: where its dtype changes, where it
    reads its input again after an op changed that input in place, or where code reads the
    shape of a value inside it that the fused output would not have. The pieces on either side
    still fold."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed_at: dict[fx.Node, list[int]] = {}  # each value's in-place changes, views included
    for node in gm.graph.nodes:
        base = mutated_input(node, gm)
        if base is not None:
            changed_at.setdefault(base, []).append(order[node])
    for sink in (n for n in ops if n in boundaries):
        root = exprs[sink].root
        members = [n for n in ops if n in exprs[sink].members]
        if len(members) < 2:
            continue  # a single op is left as it is anyway
        cut, reason = None, ""
        changed = next((m for m in members if tensor_dtype(m) != tensor_dtype(root)), None)
        if changed is not None:
            cut = changed
            reason = (f"dtype changes from {tensor_dtype(root)} to {tensor_dtype(changed)}: "
                      "one conv has one dtype").replace("torch.", "")
        mutations = changed_at.get(alias_base(root, gm), [])
        reads = [m for m in members if root in m.all_input_nodes]
        late = [m for m in reads if any(order[reads[0]] < p < order[m] for p in mutations)]
        if cut is None and late:
            cut = late[0]
            reason = (f"{root.name} is changed in place between the ops that read it: one conv "
                      "cannot read both versions")
        reshaped = next((m for m in members if m is not sink and _reads_shape(m)
                         and tensor_shape(m) != tensor_shape(sink)), None)
        if cut is None and reshaped is not None:
            cut = reshaped
            reason = (f"{reshaped.name}.shape is read, and differs from the fused output's shape "
                      f"{list(tensor_shape(sink) or [])}")
        if cut is not None:
            inner = inner_inputs(cut, ops, boundaries)
            if inner or cut not in boundaries:  # each split must add a boundary, or it loops
                return Split(cut, reason, inner or (cut,), drop=False)
    return None


def _reads_shape(node: fx.Node) -> bool:
    return any(metadata_read(u) == "shape" and u.args[0] is node for u in node.users)


def _computes_identity(region: Region) -> bool:
    """The region computes its input unchanged (its numbers are folded only where its geometry
    allows it)."""
    try:
        return region.affine.is_identity()
    except algebra.ValuesNeeded:
        return fold_region(region).is_identity()


