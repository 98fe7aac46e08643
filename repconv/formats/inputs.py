"""``--inputs FILE``: real sample data to verify on, read as data (docs/design.md "7. Trust").

A ``.pt``/``.pth`` file is loaded with ``weights_only=True``; a ``.safetensors`` file holds
named tensors. Either holds one tensor (one input, batch first), a tuple or list of tensors
(the model's positional inputs), or a dict with exactly one tensor. Every tensor must be a dense
floating-point tensor of a usable shape with finite values.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from repconv.errors import InputError, one_line
from repconv.formats.decode import check_readable
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.limits import check_archive, check_tensor_bytes
from repconv.formats.metadata import check_nesting, shape_problem

KINDS = (FileKind.TORCH, FileKind.SAFETENSORS)


def _read(path: Path) -> Any:
    if kind_of(path) is FileKind.SAFETENSORS:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"--inputs {path} is not a readable safetensors file "
                             f"({str(exc)[:120]})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as exc:
        raise InputError(f"--inputs {path} is not a tensor file torch loads weights-only "
                         f"({one_line(exc, 120, last=True)}); save the tensors with torch.save"
                         ) from exc


def _as_tuple(value: Any, path: Path) -> tuple[Any, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value:
        return tuple(value)
    if isinstance(value, Mapping) and len(value) == 1:
        return tuple(value.values())
    what = (f"a dict with {len(value)} entries ({', '.join(map(str, list(value)[:4]))})"
            if isinstance(value, Mapping) else f"a {type(value).__name__}"
            if not isinstance(value, (tuple, list)) else "an empty sequence")
    raise InputError(f"--inputs {path} holds {what}; save a tensor, a tuple of tensors (one per "
                     "model input) or a dict with one tensor")


def _check(tensor: Any, name: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise InputError(f"{name} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
        raise InputError(f"{name} is not a dense tensor with values ({tensor.layout}, meta: "
                         f"{tensor.is_meta}); save a plain tensor")
    if not tensor.is_floating_point():
        raise InputError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                         "verification inputs must be floating point (convert with .float())")
    problem = shape_problem(list(tensor.shape))
    if problem is not None:
        raise InputError(f"{name} has shape {list(tensor.shape)}, which is not a usable input "
                         f"shape ({problem})")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{name} holds NaN or Inf values; give finite sample data")
    return tensor


def load_inputs(path: Path) -> tuple[Tensor, ...]:
    """The model inputs stored in ``path``, validated."""
    if kind_of(path) not in KINDS:
        raise InputError(f"--inputs {path} must end in .pt, .pth or .safetensors")
    check_readable(path)
    check_archive(path, "--inputs ")
    value = _read(path)
    check_nesting(value, f"--inputs {path}")
    check_tensor_bytes(value, path, "--inputs ")
    values = _as_tuple(value, path)
    return tuple(_check(value, f"--inputs {path} entry {i}" if len(values) > 1 else
                        f"--inputs {path}") for i, value in enumerate(values))
