"""Aligning a frame's own trace with the scope trace: which node of the module's forward stands
for each node of the scope's graph, so that an edit planned on the scope's graph lands in the
frame's forward."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from repconv.errors import TraceError
from repconv.fold.calls import CallRecord
from repconv.fold.graph import trace
from repconv.rewrite.paths import stack

_JSON_SCALARS = (type(None), bool, int, float, str)


class AlignmentError(Exception):
    pass


@dataclass
class Alignment:
    """``values``: the node of the frame's trace computing each scope-trace node's value (None
    where a kept call returns several and which one is unknown); ``positions``: for a node
    inside a child kept as a call, that call (where the child's work runs)."""

    values: dict[fx.Node, fx.Node | None] = field(default_factory=dict)
    positions: dict[fx.Node, fx.Node] = field(default_factory=dict)

    def where(self, node: fx.Node) -> fx.Node | None:
        return self.values.get(node) or self.positions.get(node)


def _same_op(outer: fx.Node, inner: fx.Node, frame: str, gm: fx.GraphModule,
             fgm: fx.GraphModule) -> bool:
    if outer.op != inner.op:
        return False
    if outer.op == "call_module":
        # the same module object: a module shared by several parents has one path per call site
        return gm.get_submodule(str(outer.target)) is fgm.get_submodule(str(inner.target))
    if outer.op == "get_attr":
        return outer.target == (f"{frame}.{inner.target}" if frame else inner.target)
    return outer.target == inner.target


def _flat_nodes(node: fx.Node) -> list[Any]:
    flat: list[Any] = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def align(gm: fx.GraphModule, fgm: fx.GraphModule, frame: str) -> Alignment:
    """Map the nodes of the scope trace ``gm`` that run inside ``frame`` (and the values it
    reads from outside) to the nodes of ``frame``'s own trace ``fgm``. Both traces run the same
    Python in the same order; a child kept as a call in ``fgm`` stands for all its nodes."""
    outer_guards, inner_guards = _guard_nodes(gm), _guard_nodes(fgm)
    outer = [n for n in gm.graph.nodes if n not in outer_guards and (
        frame in stack(n) or (frame == "" and n.op not in ("placeholder", "output")))]
    inner = [n for n in fgm.graph.nodes
             if n.op not in ("placeholder", "output") and n not in inner_guards]
    alignment = Alignment()
    mapping = alignment.values
    mapping.update(_frame_inputs(gm, fgm, frame))
    unpacked = {n for n in mapping.values() if n is not None and n.op != "placeholder"}
    kept_calls: set[fx.Node] = set()
    i = 0
    for node in inner:
        if node in unpacked:
            continue  # an element of a list argument: the scope trace passed the element
        if node.target is operator.getitem and node.args[0] in kept_calls:
            continue  # unpacking a kept child's tuple: inlined, the tuple never existed
        if i >= len(outer):
            raise AlignmentError(f"{node.name} has no counterpart")
        child = f"{frame}.{node.target}" if frame else str(node.target)
        if node.op == "call_module" and outer[i].target != child and child in stack(outer[i]):
            group = []
            while i < len(outer) and child in stack(outer[i]):
                group.append(outer[i])
                i += 1
            members = set(group)
            outputs = [g for g in group if any(u not in members for u in g.users)]
            kept_calls.add(node)
            alignment.positions.update((g, node) for g in group)
            # the call's arguments are the values the group reads from outside it
            reads = list(dict.fromkeys(a for g in group for a in g.all_input_nodes
                                       if a not in members and a.op != "get_attr"))
            args = [a for a in _flat_nodes(node) if isinstance(a, fx.Node)]
            if len(reads) == len(args):
                for a, b in zip(reads, args):
                    if b.op == "placeholder":
                        mapping.setdefault(a, b)
            for g in outputs:
                # one output is the call's value; of several, which is which is unknown here
                mapping[g] = node if len(outputs) == 1 else None
            continue
        if not _same_op(outer[i], node, frame, gm, fgm):
            raise AlignmentError(f"{outer[i].name} vs {node.name}")
        mapping[outer[i]] = node
        for a, b in zip(_flat_nodes(outer[i]), _flat_nodes(node)):
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and b.op == "placeholder":
                mapping.setdefault(a, b)
        i += 1
    return alignment


def _frame_inputs(gm: fx.GraphModule, fgm: fx.GraphModule,
                  frame: str) -> dict[fx.Node, fx.Node | None]:
    """The values the scope trace passed to ``frame``'s call (recorded as the trace made the
    call), each matched to the frame's placeholder or, for an element of a list or tuple
    argument, to the frame's ``placeholder[i]``."""
    placeholders = [n for n in fgm.graph.nodes if n.op == "placeholder"]
    if not frame:
        outer = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return dict(zip(outer, placeholders))
    recorded = gm.meta.get("module_calls", {}).get(frame)
    if recorded is None:
        return {}
    args, kwargs = recorded
    by_name = {str(p.target): p for p in placeholders}
    pairs = [*zip(args, placeholders), *((v, by_name[k]) for k, v in kwargs.items()
                                          if k in by_name)]
    found: dict[fx.Node, fx.Node | None] = {}
    for value, placeholder in pairs:
        if isinstance(value, fx.Node):
            found[value] = placeholder
        elif isinstance(value, (list, tuple)):
            for user in placeholder.users:
                index = user.args[1] if user.target is operator.getitem else None
                if (isinstance(index, int) and -len(value) <= index < len(value)
                        and isinstance(value[index], fx.Node)):
                    found.setdefault(value[index], user)
    return found


def _guard_nodes(fgm: fx.GraphModule) -> set[fx.Node]:
    """The checks fx adds for arguments held fixed while tracing (``flag == True`` asserted,
    ``_assert_is_none(extra)``): they read only a placeholder and have no counterpart in a
    trace that held the argument at a larger scope."""
    guards: set[fx.Node] = set()
    for node in fgm.graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            if user.target is _assert_is_none:
                guards.add(user)
            elif user.target is operator.eq and all(u.target is torch._assert
                                                     for u in user.users):
                guards |= {user, *user.users}
    return guards


def frame_arguments(frame_path: str, calls: Mapping[str, CallRecord], module: nn.Module,
                     scope_concrete: dict[str, Any] | None) -> dict[str, Any] | str:
    """The non-tensor arguments to hold fixed while tracing a frame, or why it cannot be."""
    if scope_concrete is not None:
        concrete = scope_concrete
    else:
        record = calls.get(frame_path)
        if record is None or record.count == 0:
            return "never called on the example input"
        if len(set(record.flags)) > 1:
            return "called with different non-tensor arguments; one trace cannot hold them all"
        concrete = record.constants or {}
    if not all(isinstance(v, _JSON_SCALARS) for v in concrete.values()):
        return "takes non-tensor arguments a deploy file cannot record"
    return concrete


def trace_and_align(
    gm: fx.GraphModule, scope_module: nn.Module, frame: str, frame_path: str,
    inlined: set[str], calls: Mapping[str, CallRecord], scope_concrete: dict[str, Any],
) -> tuple[fx.GraphModule, Alignment, dict[str, Any]]:
    """The frame's own trace, with the children not ``inlined`` (paths relative to the frame)
    kept as calls where the two traces still line up (else every child inlined), and the map
    from the scope trace's nodes to it."""
    frame_module = scope_module.get_submodule(frame) if frame else scope_module
    concrete = frame_arguments(frame_path, calls, frame_module,
                                scope_concrete if frame == "" else None)
    if isinstance(concrete, str):
        raise TraceError(concrete)
    leaves = frozenset(n for n, _ in frame_module.named_modules() if n and n not in inlined)
    try:
        fgm = trace(frame_module, leaves, concrete)
        return fgm, align(gm, fgm, frame), concrete
    except (TraceError, AlignmentError):
        # a child kept as a call may return a tuple its caller unpacks: inline every child
        fgm = trace(frame_module, frozenset(), concrete)
        return fgm, align(gm, fgm, frame), concrete
