"""A class's own deploy forward, taken where it computes exactly what the fused forward does.

Pattern: a module whose fold left identity children (the BatchNorm slot of `repconv.fold.slot`,
an ``nn.Identity``) that its ``forward`` still calls, and whose class defines another method of
the same parameters that computes the same without them: YOLO's ``Conv.forward_fuse``
(``act(conv(x))`` beside ``act(bn(conv(x)))``), the deploy forward a framework's ``fuse()``
switches to.

Condition: both methods trace with torch.fx without setting anything on ``self``, and the
forward's graph with its calls of identity children dropped is the method's graph, node for node
(same ops, same targets, same arguments). Nothing is run: equal graphs compute the same.

Rewrite: ``module.forward = module.<method>`` (an instance attribute, as the framework's own
``fuse()`` sets it), so no identity child is called: each such call costs a Python module
call (about 2 µs on CPU), which on a small detector is 2-8% of its latency. The slots stay, so
the framework's ``fuse()`` still finds ``m.bn``. A plan replay (state_dict deploy files) takes
the step again on the model it rebuilt, with the same proof: nothing of it is read from the file.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from torch import fx, nn

from repconv.errors import TraceError
from repconv.fold.graph import eager_differs, runs_identity, trace


def adopt_own_forwards(model: nn.Module) -> list[str]:
    """Switch each module of ``model`` holding a BatchNorm slot to its class's own method that
    computes what its forward does without calling identity children; returns
    ``"path.method"`` for each switch."""
    adopted = []
    for path, module in model.named_modules():
        if not _has_slot_child(module) or eager_differs(module) is not None:
            continue
        candidates = list(_candidate_methods(module))
        fused = _signature_without_identities(module) if candidates else None
        if fused is None:
            continue
        for name in candidates:
            traced = _traced_as(module, name)
            if traced is not None and _signature(traced) == fused:
                module.forward = getattr(module, name)
                adopted.append(f"{path or 'model'}.{name}")
                break
    return adopted


def _is_identity(module: nn.Module) -> bool:
    if type(module) is nn.Identity:
        return eager_differs(module) is None
    return runs_identity(module)


def _has_slot_child(module: nn.Module) -> bool:
    """Whether a fold left a slot among its children: only there is a method worth tracing."""
    return any(runs_identity(child) for child in module.children())


def _candidate_methods(module: nn.Module) -> Iterator[str]:
    """Methods the module's own classes (not torch's) define beside ``forward``, taking the
    same parameters."""
    wanted = _parameters(type(module).forward)
    seen: set[str] = set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.") or cls is object:
            continue
        for name, value in vars(cls).items():
            if (name in seen or name == "forward" or name.startswith("__")
                    or not inspect.isfunction(value)):
                continue
            seen.add(name)
            if _parameters(value) == wanted:
                yield name


def _parameters(function: Any) -> list[tuple[str, Any]] | None:
    try:
        return [(p.kind, p.default) for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):
        return None


def _traced_as(module: nn.Module, method: str) -> fx.Graph | None:
    """``module``'s graph with ``method`` as its forward (a subclass over a copy of its state),
    or None where it does not trace or sets anything on ``self`` (state no graph shows)."""
    alternative = type(type(module).__name__, (type(module),),
                       {"forward": getattr(type(module), method)})
    twin = alternative.__new__(alternative)
    state = {**vars(module), **{name: dict(vars(module)[name]) for name in _REGISTRIES}}
    state.pop("forward", None)
    twin.__dict__ = dict(state)
    try:
        graph = trace(twin).graph
    except TraceError:
        return None
    if _changed(state, vars(twin)):
        return None
    return graph


_REGISTRIES = ("_modules", "_parameters", "_buffers")


def _changed(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether an attribute was set, rebound or removed (in the registries too)."""
    if before.keys() != after.keys():
        return True
    return any(after[name] is not value if name not in _REGISTRIES
               else after[name].keys() != value.keys()
               or any(after[name][k] is not v for k, v in value.items())
               for name, value in before.items())


def _signature_without_identities(module: nn.Module) -> list[tuple[Any, ...]] | None:
    """The forward's graph with its calls of identity children dropped, as `_signature`."""
    forward = _traced_as(module, "forward")
    if forward is None:
        return None
    for node in list(forward.nodes):
        if (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and _is_identity(module.get_submodule(str(node.target)))):
            node.replace_all_uses_with(node.args[0])
            forward.erase_node(node)
    return _signature(forward)


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]] | None:
    """Each node as (op, target, arguments), nodes named by position; None where an argument
    is a value that cannot be compared (a tensor constant)."""
    index = {node: i for i, node in enumerate(graph.nodes)}
    comparable = True

    def plain(value: Any) -> Any:
        nonlocal comparable
        if isinstance(value, fx.Node):
            return ("node", index[value])
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, *map(plain, value))
        if isinstance(value, dict):
            return ("dict", *((k, plain(v)) for k, v in value.items()))
        if value is None or isinstance(value, (bool, int, float, str, slice)):
            return value
        comparable = False
        return None

    nodes = [(node.op, node.target if node.op != "placeholder" else None, plain(node.args),
              plain(node.kwargs)) for node in graph.nodes]
    return nodes if comparable else None
