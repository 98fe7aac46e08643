"""A rewritten forward that is a chain of child calls runs as an ``nn.Sequential``.

Pattern: the forward fx wrote for a rewritten module (`surgery.wrap`) takes one input, calls
child ``a`` on it, child ``b`` on that result, and so on, and returns the last result; nothing
else runs (a DBB block once its branches fold: ``nonlinear(fused_conv(x))``).

Conditions: one placeholder with no default; every other node but the output calls a
distinct top-level child with the previous node as its only argument; the module has no other
children; every call of the module recorded in any fuse pass passed exactly one tensor,
positionally (a Sequential's forward takes one argument, named ``input``). Decided once every
pass is done (`surgery.run_chains_as_sequential`), so a call seen only at another input size
counts.

Result: ``nn.Sequential`` of those children under their names, holding the tensors the
GraphModule held itself (no op reads them, a folded BatchNormAct's own statistics, but a parent
may: ``self.bn.weight.dtype``), with the plain attributes the GraphModule carried (a
detector's ``m.f``, ``m.type``). Its state_dict keys are the GraphModule's, so a reader that
ignores the plan's ``sequential`` builds the GraphModule and loads the same file. It computes
what the GraphModule computes, call for call.

Why: a GraphModule's call runs two more Python frames than a module's (fx's error wrapper), and
its forward looks each child up through ``Module.__getattr__``; on a small deploy model that
cost 1-3% of the forward (GELAN's twelve RepConvN blocks: r/h 1.01-1.03, 0.98-0.99 as a
Sequential), where the authors' own deploy forward pays nothing of the kind. A call the fuse
never saw (another method calling the module by keyword) is what it costs: the module's own
parameter name is gone.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import fx, nn

from repconv.rewrite.attributes import carried_attributes


def chain_targets(gm: fx.GraphModule) -> list[str] | None:
    """The children ``gm``'s forward calls one after the other on its one input, in order; None
    where its forward is anything else."""
    nodes = list(gm.graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[0].args or nodes[-1].op != "output":
        return None
    previous, targets = nodes[0], []
    for node in nodes[1:-1]:
        if (node.op != "call_module" or node.args != (previous,) or node.kwargs
                or "." in str(node.target) or len(previous.users) != 1):
            return None
        targets.append(str(node.target))
        previous = node
    if nodes[-1].args != (previous,) or len(previous.users) != 1:
        return None
    if len(set(targets)) != len(targets) or set(dict(gm.named_children())) != set(targets):
        return None
    return targets


def as_sequential(gm: fx.GraphModule) -> nn.Sequential | None:
    """``gm`` (a module's rewritten forward, `surgery.wrap`) as an ``nn.Sequential`` with the
    attributes it carries, where it is a chain of child calls; None otherwise. The caller checks
    that the module is always called with one tensor."""
    targets = chain_targets(gm)
    if targets is None:
        return None
    sequential = nn.Sequential(OrderedDict((t, gm.get_submodule(t)) for t in targets))
    # no op reads them, but a parent may (``self.bn.weight.dtype``), and the keys stay the same
    for name, parameter in gm.named_parameters(recurse=False):
        sequential.register_parameter(name, parameter)
    for name, buffer in gm.named_buffers(recurse=False):
        sequential.register_buffer(name, buffer,
                                   persistent=name not in gm._non_persistent_buffers_set)
    # instance attributes shadow class ones (a detector's ``m.type`` shadows Module.type)
    for name, value in carried_attributes(gm).items():
        setattr(sequential, name, value)
    return sequential.train(gm.training)
