"""Loading a repconv deploy file (.pt or .safetensors) onto a freshly built training model:
the recorded plan is replayed (never re-derived), then the fused weights are loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from repconv.errors import InputError
from repconv.formats.decode import read_data
from repconv.formats.metadata import DEPLOY_MARKER, recorded_kwargs, recorded_plan, recorded_shape
from repconv.formats.state_dict import is_state_dict, load_weights
from repconv.rewrite.surgery import replay_plan


def load_deploy(model: nn.Module, path: Path | str) -> nn.Module:
    """A freshly built training ``model`` turned into the fused model stored in ``path``
    (.pt or .safetensors written by repconv), rebuilding exactly the recorded structure."""
    return load_deploy_with_shape(model, path)[0]


def load_deploy_with_shape(
    model: nn.Module, path: Path | str
) -> tuple[nn.Module, tuple[int, ...] | None]:
    """`load_deploy`, plus the verification input shape the file records."""
    path = Path(path)
    container = read_data(path, trust_pickle=False)
    if not isinstance(container, Mapping):
        raise InputError(f"{path} is not a repconv deploy file")
    container = dict(container)
    container.update(container.pop("safetensors_metadata", {}))
    plan = recorded_plan(container, path)
    if plan is None:
        raise InputError(f"{path} is not a repconv deploy file (no {DEPLOY_MARKER!r} entry)")
    if not is_state_dict(container.get("state_dict")):
        raise InputError(f"{path} has no fused weights under 'state_dict'; the deploy file is "
                         "damaged: write it again with repconv fuse")
    input_shape = recorded_shape(container.get("input_shape"), str(path))
    recorded_kwargs(container.get("arch_kwargs"), str(path))
    fused = replay_plan(model, plan, container["state_dict"])
    load_weights(fused, container["state_dict"], [])
    return fused.eval(), input_shape
