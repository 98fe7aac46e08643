"""`repconv bench`: what fusing buys on this machine. Latency of the original and the fused
model (warm-up, then interleaved rounds so that load from elsewhere slows every form alike;
median and interquartile spread), the aten ops each executes, parameters, MACs and peak
memory of one forward.

Each way of running the model is a :class:`Form`: a name, a callable, and the torch module
behind it when there is one (ops, MACs, parameters and memory are measured through torch's
dispatcher). A runtime that is not torch (an ONNX Runtime session) is a Form with
``module=None``: it is timed like the others, and its other figures are reported as unknown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from repconv.errors import InputError
from repconv.fold.calls import eval_mode
from repconv.measure.opcount import count_ops
from repconv.progress import Progress, no_progress

MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 5, 200, 2


@dataclass(frozen=True)
class Form:
    name: str
    run: Callable[..., object]
    module: nn.Module | None = None  # the torch module behind ``run``, when there is one
    runtime: str = "torch"  # what runs it: "torch", or e.g. "onnxruntime 1.32.0"


@dataclass(frozen=True)
class Latency:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class FormResult:
    name: str
    latency: Latency
    ops: dict[str, Any] | None  # aten ops executed: convs, batchnorms, total, by name
    parameters: int | None
    macs: int | None
    weight_bytes: int | None  # parameters and buffers
    peak_memory_bytes: int | None  # weights + the most activation memory live at once
    runtime: str = "torch"


@dataclass
class BenchReport:
    input: str
    deploy: str | None
    input_shapes: list[list[int]]
    threads: int
    torch: str
    rounds: int
    warmup: int
    forms: list[FormResult]

    def speedup(self) -> float:
        """Median latency of the first form over the second's."""
        first, second = self.forms[0].latency.median_ms, self.forms[1].latency.median_ms
        return first / second if second > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self), "speedup": self.speedup()}

    def __rich__(self) -> Group:
        table = Table(box=None, pad_edge=False, title_justify="left", title=(
            f"cpu, {self.threads} thread(s), torch {self.torch}, input "
            f"{' '.join('x'.join(map(str, s)) for s in self.input_shapes)}, "
            f"{self.rounds} interleaved rounds after {self.warmup} warm-up"))
        table.add_column("")
        for form in self.forms:
            table.add_column(form.name, justify="right")

        def row(label: str, value: Callable[[FormResult], str]) -> None:
            table.add_row(label, *(value(f) for f in self.forms))

        mixed = len({f.runtime for f in self.forms}) > 1
        if mixed:
            row("runtime", lambda f: f.runtime)
        row("latency ms (median)", lambda f: f"{f.latency.median_ms:.2f}")
        row("spread ms (q1-q3)", lambda f: f"{f.latency.q1_ms:.2f}-{f.latency.q3_ms:.2f}")
        row("aten ops", lambda f: _int(f.ops and f.ops["total"]))
        row("  convs", lambda f: _int(f.ops and f.ops["convs"]))
        row("  batchnorms", lambda f: _int(f.ops and f.ops["batchnorms"]))
        row("parameters", lambda f: _int(f.parameters))
        row("MACs", lambda f: _int(f.macs))
        row("peak memory MB", lambda f: "?" if f.peak_memory_bytes is None
            else f"{f.peak_memory_bytes / 2**20:.1f}")
        first, second = self.forms[0], self.forms[1]
        across = f" (in {second.runtime}, against {first.runtime})" if mixed else ""
        return Group(table, Text(f"{second.name} runs {self.speedup():.2f}x as fast as "
                                 f"{first.name}{across}", style="bold"))


def _int(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


class _LiveBytes(TorchDispatchMode):
    """The most bytes of new tensors alive at once while it is active (tensors that existed
    before, weights and inputs, are not counted)."""

    def __init__(self, existing: Sequence[Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.existing and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _figures(form: Form, inputs: tuple[Tensor, ...]) -> dict[str, Any]:
    if form.module is None:
        return {"ops": None, "parameters": None, "macs": None, "weight_bytes": None,
                "peak_memory_bytes": None}
    with torch.no_grad():
        ops = count_ops(lambda: form.run(*inputs)).to_dict()
        with FlopCounterMode(display=False) as flops:
            form.run(*inputs)
        weights = _tensors(form.module)
        with _LiveBytes([*weights, *inputs]) as live:
            form.run(*inputs)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    return {"ops": ops, "parameters": sum(p.numel() for p in form.module.parameters()),
            "macs": flops.get_total_flops() // 2, "weight_bytes": weight_bytes,
            "peak_memory_bytes": weight_bytes + live.peak}


def _latencies(forms: Sequence[Form], inputs: tuple[Tensor, ...], seconds: float,
               progress: Progress) -> tuple[dict[str, list[float]], int, int]:
    """Milliseconds per call of each form over interleaved rounds, the rounds timed (as many as
    fit in ``seconds``, from MIN_ROUNDS to MAX_ROUNDS) and the warm-up rounds before them (at
    least WARMUP_ROUNDS, and a fifth of the budget: first calls allocate and initialise)."""
    start, warmup, last = time.perf_counter(), 0, 0.0
    while warmup < WARMUP_ROUNDS or (time.perf_counter() - start < seconds / 5
                                     and warmup < MAX_ROUNDS):
        progress("warming up", warmup, None)
        begin = time.perf_counter()
        for form in forms:
            form.run(*inputs)
        last, warmup = time.perf_counter() - begin, warmup + 1
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(seconds / max(last, 1e-9))))
    samples: dict[str, list[float]] = {form.name: [] for form in forms}
    for index in range(rounds):
        progress("timing", index, rounds)
        for form in forms:
            begin = time.perf_counter()
            form.run(*inputs)
            samples[form.name].append((time.perf_counter() - begin) * 1e3)
    return samples, rounds, warmup


def _latency(values: list[float]) -> Latency:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return Latency(statistics.median(values), q1, q3, min(values), max(values))


def bench(forms: Sequence[Form], inputs: tuple[Tensor, ...], *, input_path: str,
          deploy_path: str | None, seconds: float = 10.0,
          progress: Progress = no_progress) -> BenchReport:
    """Time ``forms`` (the first is the baseline, the second the fused model) on ``inputs``."""
    if len(forms) < 2:
        raise InputError("bench needs at least two forms to compare")
    if not seconds > 0:
        raise InputError(f"--seconds {seconds} must be more than 0")
    modules = [f.module for f in forms if f.module is not None]
    with eval_mode(*modules), torch.inference_mode():
        samples, rounds, warmup = _latencies(forms, inputs, seconds, progress)
    results = []
    with eval_mode(*modules):
        for index, form in enumerate(forms):
            progress("counting ops, MACs and memory", index, len(forms))
            results.append(FormResult(form.name, _latency(samples[form.name]),
                                      **_figures(form, inputs), runtime=form.runtime))
    return BenchReport(input_path, deploy_path, [list(x.shape) for x in inputs],
                       torch.get_num_threads(), torch.__version__, rounds, warmup, results)
