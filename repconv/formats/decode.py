"""Decoding a file into Python objects without running code from it: ``torch.load`` with
``weights_only=True``; where the file holds other objects, the same with every object outside
torch's allow-list as an inert placeholder (`unpickle`); the real objects only with
``trust_pickle``, and only when a pickled module is there to use. Safetensors as tensors and
metadata. Which decoder runs is the file's `FileKind`."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from repconv.errors import InputError, one_line
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.limits import check_archive, check_tensor_bytes
from repconv.formats.metadata import check_nesting
from repconv.formats.unpickle import is_pickled_module, placeholders, read_inert


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


def read_file(path: Path, *, trust_pickle: bool, mapped: bool = False) -> Any:
    """The object stored in a .pt/.pth/.safetensors file, loaded without running its code
    unless ``trust_pickle``; ``mapped``: its tensors on the file's pages (`formats.mapped`)."""
    check_readable(path)
    kind = kind_of(path)
    if kind in (FileKind.PT2, FileKind.ONNX):
        raise InputError(f"{path} is a {kind.value}, not a checkpoint repconv "
                         "can read as a training model; give the training checkpoint (.pt, .pth "
                         "or .safetensors)")
    if kind is FileKind.SAFETENSORS:
        tensors, metadata = _read_safetensors(path)
        return {"state_dict": tensors, "safetensors_metadata": metadata}
    try:
        # torch warns about pickle protocols it may not read; the error below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the class it refused (or the module it blocks);
        # anything else is not a pickle.
        if not any(s in str(exc) for s in ("Unsupported global", "Unsupported class",
                                            "unsupported GLOBAL")):
            raise InputError(f"{path} is not a PyTorch checkpoint (unpickling failed: "
                             f"{_unpickler_reason(exc)[:120]}); give the file torch.save or "
                             "safetensors wrote") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        # the first sentence: torch's zip reader goes on about miniz internals
        detail = one_line(exc, 120).split(". ")[0]
        raise InputError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: "
                         f"{detail}); a truncated or damaged file must be written again") from exc
    inert = _read_inert(path, trust_pickle)
    if inert is not _UNREADABLE and (
            not trust_pickle or not any(is_pickled_module(p) for _, p in placeholders(inert))):
        return inert  # a pickled module in it is refused, by name, where it would be used
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mapped)
    except Exception as exc:  # unpickling trusted user code can fail in any way
        raise InputError(f"{path} could not be unpickled: {type(exc).__name__}: {exc}; the "
                         "classes it names must be importable here") from exc


_UNREADABLE = object()


def _read_inert(path: Path, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return read_inert(path)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            return _UNREADABLE  # read as the user trusts it
        raise InputError(f"{path} holds pickled Python objects that repconv cannot read "
                         f"without running code from the file ({one_line(exc, 200)}); if you "
                         "trust the file, pass --trust-pickle") from exc
    except Exception as exc:  # a malformed pickle fails inside torch or pickle in many ways
        raise InputError(f"{path} is not a PyTorch checkpoint (unpickling failed: "
                         f"{type(exc).__name__}: {one_line(exc, 120)}); give the file "
                         "torch.save or safetensors wrote") from exc


def _unpickler_reason(exc: BaseException) -> str:
    """The weights-only unpickler's own complaint ("Unsupported operand 103"), without the
    advice around it (to load with weights_only=False, which repconv never does untrusted)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[index + 1]
    return lines[-1] if lines else type(exc).__name__


def read_data(path: Path, *, trust_pickle: bool, mapped: bool = False) -> Any:
    """`read_file`, bounded (`limits`): an archive inflating far beyond its size is refused
    before it is read; what it holds may not nest too deep, nor its tensors repeat memory."""
    check_archive(path)
    value = read_file(path, trust_pickle=trust_pickle, mapped=mapped)
    check_nesting(value, str(path))
    check_tensor_bytes(value, path)
    return value
