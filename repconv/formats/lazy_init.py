"""Building a model whose every parameter a checkpoint will overwrite, without paying for its
random initialisation: for a 100M-parameter model nn.init's random fills take longer than
reading the checkpoint.

While the model is built, nn.init's random fills only record the tensor they were given. The
caller then loads the weights and asks whether any recorded tensor is still in the model (a
parameter the checkpoint does not hold, a buffer derived from one): if so it builds again the
ordinary way. Module attributes are replaced for the duration: this is for the CLI's one thread,
not for servers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_")


def _tensors(model: nn.Module) -> set[int]:
    return {id(t) for m in model.modules()
            for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values())
            if isinstance(t, Tensor)}


@contextmanager
def random_init_skipped(*, enabled: bool = True) -> Iterator[Callable[[nn.Module], bool]]:
    """Skip nn.init's random fills while the block runs (when ``enabled``). Yields a check:
    does a model still hold a tensor whose fill was skipped?"""
    skipped: list[weakref.ref[Tensor]] = []

    def left_unfilled(model: nn.Module) -> bool:
        held = _tensors(model)
        return any((t := ref()) is not None and id(t) in held for ref in skipped)

    def record(tensor: Tensor, *_args: Any, **_kwargs: Any) -> Tensor:
        skipped.append(weakref.ref(tensor))
        return tensor

    saved = {name: getattr(nn.init, name) for name in RANDOM_INITS}
    if enabled:
        for name in RANDOM_INITS:
            setattr(nn.init, name, record)
    try:
        yield left_unfilled
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
