"""ONNX out and ONNX Runtime in: the fused model as an ``.onnx`` file, and that file as a module.

The file comes from torch's own exporter (``torch.onnx.export(..., dynamo=True)``, which runs
``torch.export`` and translates the program with onnxscript) applied to the FUSED model, so it
holds single convs where the training model had branches: runtimes fold BatchNorm into a conv
themselves, but none of them merges parallel branches. Dimension 0 of every input is one
dynamic ``batch`` dimension. Weights keep the model's dtype (an fp16 model gives an fp16 file,
which ONNX Runtime runs on CPU; bfloat16 convs it does not run).

The output structure (tuples, dicts, nesting) is stored in the file's metadata as a pytree spec,
so :class:`OnnxModule` returns what the PyTorch model returned and ``repconv.verify`` compares
it leaf by leaf like any other deploy format.

onnx, onnxscript and onnxruntime are the optional extra ``repconv[onnx]``; every entry point
says so in one line when they are missing.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import (
    TreeSpec,
    tree_flatten,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)

from repconv.errors import InputError, TraceError, one_line
from repconv.fold.calls import eval_mode
from repconv.formats.decode import check_readable
from repconv.formats.write import write_atomically

DEFAULT_OPSET = 18
# torch's exporter writes opset 18 and newer; its conversion to older opsets fails for typical
# conv nets (global average pooling's ReduceMean) and silently keeps 18
MIN_OPSET = 18
OUTPUT_TREE_KEY = "repconv.output_tree"
EXTRA_HINT = "pip install 'repconv[onnx]'"
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one message
# Where the exporter names the op it has no ONNX translation for.
_UNSUPPORTED_OP = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+?)\.\w+\]"),
)


def require_extra(module_name: str) -> ModuleType:
    """Import one of the ``repconv[onnx]`` packages, or say in one line how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"ONNX support needs the {module_name} package, which is not "
                         f"installed: {EXTRA_HINT}") from exc


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs, warns and prints (from Python and C++) on every call, up to 150 lines
    for a model it fails on; none of it reaches stderr unless torch's own TORCH_LOGS asks for
    logs. Failures are reported by the one error line, which carries their cause."""
    if os.environ.get("TORCH_LOGS"):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        logging.disable(previous)


def _onnx_exporting_flag(value: bool) -> bool:
    """Set what ``torch.onnx.is_in_onnx_export()`` answers; returns what it answered."""
    from torch.onnx._internal.exporter import _flags

    previous = _flags._is_onnx_exporting
    _flags._is_onnx_exporting = value
    return previous


class AsExported(nn.Module):
    """``model`` run as it runs while torch exports it (``torch.onnx.is_in_onnx_export()`` is
    True): a forward that returns another structure for export is compared as exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        previous = _onnx_exporting_flag(True)
        try:
            return self.model(*args, **kwargs)
        finally:
            _onnx_exporting_flag(previous)


def _unsupported_op(message: str) -> str | None:
    for pattern in _UNSUPPORTED_OP:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def _messages(exc: BaseException) -> list[str]:
    messages = [str(exc)]
    cause = exc.__cause__
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__
    return messages


_CONSTRAINT = re.compile(r"Constraints violated \([^)]*\)!")
_SUGGESTED = re.compile(r"Suggested fixes:\s*(.+)")


def _export_cause(exc: Exception) -> str:
    """The line that says why an export failed: torch.export's violated constraint and its
    suggested fix where there is one, else the first line of the deepest message."""
    text = "\n".join(_messages(exc))
    violated, fix = _CONSTRAINT.search(text), _SUGGESTED.search(text)
    if violated:
        found = violated.group(0) + (f" ... Suggested fixes: {fix.group(1).strip()}" if fix
                                     else "")
        return found[:240]
    lines = [line.strip() for m in reversed(_messages(exc)) for line in m.splitlines()
             if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _export_failure(exc: Exception) -> InputError:
    # the exporter's message spans many lines, its cause's message names the failing op
    messages = _messages(exc)
    op = next((found for m in messages if (found := _unsupported_op(m))), None)
    if op is not None:
        return InputError(f"the model does not export to ONNX: the exporter has no ONNX "
                          f"translation for op {op}; replace that op or write .pt, .safetensors "
                          "or .pt2 instead")
    return InputError(f"the model does not export to ONNX ({_export_cause(exc)}); write .pt, "
                      ".safetensors or .pt2 instead")


def _output_tree(model: nn.Module, inputs: tuple[Tensor, ...]) -> TreeSpec:
    try:
        with torch.no_grad():
            leaves, spec = tree_flatten(model(*inputs))
    except Exception as exc:  # the model's own code failing on the example input
        raise TraceError(f"the model fails on inputs of shape {[list(x.shape) for x in inputs]}: "
                         f"{exc}"[:300]) from exc
    odd = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, Tensor)]
    if odd:
        raise InputError(f"the model returns {', '.join(odd)} besides tensors; an ONNX graph "
                         "returns tensors only, so write .pt, .safetensors or .pt2 instead")
    return spec


def _check_opset(opset: int, highest: int) -> None:
    if not MIN_OPSET <= opset <= highest:
        raise InputError(f"--opset {opset} is out of range: torch's exporter writes opsets "
                         f"{MIN_OPSET} to {highest}")


def check_opset(opset: int) -> None:
    """Refuse an opset torch's exporter cannot write (needs the onnx package)."""
    _check_opset(opset, highest=require_extra("onnx").defs.onnx_opset_version())


@dataclass(frozen=True)
class OnnxExport:
    """An exported ``.onnx`` file's bytes, and how its batch dimension came out."""

    data: bytes
    dynamic_batch: bool
    fallback: str | None = None  # why the strict dynamic batch was not what exported

    def describe(self, opset: int) -> str:
        batch = "a dynamic batch dimension" if self.dynamic_batch else "a static batch size"
        how = f" ({self.fallback})" if self.fallback else ""
        return f"ONNX opset {opset} with {batch}{how}"


# The batch dimension asked of the exporter, in order: a strict dynamic one, one torch.export
# may bound or specialize (Dim.AUTO), none. The first that exports is kept.
_BATCH_DIMS = (("dynamic", lambda: torch.export.Dim("batch")),
               ("Dim.AUTO", lambda: torch.export.Dim.AUTO),
               ("static", lambda: None))


def _batch_is_dynamic(proto: Any, inputs: tuple[Tensor, ...]) -> bool:
    dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    return all(bool(d[0].dim_param) for d, x in zip(dims, inputs) if x.ndim and len(d))


def export_program(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> OnnxExport:
    """The ``.onnx`` bytes of ``model`` (run in eval mode) with a dynamic batch dimension where
    it exports with one (else Dim.AUTO's, else a static batch: `OnnxExport` says which, and
    why), and ``metadata`` in the file's metadata_props beside the output structure, as the
    model returns it while being exported (``torch.onnx.is_in_onnx_export()``).

    Made in memory, so the caller can verify them (``OnnxModule(data)``) before writing; the
    same model gives the same bytes."""
    onnx = require_extra("onnx")
    require_extra("onnxscript")  # the exporter's translation library
    _check_opset(opset, highest=onnx.defs.onnx_opset_version())
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    failures: list[Exception] = []
    with eval_mode(model), _quiet_exporter():
        spec = _output_tree(AsExported(model), inputs)
        for _mode, make_dim in _BATCH_DIMS:
            dim = make_dim()
            dynamic_shapes = (None if dim is None
                              else tuple({0: dim} if x.ndim else None for x in inputs))
            try:
                program = torch.onnx.export(model, inputs, None, dynamo=True, verbose=False,
                                            dynamic_shapes=dynamic_shapes, opset_version=opset)
                break
            except Exception as exc:  # export failures come from anywhere inside torch
                failures.append(exc)
        else:
            raise _export_failure(failures[-1]) from failures[-1]
    proto = program.model_proto
    dynamic = _batch_is_dynamic(proto, inputs)
    fallback = None
    if failures:
        fallback = (f"exported with {_BATCH_DIMS[len(failures)][0]} after the dynamic batch "
                    f"failed: {_export_cause(failures[0])}")
    elif not dynamic:
        fallback = "the exporter fixed it: the model's code specializes on the batch size"
    written = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if written != opset:
        raise InputError(f"the exporter wrote opset {written}, not the requested {opset}; pass "
                         f"--opset {written}")
    for node in proto.graph.node:  # stack traces name this machine's paths
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.helper.set_model_props(proto, {**(metadata or {}),
                                        OUTPUT_TREE_KEY: treespec_dumps(spec)})
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise InputError("the model's weights exceed the 2 GB limit of one .onnx file; write "
                         ".pt, .safetensors or .pt2 instead")
    return OnnxExport(proto.SerializeToString(), dynamic, fallback)


def onnx_bytes(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """`export_program`'s bytes."""
    return export_program(model, example_inputs, opset=opset, metadata=metadata).data


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    path: Path | str,
    *,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Write ``model`` as ONNX to ``path`` atomically (`write_atomically`)."""
    write_atomically(Path(path), onnx_bytes(model, example_inputs, opset=opset))


def load_onnx_session(source: Path | str | bytes, *, threads: int | None = None,
                      spin_wait: bool = True) -> Any:
    """An ONNX Runtime CPU session for a ``.onnx`` file (or its bytes). ``spin_wait=False``
    stops its idle threads from spinning after each run: needed when timing it interleaved with
    other models, whose runs the spinning threads would slow down."""
    ort = require_extra("onnxruntime")
    name = "the ONNX bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        check_readable(Path(source))
        source = str(source)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: the exception carries the message it shows
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for every bad file
        raise InputError(f"{name} is not an ONNX model ONNX Runtime can load "
                         f"({one_line(exc)})") from exc


# ONNX Runtime's names of the floating input types, and the torch dtype a tensor is fed as
_FLOAT_INPUTS = {"tensor(float16)": torch.float16, "tensor(float)": torch.float32,
                 "tensor(double)": torch.float64}


def _numpy(x: Tensor, graph_type: str) -> Any:
    """``x`` as the graph takes it: a floating tensor is cast to the graph input's floating
    type (what a float32 verification of an fp16 file feeds), other types are left as they are
    for ONNX Runtime to check."""
    wanted = _FLOAT_INPUTS.get(graph_type)
    if wanted is not None and x.is_floating_point():
        x = x.to(wanted)
    if x.dtype == torch.bfloat16:
        raise InputError("ONNX Runtime inputs cannot be bfloat16 here; use float16 or float32")
    return x.detach().cpu().contiguous().numpy()


def run_onnx(session: Any, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Run ``session`` on ``inputs`` (in the order of the graph's inputs); one tensor per
    graph output."""
    graph_inputs = session.get_inputs()
    names = [i.name for i in graph_inputs]
    if len(names) != len(inputs):
        raise InputError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), "
                         f"not {len(inputs)}")
    try:
        outputs = session.run(None, {i.name: _numpy(x, i.type)
                                     for i, x in zip(graph_inputs, inputs)})
    except InputError:
        raise
    except Exception as exc:  # ORT reports wrong ranks, shapes and dtypes with its own types
        raise InputError(f"ONNX Runtime refused the inputs "
                         f"{[list(x.shape) for x in inputs]}: {one_line(exc)}") from exc
    return [torch.from_numpy(out) for out in outputs]


def _stored_tree(session: Any) -> TreeSpec | None:
    stored = session.get_modelmeta().custom_metadata_map.get(OUTPUT_TREE_KEY)
    if stored is None:
        return None
    try:
        spec = treespec_loads(stored)
    except Exception as exc:  # the text is data from the file
        raise InputError(f"the ONNX file's {OUTPUT_TREE_KEY} metadata is not a valid output "
                         "structure; re-export the model") from exc
    outputs = len(session.get_outputs())
    if spec.num_leaves != outputs:
        raise InputError(f"the ONNX file's {OUTPUT_TREE_KEY} metadata names {spec.num_leaves} "
                         f"outputs but the graph has {outputs}; re-export the model")
    return spec


class OnnxModule(nn.Module):
    """A ``.onnx`` file (or its bytes) run by ONNX Runtime, as a module returning what the
    exported PyTorch model returned: ``repconv.verify(original, OnnxModule(path), inputs)``.
    A file without repconv's output structure returns one tensor, or a tuple of them."""

    def __init__(self, source: Path | str | bytes, *, threads: int | None = None,
                 spin_wait: bool = True) -> None:
        super().__init__()
        self.session = load_onnx_session(source, threads=threads, spin_wait=spin_wait)
        self.output_tree = _stored_tree(self.session)

    @property
    def metadata(self) -> dict[str, str]:
        """The file's metadata_props (text the file holds: validate before use)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def dynamic_dims(self) -> list[list[int]]:
        """Per graph input, the dimensions whose size is not fixed in the file."""
        return [[d for d, size in enumerate(i.shape) if not isinstance(size, int)]
                for i in self.session.get_inputs()]

    def forward(self, *inputs: Tensor) -> Any:
        outputs = run_onnx(self.session, inputs)
        if self.output_tree is not None:
            return tree_unflatten(outputs, self.output_tree)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def initializers(source: Path | str | bytes) -> dict[str, Tensor]:
    """The floating-point weights stored in an ``.onnx`` file (or its bytes), by name: the
    exporter names them after the PyTorch parameters (``stages.0.0.fused_conv.weight``).
    Weights kept in external files are left out (ONNX Runtime reads those, within the model's
    folder, when it runs)."""
    onnx = require_extra("onnx")
    from onnx import numpy_helper

    name = "the ONNX bytes" if isinstance(source, bytes) else str(source)
    floating = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    try:
        proto = (onnx.load_from_string(source) if isinstance(source, bytes)
                 else onnx.load(str(source), load_external_data=False))
        return {w.name: torch.from_numpy(numpy_helper.to_array(w).copy())
                for w in proto.graph.initializer
                if w.data_type in floating and w.data_location != onnx.TensorProto.EXTERNAL}
    except Exception as exc:  # protobuf and onnx raise their own types for a damaged file
        raise InputError(f"{name} is not an ONNX model whose weights can be read "
                         f"({one_line(exc)})") from exc
