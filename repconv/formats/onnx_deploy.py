"""``.onnx`` deploy files in the pipeline: checked before any work, exported from the fused
model with its input shape recorded, verified in ONNX Runtime like any other deploy format, and
loaded back for `repconv verify` and `repconv bench`.

The file records the example input's shape in its metadata_props (``repconv.input_shape``,
JSON), so `repconv verify ORIGINAL DEPLOY.onnx` needs no --input-shape; like every value read
from a file it is validated as untrusted data. The per-rewrite table of a verification reads
the fused convs' weights from the file's initializers, which torch's exporter names after the
PyTorch parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import InputError
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.metadata import recorded_shape
from repconv.formats.onnx_io import (
    DEFAULT_OPSET,
    OnnxExport,
    OnnxModule,
    check_opset,
    export_program,
    initializers,
    require_extra,
)

INPUT_SHAPE_KEY = "repconv.input_shape"


def onnx_variations(export: OnnxExport) -> tuple[str, ...]:
    """The sizes an exported file is verified at besides the example's: other batch sizes
    where its batch is dynamic (its spatial size is fixed)."""
    return ("batch",) if export.dynamic_batch else ()


def check_onnx_output(out: Path, opset: int | None) -> int | None:
    """Before any work: the opset to export OUT with (None: OUT is not ``.onnx``), with the
    ``repconv[onnx]`` extra installed and ``opset`` one the exporter writes."""
    if kind_of(out) is not FileKind.ONNX:
        if opset is not None:
            raise InputError(f"--opset {opset} is for an .onnx OUT only, and OUT {out} is "
                             f"{out.suffix or 'without a suffix'}; drop --opset or write .onnx")
        return None
    for name in ("onnx", "onnxruntime", "onnxscript"):  # the slowest import last
        require_extra(name)
    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset)
    return opset


def export_deploy(fused: nn.Module, inputs: tuple[Tensor, ...], opset: int) -> OnnxExport:
    """The ``.onnx`` file of the fused model, with the example input's shape recorded."""
    shape = json.dumps(list(inputs[0].shape))
    return export_program(fused, inputs, opset=opset, metadata={INPUT_SHAPE_KEY: shape})


def runtime_name() -> str:
    return f"onnxruntime {require_extra('onnxruntime').__version__}"


class OnnxWeights(nn.Module):
    """The floating weights of an ``.onnx`` file as a state_dict, for the per-rewrite table
    (:class:`repconv.verify.rewrites.RewriteCheck` runs the reference conv with them). fp16
    weights are upcast to float32 (exact), the precision verification compares in."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.weights = {name: w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
                        for name, w in weights.items()}

    def state_dict(self, *_args: Any, **_kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return dict(self.weights)


def weights_of(source: Path | bytes) -> OnnxWeights:
    return OnnxWeights(initializers(source))


@dataclass(frozen=True)
class LoadedOnnx:
    module: OnnxModule
    input_shape: tuple[int, ...] | None  # what the file recorded
    vary: tuple[str, ...]  # the sizes it accepts besides the recorded one
    note: str
    weights: OnnxWeights | None


def _variations(path: Path, module: OnnxModule) -> tuple[tuple[str, ...], str]:
    dynamic = module.dynamic_dims()
    dims = set(dynamic[0]) if dynamic else set()
    vary = tuple(v for v, ok in (("batch", 0 in dims), ("spatial", bool(dims - {0}))) if ok)
    static = [v for v in ("batch", "spatial") if v not in vary]
    note = (f"{path} has a fixed {' and '.join(static)} size: not compared at other sizes "
            "there") if static else ""
    return vary, note


def load_onnx_deploy(path: Path, *, threads: int | None = None, spin_wait: bool = True,
                     with_weights: bool = True) -> LoadedOnnx:
    """An ``.onnx`` DEPLOY in ONNX Runtime, the input shape it records, the sizes it accepts
    and (``with_weights``) its weights for the per-rewrite table."""
    module = OnnxModule(path, threads=threads, spin_wait=spin_wait)
    stored = module.metadata.get(INPUT_SHAPE_KEY)
    if stored is not None and len(stored) > 200:
        raise InputError(f"{path} records {INPUT_SHAPE_KEY} of {len(stored):,} characters, "
                         "which is not an input shape; the file is damaged: write it again")
    shape = recorded_shape(stored, f"{path} ({INPUT_SHAPE_KEY})")
    vary, note = _variations(path, module)
    return LoadedOnnx(module, shape, vary, note, weights_of(path) if with_weights else None)
