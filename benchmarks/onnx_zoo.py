"""ONNX Runtime latency on timm's re-parameterizable models: the ONNX exported from the training
model, from timm's hand-written deploy form (``reparameterize_model``) and from repconv's fused
model.

Models are built as in zoo.py (``zoo_models.build``: random weights, no download, realistic
BatchNorm statistics, eval mode). All three files come from repconv's exporter
(``repconv.onnx_io.onnx_bytes``, torch's dynamo exporter) and run through
``repconv.onnx_io.OnnxModule`` in CPU sessions with 2 intra-op threads whose idle threads do not
spin-wait, at batch 1. Latencies are interleaved medians (``_timing.interleaved_ms``), so the
ratios are measured within one run. A model whose export or session fails is dropped with a
one-line reason.

Run: `OMP_WAIT_POLICY=PASSIVE .venv-zoo/bin/python benchmarks/onnx_zoo.py [--models a,b]
[--size 128] [--rounds N]` (needs `make zoo-env`, which installs the onnx extra).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable

import onnx
import onnxruntime
import timm
import torch
from _timing import HOW, interleaved_ms
from timm.utils.model import reparameterize_model
from zoo_models import BY_NAME, HAND_WRITTEN, REPCONV, TRAINING, build, relative_error, seeded_input

import repconv
from repconv.formats.onnx_io import OnnxModule, onnx_bytes

THREADS = 2
MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050",
          "levit_conv_128s", "efficientvit_m0")
ORDER = (TRAINING, HAND_WRITTEN, REPCONV)  # t/h/r in the table


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def _load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def _forms(name: str, size: int, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    model = build(BY_NAME[name], size)
    hand = reparameterize_model(copy.deepcopy(model), inplace=True).eval()
    fused = repconv.fuse(model, x, check=False).model
    return {TRAINING: model, HAND_WRITTEN: hand, REPCONV: fused}


def _timed(module: OnnxModule, x: torch.Tensor) -> Callable[[], object]:
    return lambda: module(x)


def measure(name: str, size: int, rounds: int) -> tuple[str | None, str]:
    """(table row or None, a log line: timings of the steps, or why the model was dropped)."""
    x = seeded_input((1, 3, size, size), seed=4)
    start = time.perf_counter()
    stage = "build/fuse"
    try:
        forms = _forms(name, size, x)
        with torch.no_grad():
            torch_out = forms[TRAINING](x.clone())
        stage = "export"
        files = {form: onnx_bytes(module, (x,)) for form, module in forms.items()}
        exported = time.perf_counter()
        stage = "ONNX Runtime"
        sessions = {form: OnnxModule(data, threads=THREADS, spin_wait=False)
                    for form, data in files.items()}
        outputs = {form: session(x) for form, session in sessions.items()}
    except Exception as exc:  # a failing model must not stop the others
        return None, f"{name}: dropped, {stage} failed: {_one_line(exc)}"
    errors = {form: relative_error(outputs[TRAINING], outputs[form])
              for form in (HAND_WRITTEN, REPCONV)}
    onnx_vs_torch = relative_error(torch_out, outputs[TRAINING])
    ms = interleaved_ms({form: _timed(sessions[form], x) for form in ORDER},
                        warmup=5, rounds=rounds)
    ops = {form: [node.op_type for node in onnx.load_from_string(data).graph.node]
           for form, data in files.items()}
    count = {kind: "/".join(str(ops[form].count(kind)) for form in ORDER)
             for kind in ("Conv", "BatchNormalization")}
    same = " =" if ops[HAND_WRITTEN] == ops[REPCONV] else ""
    row = (f"| {name} | {ms[TRAINING]:.2f} | {ms[REPCONV]:.2f} | {ms[HAND_WRITTEN]:.2f}{same} | "
           f"{ms[REPCONV] / ms[HAND_WRITTEN]:.2f} | {ms[TRAINING] / ms[REPCONV]:.2f}x | "
           f"{count['Conv']} | {count['BatchNormalization']} | "
           f"{max(errors.values()):.1e} |")
    total = time.perf_counter() - start
    log = (f"{name}: build+fuse+export {exported - start:.1f}s, total {total:.1f}s; "
           f"rel err vs training ONNX: hand-written {errors[HAND_WRITTEN]:.1e}, repconv "
           f"{errors[REPCONV]:.1e}; training ONNX vs torch {onnx_vs_torch:.1e}; nodes t/h/r "
           f"{'/'.join(str(len(ops[form])) for form in ORDER)}")
    return row, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, timm {timm.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; CPU sessions with {THREADS} threads, batch 1, "
          f"{args.size}px, median of {args.rounds} interleaved rounds ({HOW}); "
          f"load average at start {_load()}", flush=True)
    rows, logs = [], []
    for name in args.models.split(","):
        row, log = measure(name, args.size, args.rounds)
        print(log, file=sys.stderr, flush=True)
        logs.append(log)
        if row is not None:
            rows.append(row)
    print("\n| model | training ONNX ms | repconv ONNX ms | hand-written ONNX ms | "
          "repconv / hand-written | training→repconv speed-up | Conv nodes t/h/r | "
          "BN nodes t/h/r | max rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\nt/h/r: training, hand-written (timm reparameterize_model), repconv. = : the "
          "hand-written ONNX graph has the same nodes as repconv's. max rel err: the larger of "
          "the hand-written and repconv ONNX outputs' max|d| / max|training ONNX output|.\n")
    print("\n".join(f"- {log}" for log in logs))
    print(f"\nload average at end {_load()}; wall {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
