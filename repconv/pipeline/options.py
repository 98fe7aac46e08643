"""What every command shares: how to build the model (``--model``, ``--model-kwargs``) and what
to feed it (``--input-shape``, ``--inputs``, the verification's sizes and tolerances)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import InputError
from repconv.formats.checkpoint import LoadedCheckpoint, load_checkpoint
from repconv.formats.inputs import load_inputs
from repconv.formats.limits import available_memory
from repconv.formats.metadata import check_seed
from repconv.fuse import FuseResult
from repconv.pipeline.precision import (
    model_dtype,
)
from repconv.progress import Progress
from repconv.verify.footprint import MemoryBudget
from repconv.verify.inputs import VARIATIONS, leaf_shapes
from repconv.verify.outputs import verify
from repconv.verify.report import VerifyReport
from repconv.verify.rewrites import RewriteCheck


@dataclass(frozen=True)
class Options:
    """What every command shares: how to build the model and what to feed it."""

    model: str | None = None  # "package.module:callable"
    model_kwargs: dict[str, Any] | None = None
    input_shape: tuple[int, ...] | None = None
    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0
    trust_pickle: bool = False
    inputs_file: Path | None = None  # --inputs: sample data compared first
    rewrite_rtol: float | None = None
    unshare: bool = True  # a layer called at several sites folds into a copy per site
    strict: bool = False  # fail (StrictError) when a BatchNorm next to a conv is left unfused
    # --shapes: the sizes verification runs at besides the example (default: varied sizes)
    shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    max_memory: int | None = None  # --max-memory, bytes (default: the memory available)

    def memory(self) -> MemoryBudget | None:
        """The limit a forward is held to: --max-memory, else what the system has available."""
        if self.max_memory is not None:
            return MemoryBudget(self.max_memory, "--max-memory")
        available = available_memory()
        return None if available is None else MemoryBudget(available, "the memory available")

    def check_memory(self, model: nn.Module, inputs: tuple[Tensor, ...],
                     samples: dict[str, tuple[Tensor, ...]], budget: MemoryBudget | None) -> None:
        """Refuse, before its first forward, an input the model would run out of memory on."""
        for label, given in (("example", inputs), *samples.items()):
            problem = budget.problem(model, given) if budget is not None else None
            if problem:
                raise InputError(f"running the model on the {label} input of shape "
                                 f"{leaf_shapes(given)} {problem}")

    def load(self, path: Path) -> LoadedCheckpoint:
        if self.model_kwargs is not None and self.model is None:
            raise InputError("--model-kwargs is used only with --model; pass --model too")
        return load_checkpoint(
            path,
            model_reference=self.model,
            model_kwargs=self.model_kwargs or {},
            trust_pickle=self.trust_pickle,
        )

    def samples(self, model: nn.Module) -> dict[str, tuple[Tensor, ...]]:
        """The --inputs tensors, in the model's dtype, under the label the report shows."""
        if self.inputs_file is None:
            return {}
        return {"--inputs": cast_inputs(load_inputs(self.inputs_file), model)}

    def inputs(self, samples: dict[str, tuple[Tensor, ...]],
               **recorded: tuple[int, ...] | None) -> tuple[tuple[Tensor, ...], str]:
        """Example input and where its shape came from: --input-shape, else the first shape a
        file recorded (keyword order: the caller's precedence), else the --inputs tensors'.
        Recorded shapes were validated when their file was read."""
        given = next(iter(samples.values()), None)
        if self.input_shape is not None:
            shapes, source = [self.input_shape], "--input-shape"
        else:
            source, shape = next(((k, s) for k, s in recorded.items() if s), ("", None))
            shapes = [shape] if shape is not None else None
            if given is not None and (shapes is None or len(given) > 1):
                shapes, source = [tuple(x.shape) for x in given], "--inputs"
            if shapes is None:
                raise InputError("no input shape recorded in the checkpoint; pass --input-shape "
                                 "like 1,3,224,224 (or --inputs with sample data)")
        generator = torch.Generator().manual_seed(check_seed(self.seed))
        return tuple(torch.randn(shape, generator=generator) for shape in shapes), source

    def verify(self, original: nn.Module, deployed: nn.Module, inputs: tuple[Tensor, ...],
               samples: dict[str, tuple[Tensor, ...]], progress: Progress, *,
               reference: FuseResult | None = None, vary: tuple[str, ...] = VARIATIONS,
               lenient: tuple[str, ...] = (), weights: nn.Module | None = None,
               memory: MemoryBudget | None = None,
               extra_shapes: Sequence[Sequence[Sequence[int]]] = ()) -> VerifyReport:
        """The global verification: every output on every input and, with ``reference`` (the
        original fused in memory), each of its rewrites against the deployed model's conv (its
        weights from ``weights``' state_dict when given: an ONNX file's). ``extra_shapes``:
        sizes to cover too (across the guards a capture saw), skipped where the original does
        not run; ``memory``: the limit each input is held to."""
        rewrites = None if reference is None else RewriteCheck(
            reference.model, reference.originals, reference.report.rewrites,
            deployed if weights is None else weights)
        return verify(original, deployed, inputs, rtol=self.rtol, atol=self.atol, seed=self.seed,
                      trials=1, vary=vary, shapes=self.shapes, upcast=True, samples=samples,
                      extra_shapes=extra_shapes, rewrites=rewrites,
                      rewrite_rtol=self.rewrite_rtol, lenient=lenient, memory=memory,
                      progress=progress)


def cast_inputs(inputs: tuple[Tensor, ...], model: nn.Module) -> tuple[Tensor, ...]:
    dtype = model_dtype(model)
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)

