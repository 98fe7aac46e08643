"""Runtime branches on a held argument: a module rewritten with a non-tensor argument held
fixed (a size flag: ``self.block(x, big=x.shape[-1] > 96)``) keeps the branch at run time.

A rewritten forward holds the arguments it was traced with: fx asserts ``big == False`` in it.
Where a module is called with other values at other input sizes, `dispatcher` puts in its place
a module that runs, on each call, the rewrite made for the values it is called with (a case per
value the fuse passes saw), and the module as it was for any other value (``fallback``). It is
a GraphModule under the module's class name, whose forward takes the module's arguments; it
pickles (as its graph: its code does not trace again) and runs with torch alone.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from repconv.rewrite.attributes import (
    RewrittenModule,
    carry_into_graph_module,
    preserved_state,
)

FALLBACK = "fallback"


def case_name(index: int) -> str:
    return f"case_{index}"


class CaseDispatch(RewrittenModule):
    """The dispatcher's class: its pickling (`_reduce_from_graph`) survives ``copy.deepcopy``
    as any `RewrittenModule`'s does."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce_from_graph(self)


def dispatcher(original: nn.Module, flags: Sequence[str],
               cases: Sequence[tuple[tuple[Any, ...], nn.Module]],
               fallback: nn.Module | None) -> fx.GraphModule:
    """``original``'s stand-in: for the values of arguments ``flags`` each case was made for,
    that case; for others ``fallback`` (None: the cases cover every value)."""
    holder = nn.Module()
    for index, (_, case) in enumerate(cases):
        holder.add_module(case_name(index), case)
    if fallback is not None:
        holder.add_module(FALLBACK, fallback)
    graph = fx.Graph()
    arguments = {}
    for parameter in inspect.signature(original.forward).parameters.values():
        default = (inspect.Signature.empty if parameter.default is inspect.Parameter.empty
                   else parameter.default)
        arguments[parameter.name] = graph.placeholder(parameter.name, default_value=default)
    key: Any = (arguments[flags[0]] if len(flags) == 1
                else tuple(arguments[flag] for flag in flags))
    table = {values[0] if len(flags) == 1 else values: graph.get_attr(case_name(index))
             for index, (values, _) in enumerate(cases)}
    chosen = (graph.call_method("get", (table, key, graph.get_attr(FALLBACK)))
              if fallback is not None else graph.call_function(operator.getitem, (table, key)))
    graph.output(graph.call_method("__call__", (chosen, *arguments.values())))
    module = CaseDispatch(holder, graph, class_name=type(original).__name__)
    carry_into_graph_module(original, module)
    module.train(original.training)
    return module


def _reduce_from_graph(gm: fx.GraphModule) -> tuple[Any, ...]:
    """A dispatcher pickles as its graph, not its code: torch's own rebuild traces the code
    again, and the case table indexed by an argument does not trace (``KeyError: Proxy``). The
    graph, detached from the module, pickles; torch alone builds the module from it again (as
    a plain GraphModule: pickled once more, that one fails to load, loudly)."""
    holder = nn.Module()
    for name, child in gm.named_children():
        holder.add_module(name, child)
    return (fx.GraphModule, (holder, copy.deepcopy(gm.graph), type(gm).__name__),
            {**preserved_state(gm), "training": gm.training})


def covers_every_value(values: Sequence[tuple[Any, ...]]) -> bool:
    """True where the cases' values are all the values the arguments can take: both of a bool
    (the one kind of flag whose values are all known)."""
    distinct = set(values)
    return bool(distinct) and all(isinstance(v, bool) for key in distinct for v in key) and (
        len(distinct) == 2 ** len(next(iter(distinct))))
