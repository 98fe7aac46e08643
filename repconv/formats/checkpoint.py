"""Reading training checkpoints and repconv deploy files (writing them: ``output.py``).

Nothing in an input file runs code: ``torch.load(weights_only=True)`` always, and a pickled
module is loaded only when the caller passes ``trust_pickle=True``. A checkpoint may name its
architecture (``arch`` = "module:callable", ``arch_kwargs``), but repconv imports such a name by
itself only inside its own package; any other architecture comes from ``--model``.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor, nn

from repconv.errors import InputError, ModelBuildError
from repconv.formats.lazy_init import random_init_skipped
from repconv.formats.metadata import (
    DEPLOY_MARKER,
    check_deploy_version,
    recorded_kwargs,
    recorded_shape,
)
from repconv.rewrite.surgery import replay_plan
from repconv.samples import SAMPLES

# Where training scripts keep the weights, in the order repconv looks.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
MODULE_KEYS = ("ema", "model", "module", "net")
PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass(frozen=True)
class Architecture:
    """How to build the model: ``reference`` is "module:callable", called with ``kwargs``."""

    reference: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.reference, self.kwargs)


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


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let --model name a module in the directory the user runs repconv from."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def build_model(reference: str, kwargs: Mapping[str, Any]) -> nn.Module:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ModelBuildError(f"--model {reference!r} must look like package.module:callable")
    try:
        with _cwd_on_path():
            target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the user's module: report any failure
        raise ModelBuildError(f"cannot import {module_name!r} for --model: "
                              f"{type(exc).__name__}: {exc}; check the module path") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelBuildError(f"{module_name!r} has no attribute {part!r} (from --model "
                                  f"{reference!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelBuildError(f"--model {reference!r} is not callable")
    try:
        model = target(**kwargs)
    except Exception as exc:  # the user's constructor failed
        raise ModelBuildError(f"{reference}(**{dict(kwargs)}) failed: {type(exc).__name__}: "
                              f"{exc}; check --model-kwargs") from exc
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"{reference} returned {type(model).__name__}, not a torch "
                              "nn.Module")
    return model


def check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes); the file was not written completely")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from exc


def read_file(path: Path, *, trust_pickle: bool) -> Any:
    """The object stored in a .pt/.pth/.safetensors file, loaded without running its code
    unless ``trust_pickle``."""
    check_readable(path)
    if path.suffix == ".pt2":
        raise InputError(f"{path} is a torch.export program (.pt2), not a checkpoint repconv "
                         "can read as a training model; give the training checkpoint (.pt, .pth "
                         "or .safetensors)")
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return {"state_dict": tensors, "safetensors_metadata": metadata}
    try:
        # torch warns about pickle protocols it may not read; the error below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the class it refused; anything else is not a pickle.
        if "Unsupported global" not in str(exc) and "Unsupported class" not in str(exc):
            raise InputError(f"{path} is not a PyTorch checkpoint (unpickling failed: "
                             f"{_unpickler_reason(exc)[:120]}); give the file torch.save or "
                             "safetensors wrote") from exc
        if not trust_pickle:
            raise InputError(
                f"{path} holds pickled Python objects (such as a whole nn.Module); loading it "
                "runs code from the file. If you trust the file, pass --trust-pickle"
            ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        # the first sentence: torch's zip reader goes on about miniz internals
        detail = str(exc).splitlines()[0].split(". ")[0][:120] if str(exc) else "unreadable"
        raise InputError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: "
                         f"{detail}); a truncated or damaged file must be written again") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling trusted user code can fail in any way
        raise InputError(f"{path} could not be unpickled: {type(exc).__name__}: {exc}; the "
                         "classes it names must be importable here") from exc


def _unpickler_reason(exc: BaseException) -> str:
    """The weights-only unpickler's own complaint ("Unsupported operand 103"), without the
    advice around it (to load with weights_only=False, which repconv never does untrusted)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[index + 1]
    return lines[-1] if lines else type(exc).__name__


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _fit_keys(
    weights: Mapping[str, Tensor], expected: set[str], found: list[str]
) -> dict[str, Tensor]:
    """Strip DataParallel/Lightning/compile prefixes while that makes the keys fit better."""
    weights = dict(weights)
    for _ in range(3):
        if set(weights) <= expected:
            break
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in weights):
                weights = {key[len(prefix):]: value for key, value in weights.items()}
                found.append(f"stripped key prefix {prefix!r}")
                break
        else:
            break
    return weights


def _load_weights(model: nn.Module, weights: Mapping[str, Tensor], found: list[str]) -> None:
    own = model.state_dict()
    weights = _fit_keys(weights, set(own), found)
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        def listing(keys: list[str]) -> str:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            return f"{len(keys)} ({shown})" if keys else "0"

        raise ModelBuildError(
            f"checkpoint does not fit the model: missing keys {listing(missing)}, unexpected "
            f"keys {listing(unexpected)}; check --model and --model-kwargs"
        )
    check_tensors(weights, own)
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if wrong:
        raise ModelBuildError(f"checkpoint shapes do not fit the model: {len(wrong)} tensors "
                              f"differ ({'; '.join(wrong[:3])}); check --model-kwargs")
    model.load_state_dict({**own, **weights}, strict=True, assign=True)


def _check_data(name: str, tensor: Tensor) -> None:
    if tensor.is_meta:
        raise InputError(f"tensor {name} is a meta tensor, which holds no values; the "
                         "checkpoint was saved without its weights")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise InputError(f"tensor {name} is not a dense tensor ({tensor.layout}, quantized: "
                         f"{tensor.is_quantized}); repconv reads dense weights only")


def _check_float(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise InputError(f"tensor {name} has dtype {tensor.dtype} where the model needs "
                         "floating-point values; the checkpoint is damaged")


def check_tensors(weights: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> None:
    """Weights hold data in a dense layout, and every floating-point slot of the model gets a
    floating-point tensor (an int64 or bool weight would fail deep inside torch)."""
    for name, tensor in weights.items():
        _check_data(name, tensor)
        if own[name].is_floating_point():
            _check_float(name, tensor)


def check_module(model: nn.Module) -> None:
    """The tensors of a pickled module, checked like loaded weights."""
    for name, tensor in model.named_buffers():
        _check_data(name, tensor)
    for name, tensor in model.named_parameters():
        _check_data(name, tensor)
        _check_float(name, tensor)
    check_statistics(model)


def check_statistics(model: nn.Module) -> None:
    """BN statistics that are NaN/Inf or negative make the fold meaningless: stop early."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        mean, var = module.running_mean, module.running_var
        if mean is None or var is None:
            continue
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise InputError(f"BatchNorm {name} has NaN or Inf running statistics; the "
                             "checkpoint is damaged (use an earlier epoch)")
        if (var < 0).any():
            raise InputError(f"BatchNorm {name} has negative running_var; the checkpoint is "
                             "damaged (use an earlier epoch)")


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
    shape = recorded_shape(container.get("input_shape"), str(path))
    return LoadedCheckpoint(model, None, shape, True, found, container, slot=slot)


def load_checkpoint(
    path: Path,
    *,
    model_reference: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load a training (or deploy) checkpoint in any layout repconv knows into an nn.Module."""
    path = Path(path)
    obj = read_file(path, trust_pickle=trust_pickle)
    found: list[str] = []
    if isinstance(obj, nn.Module):
        found.append(f"a pickled {type(obj).__name__}")
        check_module(obj)
        return LoadedCheckpoint(obj, None, None, pickled=True, found=found)
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a model or state_dict")
    container: dict[str, Any] = dict(obj)
    if "safetensors_metadata" in container:
        metadata = container.pop("safetensors_metadata")
        container.update(metadata)
        found.append("a safetensors state_dict")
    pickled = _pickled_in_dict(container, path, found)
    if pickled is not None:
        return pickled
    if _is_state_dict(container):
        weights, key = container, None
        found.append("a bare state_dict")
    else:
        key = next((k for k in STATE_DICT_KEYS if _is_state_dict(container.get(k))), None)
        if key is None:
            keys = ", ".join(map(str, list(container)[:6]))
            raise InputError(f"{path} holds a dict with no model weights (keys: {keys}); "
                             "expected a state_dict or one under 'state_dict'/'model'")
        weights = container[key]
        if "safetensors_metadata" not in obj:
            found.append(f"state_dict under {key!r}")
    input_shape = recorded_shape(container.get("input_shape"), str(path))
    deploy_plan = _deploy_plan(container, path)
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
    model = _build_and_load(architecture, weights, deploy_plan, found)
    if deploy_plan is not None:
        found.append(f"a repconv deploy file ({len(deploy_plan)} recorded rewrites)")
    check_statistics(model)
    extra = {k: v for k, v in container.items() if k != key and not _is_state_dict(v)}
    return LoadedCheckpoint(model.eval(), architecture, input_shape, False, found, extra,
                            deploy_plan)


def _build_and_load(architecture: Architecture, weights: Mapping[str, Tensor],
                    deploy_plan: list[dict[str, Any]] | None, found: list[str]) -> nn.Module:
    """The model with the checkpoint's weights, built without nn.init's random fills (the
    weights overwrite them); built again the ordinary way should a tensor they were to fill be
    left in the model, so the result is always what a plain build and load gives."""
    for skip in (True, False):
        with random_init_skipped(enabled=skip) as left_unfilled:
            model = architecture.build()
        if deploy_plan is not None:
            model = replay_plan(model, deploy_plan, dict(weights))
        _load_weights(model, weights, found if skip else [])
        if not left_unfilled(model):
            break
    return model


def _deploy_plan(container: Mapping[str, Any], path: Path) -> list[dict[str, Any]] | None:
    """The recorded rewrite plan of a deploy file (None for a training checkpoint). Its
    entries are validated where they are replayed."""
    if DEPLOY_MARKER not in container:
        return None
    check_deploy_version(container[DEPLOY_MARKER], str(path))
    plan = container.get("plan")
    if isinstance(plan, str):
        try:
            plan = json.loads(plan)
        except json.JSONDecodeError:
            plan = None
    if not isinstance(plan, list):
        raise InputError(f"{path} has no readable rewrite plan; the deploy file is damaged: "
                         "write it again with repconv fuse")
    return plan


def load_deploy(model: nn.Module, path: Path | str) -> nn.Module:
    """A freshly built training ``model`` turned into the fused model stored in ``path``
    (.pt or .safetensors written by repconv), rebuilding exactly the recorded structure."""
    return load_deploy_with_shape(model, path)[0]


def load_deploy_with_shape(
    model: nn.Module, path: Path | str
) -> tuple[nn.Module, tuple[int, ...] | None]:
    """`load_deploy`, plus the verification input shape the file records."""
    path = Path(path)
    container = read_file(path, trust_pickle=False)
    if not isinstance(container, Mapping):
        raise InputError(f"{path} is not a repconv deploy file")
    container = dict(container)
    container.update(container.pop("safetensors_metadata", {}))
    plan = _deploy_plan(container, path)
    if plan is None:
        raise InputError(f"{path} is not a repconv deploy file (no {DEPLOY_MARKER!r} entry)")
    if not _is_state_dict(container.get("state_dict")):
        raise InputError(f"{path} has no fused weights under 'state_dict'; the deploy file is "
                         "damaged: write it again with repconv fuse")
    input_shape = recorded_shape(container.get("input_shape"), str(path))
    recorded_kwargs(container.get("arch_kwargs"), str(path))
    fused = replay_plan(model, plan, container["state_dict"])
    _load_weights(fused, container["state_dict"], [])
    return fused.eval(), input_shape
