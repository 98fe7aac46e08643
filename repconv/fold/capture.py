"""Capturing a module's forward as a torch.fx graph when symbolic tracing cannot.

torch.fx traces with proxies that carry no values, so Python that needs a value stops it: an
``if`` on a size, ``len()`` or iteration over a tuple of tensors (``list(x.chunk(2, 1))``), an
in-place border write (``out[:, :, :p] = v``), a cache on ``self`` refreshed when the input's
shape changes. The values route traces with proxies that carry the real value of what they
stand for, computed on the example input as the graph is built (as transformers' HFTracer did
with meta tensors). Python that needs a value gets it, and every such decision is recorded as a
`Guard`: the graph holds for inputs on which each guard decides the same way.

What a guard means for the capture:
- A decision on the values of the input (``if x.max() > 0``) makes the graph hold for the
  example alone: the capture is refused (`TraceError`).
- A decision on sizes (``if x.shape[-1] > 96``, ``len(t.chunk(2))``) makes the graph hold for
  the sizes that decide alike. The driver captures again at sizes that cross each guard
  (`crossing_sizes`) and folds only what every capture agrees on; verification covers them.
- A decision on constants (a parameter's shape) holds everywhere.

The graph is the module's own forward with the model's leaves kept as calls, in torch-level ops
like a symbolic trace, so the same rules read it. Module state the forward changes while it is
traced (``self.anchors = ...``) is put back afterwards: capturing never changes the model.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_flatten

from repconv.errors import TraceError, one_line
from repconv.fold.calls import BoundCall, Recall, copies
from repconv.fold.graph import (
    Tracer,
    graph_module,
    metadata_read,
    propagate_shapes,
    trace,
)
from repconv.fold.inplace import fold_border_writes

# where a value came from, as far as a guard is concerned
CONSTANT, SIZE, DATA = "constant", "size", "data"


@dataclass(frozen=True)
class Guard:
    """A decision the traced Python took on a value: ``what`` (bool, len, int, iter) of node
    ``node`` came out as ``value``. ``depends`` is CONSTANT, SIZE or DATA."""

    node: str
    what: str
    value: object
    depends: str
    where: str  # the module whose forward took the decision ("" for the traced module's own)
    # for a size compared with a constant: the input dimension, the constant and the ratio of
    # the input's size to the compared one, so sizes on either side can be tried
    threshold: tuple[int, int, int, float] | None = None  # (input index, dim, constant, scale)


@dataclass
class Capture:
    """A module's forward as a graph with shapes, how it was captured and the guards it holds
    under. ``symbolic_failure``: why torch.fx did not trace it (values route); ``opaque``: the
    children kept as calls because neither route went through them, with the reason."""

    module: fx.GraphModule
    route: str  # "symbolic" or "values"
    guards: list[Guard] = field(default_factory=list)
    symbolic_failure: str = ""
    opaque: dict[str, str] = field(default_factory=dict)

    @property
    def size_guards(self) -> list[Guard]:
        return [g for g in self.guards if g.depends == SIZE]


class ValueProxy(fx.Proxy):
    """A proxy that knows the value it stands for on the example input."""

    @property
    def value(self) -> Any:
        return self.tracer.values[self.node]  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return ValueAttribute(self, name)

    def __len__(self) -> int:
        return self.tracer.decide(self, "len", len(self.value))  # type: ignore[attr-defined]

    def __index__(self) -> int:
        return self.tracer.decide(self, "int", operator.index(self.value))  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return self.tracer.decide(self, "int", int(self.value))  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.decide(self, "float", float(self.value))  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __contains__(self, item: Any) -> bool:
        return self.tracer.decide(self, "contains", item in self.value)  # type: ignore[attr-defined]


class ValueAttribute(ValueProxy, fx.proxy.Attribute):
    """``proxy.shape`` and the like: the node is made when first needed, the value at once."""

    def __init__(self, root: ValueProxy, attr: str) -> None:
        fx.proxy.Attribute.__init__(self, root, attr)

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)  # type: ignore[attr-defined]


def _value_of(tracer: ValueTracer, arg: Any) -> Any:
    def lookup(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a not in tracer.values:  # a tensor constant fx made an attribute of the root
            tracer.values[a] = tracer.attribute(str(a.target))
        return tracer.values[a]
    return map_aggregate(arg, lookup)


class ValueTracer(Tracer):
    """A tracer whose proxies carry values: each node's value is computed from its arguments'
    values as the node is made (leaves are called on real tensors), and every decision Python
    takes on a value is recorded as a guard."""

    def __init__(self, inputs: dict[str, Any], leaves: frozenset[str] = frozenset()) -> None:
        super().__init__(leaves)
        self.inputs = inputs
        self.values: dict[fx.Node, Any] = {}
        self.guards: list[Guard] = []
        self.computing = False  # a leaf runs on real values: its own calls are not traced
        self.on_data: set[fx.Node] = set()  # computed from an input's values
        self.on_size: set[fx.Node] = set()  # computed from an input's sizes or flags

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], name: str | None = None,
                     type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            self.values[node] = self.inputs[str(target)]
        elif kind == "get_attr":
            self.values[node] = self.attribute(str(target))
        elif kind != "output":
            values = _value_of(self, node.args), _value_of(self, node.kwargs)
            self.computing = True
            try:
                with torch.no_grad():
                    self.values[node] = self._run(kind, target, *values)
            finally:
                self.computing = False
        if kind != "output":
            self._track(node)
        return proxy

    def attribute(self, target: str) -> Any:
        computing, self.computing = self.computing, True  # real attributes, not proxies
        try:
            value: Any = self.root
            for part in target.split("."):
                value = getattr(value, part)
            return value
        finally:
            self.computing = computing

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self.computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "call_module":
            return self.root.get_submodule(str(target))(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], str(target))(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.decide(obj, "bool", bool(obj.value))  # type: ignore[attr-defined]

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = obj.value  # type: ignore[attr-defined]
        if isinstance(value, dict):
            return iter(self.decide(obj, "keys", list(value)))
        count = self.decide(obj, "len", len(value))  # iterating decides on the length
        return iter([obj[i] for i in range(count)])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.decide(obj, "keys", list(obj.value))  # type: ignore[attr-defined]

    def decide(self, proxy: fx.Proxy, what: str, value: Any) -> Any:
        node = proxy.node
        depends = self._depends(node)
        if what in ("len", "keys") and depends == DATA:
            depends = SIZE  # how many tensors a split gives depends on sizes, not values
        self.guards.append(Guard(node.name, what, value, depends, self.scope.module_path,
                                 self._threshold(node)))
        return value

    def _depends(self, node: fx.Node) -> str:
        """What a decided value depends on: DATA if the values of an input reach it other than
        through a metadata read, SIZE if only the inputs' sizes (or non-tensor arguments) do,
        CONSTANT otherwise (flags kept per node as it is made: `_track`)."""
        return DATA if node in self.on_data else SIZE if node in self.on_size else CONSTANT

    def _track(self, node: fx.Node) -> None:
        """Record whether ``node`` is computed from an input's values or only its sizes."""
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            (self.on_data if isinstance(self.values[node], Tensor) else self.on_size).add(node)
        elif metadata_read(node) is not None:
            if any(a in self.on_data or a in self.on_size for a in inputs):
                self.on_size.add(node)
        else:
            if any(a in self.on_data for a in inputs):
                self.on_data.add(node)
            if any(a in self.on_size for a in inputs):
                self.on_size.add(node)

    def _threshold(self, node: fx.Node) -> tuple[int, int, int, float] | None:
        """(input index, dim, constant, scale) for ``t.shape[d] <op> c`` (either order), ``t``
        an input or a tensor computed from one: the input's size ``d`` is about ``c * scale``
        where ``t``'s crosses ``c`` (scale: the input's size over ``t``'s on the example)."""
        comparisons = (operator.gt, operator.ge, operator.lt, operator.le, operator.eq,
                       operator.ne)
        if node.op != "call_function" or node.target not in comparisons or len(node.args) != 2:
            return None
        for dim_side, constant in (node.args, reversed(node.args)):
            found = _tensor_dim(dim_side)
            if found is None or not isinstance(constant, int) or isinstance(constant, bool):
                continue
            tensor, dim = found
            value = self.values.get(tensor)
            placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
            inputs = [(i, self.values.get(p)) for i, p in enumerate(placeholders)
                      if isinstance(self.values.get(p), Tensor)]
            same_rank = [(i, x) for i, x in inputs
                         if isinstance(value, Tensor) and x.dim() == value.dim()]
            if not same_rank or not -value.dim() <= dim < value.dim() or not value.shape[dim]:
                continue
            index, source = next(((i, x) for i, x in same_rank
                                  if placeholders[i] is tensor), same_rank[0])
            return index, dim, constant, source.shape[dim] / value.shape[dim]
        return None


def _tensor_dim(node: Any) -> tuple[fx.Node, int] | None:
    """(tensor node, dim) when ``node`` is ``t.shape[d]`` or ``t.size(d)``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        source, dim = node.args
    elif (node.op == "call_function" and node.target is operator.getitem
          and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function"
          and node.args[0].target is getattr and node.args[0].args[1] == "shape"):
        source, dim = node.args[0].args[0], node.args[1]
    else:
        return None
    if not isinstance(source, fx.Node) or not isinstance(dim, int):
        return None
    return source, dim


def _module_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module's attributes, and copies of its parameter, buffer and child tables."""
    state = []
    for module in model.modules():
        own = dict(vars(module))
        for table in ("_parameters", "_buffers", "_modules"):
            own[table] = dict(own.get(table, {}))
        state.append((module, own))
    return state


def _restore(state: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, own in state:
        for table in ("_parameters", "_buffers", "_modules"):
            current = vars(module).get(table)
            if current is not None:
                current.clear()
                current.update(own[table])
                own[table] = current
        vars(module).clear()
        vars(module).update(own)


def capture_values(module: nn.Module, bound: BoundCall, leaves: frozenset[str] = frozenset(),
                   ) -> Capture:
    """``module``'s forward traced with value-carrying proxies on the call ``bound``; raises
    TraceError when Python still stops it or it decides on the input's values."""
    tracer = ValueTracer(_inputs_by_name(module, bound), leaves)
    state = _module_state(module)
    try:
        # made before the state is put back: fx keeps tensor constants as root attributes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gm = graph_module(module, tracer.trace(module), tracer)
    except TraceError:
        raise
    except Exception as exc:  # tracing runs user code: any failure means "does not capture"
        # the user reads "a traced value" where Python met one of the tracer's proxies
        reason = re.sub(r"<class 'repconv\.fold\.capture\.Value\w+'>|Value(Proxy|Attribute)",
                        "a traced value", one_line(exc, 300))
        raise TraceError(f"{type(exc).__name__}: {reason}"[:300],
                         failed_in=tracer.failed_in) from exc
    finally:
        _restore(state)
    data = next((g for g in tracer.guards if g.depends == DATA), None)
    if data is not None:
        raise TraceError(f"its forward decides on the values of its input ({data.what} of "
                         f"{data.node}): a graph would hold for the example alone",
                         failed_in=data.where)
    return Capture(gm, "values", tracer.guards)


def _inputs_by_name(module: nn.Module, bound: BoundCall) -> dict[str, Any]:
    """The call's values by the placeholder names fx gives ``forward``'s parameters."""
    inputs: dict[str, Any] = {}
    values = list(bound.positional)
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            inputs["*" + parameter.name], values = tuple(values), []
        elif parameter.kind is parameter.VAR_KEYWORD:
            inputs["**" + parameter.name] = {}
        elif values:
            inputs[parameter.name] = values.pop(0)
    return inputs


def crossing_sizes(capture: Capture, shapes: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Input shapes on either side of each size threshold the capture decided on (a size
    compared with a constant): around the threshold, scaled to the input, and at the
    threshold's neighbours aligned like the example (a model that needs sizes divisible by its
    stride runs there)."""
    found: list[list[tuple[int, ...]]] = []
    for guard in capture.size_guards:
        if guard.threshold is None:
            continue
        index, dim, constant, scale = guard.threshold
        if index >= len(shapes) or not -len(shapes[index]) <= dim < len(shapes[index]):
            continue
        here = shapes[index][dim]
        align = min(here & -here, 32)
        centre = constant * scale
        sizes = [round(centre) - 1, round(centre), round(centre) + 1,
                 (math.floor(centre / align) + 1) * align, math.floor(centre / align) * align]
        for size in dict.fromkeys(sizes):
            if size < 1 or size == here:
                continue
            changed = list(shapes[index])
            changed[dim] = size
            # keep square inputs square: a threshold on the width is usually one on the height
            if len(changed) == 4 and shapes[index][2] == shapes[index][3] and dim % 4 >= 2:
                changed[2] = changed[3] = size
            candidate = [*shapes[:index], tuple(changed), *shapes[index + 1:]]
            if candidate not in found and math.prod(changed) <= MAX_CROSSING_ELEMENTS:
                found.append(candidate)
    return found


# a size across a threshold is tried only up to this many input elements (a forward there runs)
MAX_CROSSING_ELEMENTS = 50_000_000


# a child that stops both routes is kept as one opaque call, so that its siblings still fold; at
# most this many, then the module is fused child by child
MAX_OPAQUE_CHILDREN = 16


def capture(module: nn.Module, bound: BoundCall, expected: object,
            recall: Recall | None = None) -> Capture:
    """``module``'s forward on the call ``bound`` (which returned ``expected``) as a graph with
    shapes: torch.fx's symbolic trace where it works; else the values route; else the values
    route with each child that stops it kept as an opaque call. TraceError says why none did.
    ``recall``: the layer outputs of the eager forward that returned ``expected``, so that
    proving a symbolic trace faithful does not run its layers again."""
    try:
        gm = trace(module, concrete_args=bound.concrete)
        _check_faithful(gm, bound, expected, recall)
        return Capture(gm, "symbolic")
    except TraceError as exc:
        symbolic = exc
    opaque: dict[str, str] = {}
    while True:
        try:
            captured = capture_values(module, bound, frozenset(opaque))
            _check_faithful(captured.module, bound, expected)
        except TraceError as exc:
            child = exc.failed_in
            if not child or child in opaque or len(opaque) >= MAX_OPAQUE_CHILDREN:
                raise TraceError(f"torch.fx: {symbolic}; with values: {exc}"[:400]) from exc
            opaque[child] = str(exc)
            continue
        fold_border_writes(captured.module)
        captured.symbolic_failure, captured.opaque = str(symbolic), opaque
        return captured


def _check_faithful(gm: fx.GraphModule, bound: BoundCall, expected: object,
                    recall: Recall | None = None) -> None:
    """Run the graph on the call (recording shapes); TraceError unless it returns what the
    module returned: the same tensors with the same values, in containers of any kind (fx
    returns an immutable_dict where the module made an OrderedDict). A layer the graph gives
    exactly its eager arguments returns its eager output (``recall``): by induction over the
    graph, the graph and the forward agree wherever they agree at the layers' inputs."""
    got = propagate_shapes(gm, copies(bound.positional), recall)
    want = [t for t in tree_flatten(expected)[0] if isinstance(t, Tensor)]
    have = [t for t in tree_flatten(got)[0] if isinstance(t, Tensor)]
    if len(want) != len(have):
        raise TraceError(f"the traced forward returns {len(have)} tensor(s) where the module "
                         f"returns {len(want)}")
    if any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True)
           for a, b in zip(want, have)):
        raise TraceError("the traced forward computes other values than the module on the "
                         "example input")
