"""Find linear regions in a traced graph, fold each into one conv, and replay recorded folds.

A linear region is a connected set of nodes the rules lowered, with one input (its root) and one
output (its sink) whose intermediate values nothing else uses. Its value is one `Affine` of the
root, built by walking the region in graph order with `algebra.then` / `add` / `concat`.

Analysis (`analyse`) only reads the graph. Where an operation is not exact or would cost more
than the ops it replaces, the node's inputs become region boundaries and the reason is kept; the
analysis repeats until it is stable, so the largest exact pieces still fold. `apply` rewrites,
and returns the plan entries that `replay` uses to rebuild the same structure on a fresh model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils import skip_init

from repconv import algebra
from repconv.algebra import Affine
from repconv.errors import AlgebraError, InputError
from repconv.graph import (
    GraphContext,
    erase_dead_code,
    mutated_input,
    tensor_dtype,
    tensor_shape,
)
from repconv.rules import RULES, LinearOp, Refusal, Sum, Unary
from repconv.rules.base import channels, describe, spatial_dims

# A region whose fused output differs from the original by more than this, relative to the
# output's scale, in float64, is not rewritten: the algebra would be wrong, so keep the model.
LOCAL_TOLERANCE = 1e-6
LOCAL_CHECK_SIZE = 13
_CONV_LABELS = ("Conv1d", "Conv2d", "Conv3d", "conv1d", "conv2d", "conv3d", "Linear", "linear",
                "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
_MODULE_KINDS: dict[str, type[nn.Module]] = {
    kind.__name__: kind
    for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear)
}


@dataclass(frozen=True)
class Skip:
    """Something left unfused, where, and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class Region:
    root: fx.Node
    sink: fx.Node
    members: tuple[fx.Node, ...]
    affine: Affine
    labels: tuple[str, ...]
    macs_before: int
    macs_after: int

    @property
    def kind(self) -> str:
        if self.affine.is_identity():
            return "identity removed"
        if any(label in ("add", "sub", "cat") for label in self.labels):
            return "multi-branch"
        convs = sum(label in _CONV_LABELS for label in self.labels)
        if convs > 1:
            return "conv chain"
        if convs == 1:
            has_bn = any("norm" in label.lower() for label in self.labels)
            return "conv+bn" if has_bn else "conv+affine"
        return "affine merge"


@dataclass
class Analysis:
    regions: list[Region] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)


@dataclass(frozen=True)
class _Expr:
    root: fx.Node
    affine: Affine
    members: frozenset[fx.Node]
    macs: int


@dataclass(frozen=True)
class _Split:
    """Fold failed at ``node``: make ``boundaries`` region outputs; ``drop`` the node if it can
    no longer be a linear op (a sum or concat whose terms cannot be combined)."""

    node: fx.Node
    reason: str
    boundaries: tuple[fx.Node, ...]
    drop: bool


def _inputs(op: LinearOp) -> tuple[fx.Node, ...]:
    if isinstance(op, Unary):
        return (op.source,)
    if isinstance(op, Sum):
        return tuple(term for term, _ in op.terms)
    return op.parts


def _inner_inputs(
    node: fx.Node, ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node]
) -> tuple[fx.Node, ...]:
    """The inputs of ``node`` that lie inside its region (folded into it, not its root)."""
    return tuple(s for s in _inputs(ops[node]) if s in ops and s not in boundaries)


def _numel(node: fx.Node) -> int:
    shape = tensor_shape(node)
    return math.prod(shape[1:]) if shape is not None else 0


def _lower_all(gm: fx.GraphModule, ctx: GraphContext) -> tuple[dict[fx.Node, LinearOp], list[Skip]]:
    ops: dict[fx.Node, LinearOp] = {}
    skips: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if tensor_shape(node) is None or mutated_input(node, gm) is not None:
            continue  # in-place ops stay as they are: their effect is not in the data flow
        for rule in RULES:
            answer = rule(node, ctx)
            if answer is None:
                continue
            if isinstance(answer, Refusal):
                skips.append(Skip(describe(node), answer.reason))
            else:
                ops[node] = answer
            break
    return ops, skips


def _drop_multi_root(ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node]) -> None:
    """Sums and concats of values with different roots are not maps of one input: they stay as
    they are, and their linear inputs become region outputs."""
    changed = True
    while changed:
        changed = False
        roots: dict[fx.Node, frozenset[fx.Node]] = {}
        for node, op in ops.items():
            found: set[fx.Node] = set()
            for source in _inputs(op):
                inner = source in ops and source not in boundaries
                found |= roots[source] if inner else {source}
            roots[node] = frozenset(found)
            if len(found) > 1 and not isinstance(op, Unary):
                del ops[node]
                boundaries.update(s for s in _inputs(op) if s in ops)
                changed = True
                break


def _fold(
    ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node]
) -> dict[fx.Node, _Expr] | _Split:
    exprs: dict[fx.Node, _Expr] = {}

    def value(source: fx.Node) -> _Expr:
        if source in ops and source not in boundaries:
            return exprs[source]
        return _Expr(source, algebra.identity(channels(source), spatial_dims(source)),
                     frozenset(), 0)

    for node, op in ops.items():
        parts = [value(source) for source in _inputs(op)]
        inner = _inner_inputs(node, ops, boundaries)
        try:
            if isinstance(op, Unary):
                (part,) = parts
                affine = op.affine if not part.members else algebra.then(part.affine, op.affine)
                macs = part.macs + _numel(node) * op.affine.macs_per_output()
            else:
                if isinstance(op, Sum):
                    affine = algebra.add(
                        *(algebra.scaled(p.affine, c) for p, (_, c) in zip(parts, op.terms))
                    )
                else:
                    affine = algebra.concat(*(p.affine for p in parts))
                # Parallel branches always merge: one conv reads the input once. The budget a
                # later chain is held to is what the merged conv costs.
                macs = max(sum(p.macs for p in parts), _numel(node) * affine.macs_per_output())
        except AlgebraError as exc:
            return _Split(node, str(exc), inner, drop=not isinstance(op, Unary))
        members = frozenset().union(*(p.members for p in parts)) | {node}
        assert len({p.root for p in parts}) == 1, "multi-root nodes are dropped before folding"
        exprs[node] = _Expr(parts[0].root, affine, members, macs)
    return exprs


def _fused_macs(node: fx.Node, expr: _Expr) -> int:
    return _numel(node) * expr.affine.macs_per_output()


def _cost_split(
    ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node], exprs: dict[fx.Node, _Expr]
) -> _Split | None:
    """A region whose one conv costs more than its ops splits where a chain first grows."""
    for sink in (n for n in ops if n in boundaries):
        expr = exprs[sink]
        if _fused_macs(sink, expr) <= expr.macs or expr.affine.is_identity():
            continue
        node = next(
            m for m in ops if m in expr.members and _fused_macs(m, exprs[m]) > exprs[m].macs
        )
        inner = _inner_inputs(node, ops, boundaries)
        reason = (f"cost: one conv would take {_fused_macs(node, exprs[node]):,} MACs per sample, "
                  f"the {len(exprs[node].members)} ops it replaces {exprs[node].macs:,}")
        return _Split(node, reason, inner, drop=False)
    return None


def analyse(gm: fx.GraphModule) -> Analysis:
    """The regions of ``gm`` (shapes already propagated) that fold into one conv, and what
    stays unfused and why. Reads the graph; changes nothing."""
    ctx = GraphContext(gm)
    ops, skips = _lower_all(gm, ctx)
    boundaries = {node for node in ops if any(user not in ops for user in node.users)}
    _drop_multi_root(ops, boundaries)
    while True:
        folded = _fold(ops, boundaries)
        if not isinstance(folded, _Split):
            folded = (_structural_split(gm, ops, boundaries, folded)
                      or _cost_split(ops, boundaries, folded) or folded)
        if isinstance(folded, _Split):
            skips.append(Skip(describe(folded.node), folded.reason))
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
        boundaries.update(n for n in shared if any(u not in shared for u in n.users))
        _drop_multi_root(ops, boundaries)
    for node in boundaries:
        outside = [u.name for u in node.users if u not in ops]
        inside = [u for u in node.users if u in ops]
        if outside and inside and len(node.users) > 1:
            skips.append(Skip(describe(node), (
                f"output has {len(node.users)} users ({', '.join(u.name for u in node.users)}); "
                f"kept as is so {', '.join(outside)} still sees it")))
    regions = []
    for sink in (n for n in ops if n in boundaries):
        expr = folded[sink]
        if len(expr.members) < 2 and not expr.affine.is_identity():
            continue
        members = tuple(n for n in ops if n in expr.members)
        regions.append(Region(
            root=expr.root,
            sink=sink,
            members=members,
            affine=expr.affine,
            labels=tuple(ops[m].label for m in members),
            macs_before=expr.macs,
            macs_after=_fused_macs(sink, expr),
        ))
    return Analysis(regions, skips)


def _structural_split(
    gm: fx.GraphModule, ops: dict[fx.Node, LinearOp], boundaries: set[fx.Node],
    exprs: dict[fx.Node, _Expr],
) -> _Split | None:
    """Cut a region where one conv cannot stand for it: where its dtype changes, or where it
    reads its input again after an op changed that input in place. The pieces on either side
    still fold."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
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
        mutations = [order[u] for u in root.users if mutated_input(u, gm) is root]
        reads = [m for m in members if root in m.all_input_nodes]
        late = [m for m in reads if any(order[reads[0]] < p < order[m] for p in mutations)]
        if cut is None and late:
            cut = late[0]
            reason = (f"{root.name} is changed in place between the ops that read it: one conv "
                      "cannot read both versions")
        if cut is not None:
            inner = _inner_inputs(cut, ops, boundaries)
            if inner or cut not in boundaries:  # each split must add a boundary, or it loops
                return _Split(cut, reason, inner or (cut,), drop=False)
    return None


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
    graph.output(env[region.sink])
    return fx.GraphModule(gm, graph)


def local_error(gm: fx.GraphModule, region: Region, seed: int = 0) -> float:
    """Scale-relative max error of the fused conv against the region's ops, both in float64."""
    shape = tensor_shape(region.root)
    generator = torch.Generator().manual_seed(seed)
    # The maps are shift-invariant, so a small odd-sized crop checks interior and borders alike
    # at a fraction of the cost of the model's full resolution.
    extent, stride = region.affine.extent, region.affine.stride
    spatial = [min(n, max(LOCAL_CHECK_SIZE, 2 * e + s + 1))
               for n, e, s in zip(shape[2:], extent, stride)]
    x = torch.randn((1, shape[1], *spatial), generator=generator, dtype=torch.float64)
    original = copy.deepcopy(region_module(gm, region)).double().eval()
    fused = algebra.to_module(region.affine, torch.float64)
    with torch.no_grad():
        expected, got = original(x), fused(x)
    if expected.shape != got.shape:
        return math.inf
    scale = float(expected.abs().max())
    error = float((expected - got).abs().max())
    return error / scale if scale > 0 else error


def module_spec(module: nn.Module) -> dict[str, object]:
    """What rebuilds an empty copy of a fused conv or linear layer (weights-only serialisable)."""
    spec: dict[str, object] = {
        "type": type(module).__name__,
        "dtype": str(module.weight.dtype).removeprefix("torch."),
    }
    if isinstance(module, nn.Linear):
        spec.update(in_features=module.in_features, out_features=module.out_features)
        return spec
    spec.update(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=list(module.kernel_size),
        stride=list(module.stride),
        padding=list(module.padding),
        dilation=list(module.dilation),
        groups=module.groups,
        padding_mode=module.padding_mode,
    )
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        spec["output_padding"] = list(module.output_padding)
    return spec


def build_from_spec(spec: dict[str, object]) -> nn.Module:
    args = dict(spec)
    kind, dtype = args.pop("type"), args.pop("dtype")
    if kind not in _MODULE_KINDS or not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise InputError(f"deploy plan names an unknown module {kind!r}; the file is damaged")
    # empty weights: load_state_dict fills them
    return skip_init(_MODULE_KINDS[kind], **args, dtype=getattr(torch, str(dtype)))


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    owner = gm
    for part in filter(None, parent.split(".")):
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    setattr(owner, name, module)


def _module_name(gm: fx.GraphModule, region: Region, taken: set[str]) -> str:
    """Reuse the first conv's name (it has one call site, or it would not be in a region)."""
    for member in region.members:
        if member.op == "call_module" and member.target not in taken and isinstance(
            gm.get_submodule(member.target), tuple(_MODULE_KINDS.values())
        ):
            return str(member.target)
    return f"repconv_fused_{region.sink.name}"


def _insert(
    gm: fx.GraphModule, root: fx.Node, first: fx.Node, sink: fx.Node, name: str | None
) -> fx.Node:
    """Make ``sink``'s users read the fused conv of ``root`` (or ``root`` itself), computed where
    the region's first op ran: an in-place change of ``root`` after that point must not be seen."""
    if name is None:
        sink.replace_all_uses_with(root)
        return root
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_module(name, (root,))
    sink.replace_all_uses_with(fused)
    return fused


def _finish(gm: fx.GraphModule) -> None:
    erase_dead_code(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def apply(gm: fx.GraphModule, regions: Iterable[Region]) -> list[dict[str, object]]:
    """Rewrite each region into one conv; returns the plan entries that replay it."""
    plan: list[dict[str, object]] = []
    taken: set[str] = set()
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    replaced: dict[fx.Node, fx.Node] = {}  # a sink rewritten earlier may be a later root
    for region in regions:
        root = replaced.get(region.root, region.root)
        entry: dict[str, object] = {
            "root": region.root.name, "first": region.members[0].name, "sink": region.sink.name
        }
        if region.affine.is_identity():
            name = None
        else:
            dtype = tensor_dtype(region.sink) or torch.float32
            module = algebra.to_module(region.affine, dtype, device)
            name = _module_name(gm, region, taken)
            taken.add(name)
            _set_submodule(gm, name, module)
            entry["spec"] = module_spec(module)
        entry["module"] = name
        replaced[region.sink] = _insert(gm, root, region.members[0], region.sink, name)
        plan.append(entry)
    _finish(gm)
    return plan


def replay(gm: fx.GraphModule, plan: Iterable[dict[str, object]]) -> None:
    """Rebuild the structure ``apply`` wrote, with empty weights, on a fresh trace."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for entry in plan:
        root, sink = nodes.get(str(entry["root"])), nodes.get(str(entry["sink"]))
        first = nodes.get(str(entry.get("first", entry["sink"])))
        if root is None or sink is None or first is None:
            raise InputError(
                f"deploy plan refers to node {entry['root']!r}/{entry['sink']!r}, which this "
                "model does not have; build the same architecture the deploy file was made from"
            )
        name = entry.get("module")
        if name is not None:
            _set_submodule(gm, str(name), build_from_spec(dict(entry["spec"])))
        # entries name original nodes; a later entry's root may be this entry's sink
        nodes[sink.name] = _insert(gm, root, first, sink, None if name is None else str(name))
    _finish(gm)
