"""Reading training checkpoints in every layout repconv knows into an nn.Module.

Nothing in an input file runs code (`decode`): objects of classes outside torch's allow-list
come back as inert placeholders (`unpickle`), and the weights beside them are found as in any
state_dict. A pickled module is used as the architecture only with ``--trust-pickle``; with
``--model`` its weights alone are taken. A checkpoint may name its architecture
(``arch`` = "module:callable", ``arch_kwargs``), but repconv builds such a name by itself only
for its own sample architectures; any other architecture comes from ``--model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from repconv.errors import InputError
from repconv.formats.build import Architecture, build_and_load
from repconv.formats.decode import check_readable, read_data
from repconv.formats.mapped import FileStamp, mappable
from repconv.formats.metadata import recorded_kwargs, recorded_plan, recorded_shape
from repconv.formats.state_dict import STATE_DICT_KEYS, is_state_dict
from repconv.formats.tensors import check_module, check_statistics
from repconv.formats.unpickle import (
    Placeholder,
    is_pickled_module,
    module_state_dict,
    placeholders,
)
from repconv.formats.zip_record import RECORD_NAME, read_record
from repconv.samples import SAMPLES

MODULE_KEYS = ("ema", "model", "module", "net")


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model and what surrounds it. ``extra``: the other entries of a weights-only
    checkpoint; for a pickled module in a dict, the whole dict (in order) with the module under
    ``slot``, so a deploy file can keep that layout."""

    model: nn.Module
    architecture: Architecture | None
    input_shape: tuple[int, ...] | None
    pickled: bool
    found: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    deploy_plan: list[dict[str, Any]] | None = None
    slot: str | None = None
    stamp: FileStamp | None = None  # the file as it was before it was read
    mapped: bool = False  # its tensors are the file's pages (`formats.mapped`)


def _trusted_sample(reference: str) -> bool:
    return any(spec.builder == reference for spec in SAMPLES.values())


def _architecture_in(container: Mapping[str, Any], source: str) -> Architecture | None:
    kwargs = recorded_kwargs(container.get("arch_kwargs"), source)
    reference = container.get("arch")
    if not isinstance(reference, str) or ":" not in reference:
        return None
    return Architecture(reference, kwargs)


def _pickled_in_dict(
    container: dict[str, Any], path: Path, found: list[str]
) -> LoadedCheckpoint | None:
    """A pickled module under one of MODULE_KEYS ('ema' first: the weights to deploy)."""
    slot = next((k for k in MODULE_KEYS if isinstance(container.get(k), nn.Module)), None)
    if slot is None:
        return None
    model = container[slot]
    found.append(f"a pickled {type(model).__name__} under {slot!r}")
    check_module(model)
    shape = recorded_shape(container.get("input_shape"), str(path)) or _recorded_in_zip(path)
    return LoadedCheckpoint(model, None, shape, True, found, container, slot=slot)


def _recorded_in_zip(path: Path) -> tuple[int, ...] | None:
    """The input shape a pickled repconv deploy file records beside its pickle."""
    return recorded_shape(read_record(path).get("input_shape"), f"{path} ({RECORD_NAME})")


def _pickled_placeholder(
    container: Mapping[str, Any], path: Path, model_reference: str | None,
) -> tuple[str, dict[str, Any]] | None:
    """A pickled module the file holds at its top or under one of MODULE_KEYS, read without
    its classes: its weights (under the key it was found at) when --model builds the
    architecture; else the one-line refusal naming the classes involved."""
    key = next((k for k in (_TOP, *MODULE_KEYS) if is_pickled_module(container.get(k))), None)
    if key is None:
        return None
    module = container[key]
    where = "" if key == _TOP else f" under {key!r}"
    if model_reference:
        return key, module_state_dict(module)
    inner = sorted({type(p).qualified_name for _, p in placeholders(module)} -
                   {type(module).qualified_name})
    classes = (f" (built from {', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}; "
               f"{len(inner) + 1} classes)") if inner else ""
    raise InputError(f"{path} holds a pickled {type(module).qualified_name}{where}: using it "
                     "runs code from the file; pass --trust-pickle if you trust it, or --model "
                     f"to take only its weights{classes}")


def _describe_placeholders(container: Mapping[str, Any], found: list[str]) -> None:
    """Name the objects the file holds that were read as inert placeholders."""
    named = [f"{type(p).qualified_name} at {path}" for path, p in placeholders(container)
             if path.count("[") == 1 and "." not in path and not is_pickled_module(p)]
    if named:
        listed = ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")
        found.append(f"{len(named)} object(s) of classes repconv does not load, kept as inert "
                     f"data: {listed}")


_TOP = "<the file>"


def load_checkpoint(
    path: Path,
    *,
    model_reference: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load a training (or deploy) checkpoint in any layout repconv knows into an nn.Module. A
    torch archive is read mapped (`formats.mapped`); the file's stamp is taken first."""
    path = Path(path)
    check_readable(path)
    stamp, mapped = FileStamp.of(path), mappable(path)
    obj = read_data(path, trust_pickle=trust_pickle, mapped=mapped)
    loaded = _checkpoint_of(obj, path, model_reference, model_kwargs)
    loaded.stamp, loaded.mapped = stamp, mapped
    return loaded


def _checkpoint_of(obj: Any, path: Path, model_reference: str | None,
                   model_kwargs: Mapping[str, Any] | None) -> LoadedCheckpoint:
    found: list[str] = []
    if isinstance(obj, nn.Module):
        found.append(f"a pickled {type(obj).__name__}")
        check_module(obj)
        return LoadedCheckpoint(obj, None, _recorded_in_zip(path), pickled=True, found=found)
    if isinstance(obj, Placeholder) and is_pickled_module(obj):
        obj = {_TOP: obj}
    if not isinstance(obj, Mapping):
        kind = (f"{type(obj).qualified_name} (read as inert data)"
                if isinstance(obj, Placeholder) else type(obj).__name__)
        raise InputError(f"{path} holds a {kind}, not a model or state_dict")
    container: dict[str, Any] = dict(obj)
    if "safetensors_metadata" in container:
        metadata = container.pop("safetensors_metadata")
        container.update(metadata)
        found.append("a safetensors state_dict")
    pickled = _pickled_in_dict(container, path, found)
    if pickled is not None:
        return pickled
    _describe_placeholders(container, found)
    if is_state_dict(container):
        weights, key = container, None
        found.append("a bare state_dict")
    else:
        key = next((k for k in STATE_DICT_KEYS if is_state_dict(container.get(k))), None)
        module_weights = None if key else _pickled_placeholder(container, path, model_reference)
        if module_weights is not None:
            key, container[key] = module_weights
            where = "" if key == _TOP else f" under {key!r}"
            found.append(f"the weights of the pickled module{where} (its classes not loaded)")
        if key is None:
            keys = ", ".join(map(str, list(container)[:6]))
            raise InputError(f"{path} holds a dict with no model weights (keys: {keys}); "
                             "expected a state_dict or one under 'state_dict'/'model'")
        weights = container[key]
        if "safetensors_metadata" not in obj and module_weights is None:
            found.append(f"state_dict under {key!r}")
    input_shape = recorded_shape(container.get("input_shape"), str(path))
    deploy_plan = recorded_plan(container, path)
    architecture = _architecture_in(container, str(path))
    if model_reference:
        architecture = Architecture(model_reference, dict(model_kwargs or {}))
    elif architecture is None:
        raise InputError(f"{path} holds only weights; pass --model package.module:callable "
                         "(and --model-kwargs) to build the architecture")
    elif not _trusted_sample(architecture.reference):
        raise InputError(f"{path} names its architecture {architecture.reference!r}; repconv "
                         "builds only its own sample architectures by itself: pass --model "
                         f"{architecture.reference} (and --model-kwargs) if you trust that code")
    model = build_and_load(architecture, weights, deploy_plan, found)
    if deploy_plan is not None:
        found.append(f"a repconv deploy file ({len(deploy_plan)} recorded rewrites)")
    check_statistics(model)
    extra = {k: v for k, v in container.items() if k != key and not is_state_dict(v)}
    return LoadedCheckpoint(model.eval(), architecture, input_shape, False, found, extra,
                            deploy_plan)
