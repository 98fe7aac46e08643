"""torch.export programs (.pt2) in and out, without running code from the file.

``torch.export.load`` unpickles archive entries marked ``use_pickle``, custom and opaque objects,
legacy ``.pt`` records and (after a failed weights-only load) the sample inputs; it loads
compiled AOTInductor libraries; and the graph may name any callable reachable from ``torch``
(``torch.os.system`` included), which runs when the program runs. Unless the user passes
``--trust-pickle``, a .pt2 is loaded only when:

1. every archive record is one of the plain kinds below (tensor bytes, JSON, version text),
   every weight and constant is stored as raw tensor bytes (``use_pickle`` false), and the
   sample inputs load with ``weights_only=True``;
2. nothing is unpickled while torch reads it (a guard refuses it, should torch add a path);
3. every op of the graph is an aten operator or a symbolic-shape helper.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import InputError, brief, one_line
from repconv.formats import limits
from repconv.formats.metadata import DEPLOY_MARKER, check_deploy_version, recorded_shape

_TRUST_HINT = "load it only if you trust the file, with --trust-pickle"
# Record names a plain exported program consists of, relative to the archive's root folder.
_PLAIN_RECORDS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|extra/[\w.\-]+)"
)
_CONFIGS = {"data/weights/model_weights_config.json": ("data/weights/", r"weight_\d+"),
            "data/constants/model_constants_config.json": ("data/constants/", r"tensor_\d+")}
_SYMBOLIC_HELPERS: set[Callable[..., Any]] = {
    operator.getitem, operator.eq, operator.ne, operator.le, operator.ge, operator.lt,
    operator.gt, operator.neg, operator.pos, operator.mul, operator.add, operator.sub,
    operator.floordiv, operator.mod, operator.pow, operator.truediv, operator.and_,
    operator.or_, math.trunc, torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite,
    torch.sym_max, torch.sym_min, torch.sym_sqrt,
}
_FORBIDDEN_ATEN = {"from_file"}  # reads a file named by the graph


RECORD = "repconv.json"  # extra/repconv.json: the deploy record, plain JSON
_RECORD_SEED = 0x5EED  # the batch-2 export example is seeded: same model, same bytes


@dataclass(frozen=True)
class Exported:
    data: bytes
    dynamic: list[list[int]]  # per input, the dimensions that may change size
    static_because: str = ""  # why the dynamic export failed, when it did

    def describe(self) -> str:
        if self.static_because:
            return (f"torch.export program with static shapes (a dynamic export failed: "
                    f"{self.static_because})")
        dims = set(self.dynamic[0]) if self.dynamic else set()
        batch = "dynamic batch" if 0 in dims else "static batch (the model fixes it)"
        spatial = [d for d in dims if d >= 2]
        rank = max((len(d) for d in self.dynamic), default=0)
        size = ("" if not self.dynamic or rank < 2 else
                ", dynamic spatial size" if spatial else
                ", static spatial size (the model fixes it: verify compares only the recorded "
                "size)")
        return f"torch.export program, {batch}{size}"


def _example_for_export(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Batch 1 would be specialized (torch.export fixes dimensions of size 0 and 1): export at
    batch 2, seeded."""
    generator = torch.Generator().manual_seed(_RECORD_SEED)
    return tuple(
        torch.randn((2, *x.shape[1:]), generator=generator, dtype=torch.float64).to(x.dtype)
        if x.is_floating_point() and x.ndim >= 1 and x.shape[0] == 1 else x
        for x in inputs
    )


def _dynamic_spec(inputs: tuple[Tensor, ...]) -> tuple[dict[int, Any] | None, ...]:
    """Batch and spatial dimensions of every floating input: dynamic where the model allows
    (``Dim.AUTO`` keeps a dimension static where the model's code fixes it)."""
    return tuple({d: torch.export.Dim.AUTO for d in (0, *range(2, x.ndim))}
                 if x.is_floating_point() and x.ndim >= 1 else None for x in inputs)


def _dynamic_dims(program: torch.export.ExportedProgram) -> list[list[int]]:
    user = set(program.graph_signature.user_inputs)
    return [[d for d, size in enumerate(node.meta["val"].shape) if isinstance(size, torch.SymInt)]
            for node in program.graph.nodes
            if node.op == "placeholder" and node.name in user and "val" in node.meta
            and isinstance(node.meta["val"], Tensor)]


def _export(model: nn.Module,
            inputs: tuple[Tensor, ...]) -> tuple[torch.export.ExportedProgram, str]:
    """The program, dynamic where the model allows; else static, with the reason."""
    logging.disable(logging.WARNING)  # torch logs each specialized dimension
    try:
        return torch.export.export(model, _example_for_export(inputs),
                                   dynamic_shapes=_dynamic_spec(inputs)), ""
    except Exception as exc:  # a model that exports only statically still exports
        return torch.export.export(model, inputs), one_line(exc)
    finally:
        logging.disable(logging.NOTSET)


def export_bytes(model: nn.Module, example_inputs: tuple[Tensor, ...],
                 record: dict[str, Any]) -> Exported:
    """The .pt2 bytes of ``model`` with ``record`` (plus the dynamic dimensions) as
    extra/repconv.json. Saved to memory, so no file name is recorded inside."""
    try:
        program, static_because = _export(model, example_inputs)
    except Exception as exc:  # export failures come from deep inside torch
        raise InputError(f"the fused model does not export with torch.export "
                         f"({one_line(exc)}); write .pt or .safetensors instead") from exc
    # stack traces name this machine's paths and per-process counters ("<eval_with_key>.64"):
    # without them the same model gives the same bytes
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    dynamic = _dynamic_dims(program)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={
        RECORD: json.dumps({**record, "dynamic_dims": dynamic}, sort_keys=True)})
    return Exported(buffer.getvalue(), dynamic, static_because)


@dataclass(frozen=True)
class Pt2Record:
    """What repconv recorded in a .pt2: the verification input shape and the dimensions the
    program accepts at any size."""

    input_shape: tuple[int, ...] | None
    dynamic: list[list[int]] | None


def read_record(path: Path) -> Pt2Record:
    """extra/repconv.json of ``path``, read as JSON and validated (absent: nothing known)."""
    limits.check_archive(path)
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.partition("/")[2] == f"extra/{RECORD}"),
                        None)
            text = archive.read(name) if name else None
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise InputError(f"{path} is not a readable torch.export program ({exc}); write it "
                         "again with repconv fuse") from exc
    if text is None:
        return Pt2Record(None, None)
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: extra/{RECORD} is not JSON; the file is damaged: write it "
                         "again with repconv fuse") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}: extra/{RECORD} is not a JSON object; the file is damaged")
    dynamic = record.get("dynamic_dims")
    if dynamic is not None and not (isinstance(dynamic, list) and all(
            isinstance(dims, list) and all(type(d) is int and 0 <= d < 8 for d in dims)
            for dims in dynamic)):
        raise InputError(f"{path} records dynamic_dims {brief(dynamic, 60)}, which is not a "
                         "list of dimension lists; the file is damaged")
    if DEPLOY_MARKER in record:
        check_deploy_version(record[DEPLOY_MARKER], str(path))
    return Pt2Record(recorded_shape(record.get("input_shape"), str(path)), dynamic)


def load_program(path: Path, *, trust_pickle: bool) -> nn.Module:
    """The module of the exported program in ``path``; see the module docstring for what is
    refused without ``trust_pickle``."""
    limits.check_archive(path)  # before any record is inflated
    if not trust_pickle:
        check_archive(path)
    logging.disable(logging.WARNING)  # torch logs a traceback of its own before raising
    try:
        with _no_unpickling(path, enabled=not trust_pickle):
            program = torch.export.load(path)
    except InputError:
        raise
    except Exception as exc:  # a damaged archive fails inside torch in many ways
        raise InputError(f"{path} is not a readable torch.export program "
                         f"({one_line(exc, 150)}); write it "
                         "again with repconv fuse") from exc
    finally:
        logging.disable(logging.NOTSET)
    if not trust_pickle:
        for module in program.graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                _check_graph(module.graph, path)
    return program.module()


def check_archive(path: Path) -> None:
    """Refuse an archive holding anything but raw tensors, JSON and version text."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = _relative_records(archive, path)
            for name in records:
                if not _PLAIN_RECORDS.fullmatch(name):
                    raise InputError(f"{path} holds {name!r}, which is not part of a plain "
                                     f"exported program (pickled data or compiled code); "
                                     f"{_TRUST_HINT}")
            for name, (folder, file_pattern) in _CONFIGS.items():
                if name not in records:
                    raise InputError(f"{path} has no {name}; it is not a torch.export program "
                                     "written by repconv fuse")
                _check_payload_config(records, name, folder, file_pattern, path)
            _check_sample_inputs(records.get("data/sample_inputs/model.pt"), path)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        raise InputError(f"{path} is not a readable torch.export program ({exc}); write it "
                         "again with repconv fuse") from exc


def _relative_records(archive: zipfile.ZipFile, path: Path) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    roots = set()
    for info in archive.infolist():
        root, _, name = info.filename.partition("/")
        roots.add(root)
        if name in records:
            raise InputError(f"{path} holds {name!r} twice; the archive is damaged")
        records[name] = archive.read(info) if name.endswith((".json", ".pt")) else b""
    if len(roots) != 1 or "models/model.json" not in records:
        raise InputError(f"{path} is not a torch.export program (no models/model.json in one "
                         "root folder); write it again with repconv fuse")
    return records


def _check_payload_config(records: dict[str, bytes], name: str, folder: str, file_pattern: str,
                          path: Path) -> None:
    try:
        entries = json.loads(records[name])["config"]
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {name} is not a payload config; the archive is "
                         "damaged") from exc
    if not isinstance(entries, dict):
        raise InputError(f"{path}: {name} is not a payload config; the archive is damaged")
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise InputError(f"{path} stores {str(fqn)[:80]!r} as a pickled object, which runs "
                             f"code when loaded; {_TRUST_HINT}")
        file = entry.get("path_name")
        if not isinstance(file, str) or not re.fullmatch(file_pattern, file):
            raise InputError(f"{path} stores {str(fqn)[:80]!r} in {str(file)[:40]!r}, which is "
                             f"not a raw tensor record; {_TRUST_HINT}")
        if folder + file not in records:
            raise InputError(f"{path} has no record {folder + file}; the archive is damaged")


def _check_sample_inputs(data: bytes | None, path: Path) -> None:
    """torch retries a failed weights-only load of the sample inputs with full unpickling."""
    if data is None:
        return
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # any failure here would make torch unpickle it for real
        raise InputError(f"{path} holds sample inputs that are not plain tensors; "
                         f"{_TRUST_HINT}") from exc


@contextmanager
def _no_unpickling(path: Path, *, enabled: bool) -> Iterator[None]:
    """While torch reads the archive, refuse every way it could unpickle. Replaces module
    attributes for the duration, so it is for the CLI's one thread, not for servers."""
    if not enabled:
        yield
        return

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise InputError(f"{path} asks to unpickle data while loading; {_TRUST_HINT}")

    weights_only_load = torch.load

    def load(*args: Any, weights_only: bool | None = True, **kwargs: Any) -> Any:
        if weights_only is False:
            refuse()
        return weights_only_load(*args, weights_only=True, **kwargs)

    saved = (torch.load, pickle.loads, torch._C._pickle_load_obj)
    torch.load, pickle.loads, torch._C._pickle_load_obj = load, refuse, refuse
    try:
        yield
    finally:
        torch.load, pickle.loads, torch._C._pickle_load_obj = saved


def _check_graph(graph: torch.fx.Graph, path: Path) -> None:
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        target = node.target
        allowed = node.op == "call_function" and (
            target in _SYMBOLIC_HELPERS
            or (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
                and target._schema.name.split("::")[-1] not in _FORBIDDEN_ATEN)
        )
        if not allowed:
            raise InputError(f"{path} runs {str(target)[:80]!r}, which is not an aten operator; "
                             f"{_TRUST_HINT}")
