"""Tracing a module into a torch.fx graph with shapes, and reading constants out of it."""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from repconv.errors import TraceError

# Modules whose own forward repconv understands. A subclass that keeps the inherited forward is a
# leaf like its base; one that overrides forward (a fused BatchNorm+activation, say) is traced
# through, and its F.batch_norm / F.conv2d calls are recognised as functional ops.
UNDERSTOOD_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Linear,
)


def _keeps_inherited_forward(module: nn.Module) -> bool:
    return any(
        isinstance(module, base) and type(module).forward is base.forward
        for base in UNDERSTOOD_MODULES
    )


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, UNDERSTOOD_MODULES):
            return _keeps_inherited_forward(m)
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``module``; TraceError says why it does not trace."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # tracing runs user code: any failure means "does not trace"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(f"{type(exc).__name__}: {first_line}"[:300]) from exc
    for node in graph.nodes:
        if isinstance(node.type, str):
            # `from __future__ import annotations` leaves types as strings, which pickling
            # the GraphModule cannot handle; the type is only a code-generation hint.
            node.type = None
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def run_model(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> object:
    """Call ``module`` on the example input; a failure (wrong shape, say) is a TraceError that
    names the model's own complaint."""
    try:
        with torch.no_grad():
            return module(*example_inputs)
    except Exception as exc:  # the model's own code failed on the example input
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        shapes = [list(x.shape) for x in example_inputs]
        reason = (lines[-1] if lines else type(exc).__name__)[:300]
        raise TraceError(f"the model fails on an input of shape {shapes}: {reason}; check "
                         "--input-shape") from exc


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Tensor, ...]) -> None:
    """Run ``gm`` once, recording each node's output shape and dtype in ``node.meta``."""
    run_model(gm, example_inputs)  # ShapeProp prints a traceback on failure; fail cleanly first
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def _positional_inplace(node: fx.Node) -> bool:
    """``F.relu(x, True)``: an ``inplace`` parameter given by position."""
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return False
    index = params.index("inplace") if "inplace" in params else len(node.args)
    return len(node.args) > index and node.args[index] is True


def mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node whose tensor ``node`` changes in place (``x.add_(y)``, ``F.relu(x, inplace=True)``,
    ``x[i] = v``, ``nn.ReLU(inplace=True)``), or None. fx records such ops as ordinary nodes,
    so their effect on later readers is invisible to the graph's data flow."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        mutates = name.endswith("_") and not name.endswith("__")
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        mutates = (node.kwargs.get("inplace") is True or _positional_inplace(node)
                   or node.target is operator.setitem
                   or (name.endswith("_") and not name.endswith("__")))
    elif node.op == "call_module":
        mutates = getattr(gm.get_submodule(node.target), "inplace", False) is True
    else:
        mutates = False
    return target if mutates else None


def erase_dead_code(gm: fx.GraphModule) -> None:
    """Erase nodes nobody uses, except those that change a tensor in place (fx's own dead-code
    elimination counts ``x.sub_(m)`` as pure and would drop it)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.is_impure() or mutated_input(node, gm) is not None:
            continue
        gm.graph.erase_node(node)


def tensor_shape(node: fx.Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


@dataclass
class GraphContext:
    """What rules may read about a traced graph. Reading never mutates the graph."""

    module: fx.GraphModule
    _constants: dict[fx.Node, Any] = field(default_factory=dict)
    call_sites: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for node in self.module.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                self.call_sites[node.target] += 1

    def uses(self, target: str) -> int:
        """How many nodes call or read ``target`` or anything inside it (``conv`` and
        ``conv.weight`` are both uses of the conv)."""
        prefix = target + "."
        return sum(n for name, n in self.call_sites.items()
                   if name == target or name.startswith(prefix))

    def submodule(self, node: fx.Node) -> nn.Module:
        return self.module.get_submodule(node.target)

    def constant(self, value: Any) -> Any:
        """The value of ``value`` if it depends on no input (a get_attr, a literal, or ops on
        those); None when it depends on an input."""
        if not isinstance(value, fx.Node):
            if isinstance(value, (list, tuple)):
                items = [self.constant(v) for v in value]
                return None if any(i is None for i in items) else type(value)(items)
            return value
        if value in self._constants:
            return self._constants[value]
        result = self._evaluate(value)
        self._constants[value] = result
        return result

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            return getattr(self.module.get_submodule(owner), name)
        if node.op not in ("call_function", "call_method"):
            return None
        args = [self.constant(a) for a in node.args]
        kwargs = {k: self.constant(v) for k, v in node.kwargs.items()}
        if any(a is None for a in args) or any(v is None for v in kwargs.values()):
            return None
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            return getattr(args[0], node.target)(*args[1:], **kwargs)

    def is_constant(self, value: Any) -> bool:
        return self.constant(value) is not None

    def is_tensor_input(self, value: Any) -> bool:
        """An fx node whose value is a tensor that depends on the graph's input."""
        return (
            isinstance(value, fx.Node)
            and tensor_shape(value) is not None
            and not self.is_constant(value)
        )
