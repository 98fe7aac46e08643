"""Objects ordinary training scripts save next to the weights, and hostile pickles that must
never run (each proves it ran by writing a marker file). Used by test_inert_unpickling.py, in
this process and in real ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import pickle
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CfgNode(dict):
    """A stand-in for yacs' CfgNode (RepVGG's training config): a dict subclass with
    attribute access and a frozen flag in its __dict__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__["_frozen"] = False

    def __getattr__(self, name: str) -> Any:
        return self[name]


@dataclasses.dataclass
class TrainOptions:
    lr: float = 0.1
    epochs: int = 120


class Phase(enum.Enum):
    TRAIN = 1
    EVAL = 2


def config_objects() -> dict[str, Any]:
    """One of each kind of object a training checkpoint holds beside its weights."""
    return {
        "config": CfgNode(MODEL=CfgNode(ARCH="RepVGG-A0"), TRAIN=CfgNode(EPOCHS=120)),
        "args": argparse.Namespace(arch="RepVGG-A0", lr=0.1),
        "options": TrainOptions(),
        "best_acc": np.float32(71.5),
        "histogram": np.arange(4),
        "phase": Phase.EVAL,
    }


class Reduces:
    """Pickles as ``function(*args)``: what a hostile file asks the unpickler to call."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


def _writes(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def torch_file_with_pickle(raw: bytes, path: Path) -> Path:
    """A torch.save zip archive whose pickle is ``raw``: a hand-written opcode stream."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(1)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for entry in source.infolist():
            data = raw if entry.filename.endswith("/data.pkl") else source.read(entry)
            target.writestr(entry, data)
    return path


def _saved(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints that run code (writing ``marker``) when unpickled by plain pickle."""
    command = f"touch {marker}"
    quoted = repr(command).encode()
    weights = {"conv.weight": torch.ones(2, 2, 1, 1)}
    return {
        "os.system": _saved(Reduces(__import__("os").system, command), folder / "system.pt"),
        "eval": _saved(Reduces(eval, _writes(marker)), folder / "eval.pt"),
        "exec in a dict": _saved({"state_dict": weights, "hook": Reduces(exec, _writes(marker))},
                                 folder / "exec.pt"),
        "subprocess": _saved(Reduces(subprocess.call, ["touch", str(marker)]),
                             folder / "subprocess.pt"),
        # getattr(__import__('os'), 'system')(command): a call on what a call returned
        "getattr chain": torch_file_with_pickle(
            b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(X\x02\x00\x00\x00ostR"
            b"X\x06\x00\x00\x00systemtR(" + b"V" + command.encode() + b"\ntR.",
            folder / "getattr.pt"),
        # torch's own rebuild function handed a class it names, to call with code
        "allow-listed call of a named class": torch_file_with_pickle(
            b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cbuiltins\nexec\nctorch\nTensor\n"
            b"(V" + _writes(marker).encode() + b"\ntq\x00}tR.", folder / "rebuild.pt"),
        "nested in config objects": _saved({
            "state_dict": weights,
            "args": argparse.Namespace(callback=Reduces(exec, _writes(marker))),
            "config": CfgNode(HOOKS=[Reduces(eval, _writes(marker)),
                                     {"deep": Reduces(__import__("os").system, command)}]),
        }, folder / "nested.pt"),
        "old protocol INST": torch_file_with_pickle(
            b"(S" + quoted + b"\nios\nsystem\n.", folder / "inst.pt"),
    }


# BUILD on a class object: plain pickle sets Counter.__repr__ for the whole process
PATCHES_A_CLASS = (b"\x80\x02ccollections\nCounter\n(N}X\x08\x00\x00\x00__repr__cbuiltins\n"
                   b"exec\nstb.")


def plain_pickle(path: Path) -> Any:
    """What an unguarded loader does with the file's pickle (the control)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        return pickle.loads(archive.read(name))
