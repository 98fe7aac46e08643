"""Numerical proof that a fused model computes what the original did.

Both models run on the same inputs and every leaf of (possibly nested) tuple, list or dict
outputs is compared. Error is measured relative to each output's scale (max |value|):
activations of networks with real BN statistics reach 1e16, so absolute tolerances lie. A
verification that compared nothing (no output tensor, or an empty one) fails: it proved nothing.

Inputs: the caller's ``samples`` first, then ``trials`` seeded random inputs shaped like the
example, then (``vary``) one at batch 2 and one at another spatial size. A varied size the
ORIGINAL does not run at is skipped with the reason; a fused model that fails where the original
runs fails verification (unless the caller allows that variation to be refused: ``lenient``).

Precision (``upcast``): a float16/bfloat16 model runs in float32 on both sides, every such
tensor upcast in place (exactly) and restored afterwards. What is left is what fusing changed,
the rounding of the fused weights to the model's dtype, without the dtype's arithmetic noise,
which is several times larger (benchmarks/numerics.py measures both): compared natively, a
bfloat16 conv with weights x1.02 hides in the noise.

Tolerance: where the models are compared in float32, each output must be within
``max(rtol, noise_factor * noise)`` of the original run in float64, ``noise`` being the
original's own float32 error against that (:mod:`repconv.verify.reference`): a fused model may
round differently, not more. ``noise_factor`` is NOISE_FACTOR for float32 models; for fp16/bf16
models (upcast) LOW_PRECISION_NOISE_FACTOR times the dtype's unit over float32's (UNIT_RATIO:
2^13, 2^16): their fused weights are rounded once to the dtype, which perturbs the network as
float32 rounding does, at the dtype's unit (docs/tolerances.md: 0.12-0.28x the noise so scaled
on timm models). Elsewhere (float64,
fp16/bf16 compared natively, ``noise_factor`` 0, an original that does not run in float64) the
fixed ``rtol`` against the original as run.

``rewrites`` (:mod:`repconv.verify.rewrites`) adds the per-rewrite table: each fused conv against
the ops it replaced, on the activation that reaches it, so a failure names the rewrite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import InputError, TraceError, brief, one_line
from repconv.fold.calls import copies, eval_mode
from repconv.formats.metadata import check_seed
from repconv.progress import Progress, no_progress
from repconv.verify.footprint import MemoryBudget
from repconv.verify.inputs import (
    Planned,
    floating_to,
    leaf_shapes,
    plan,
    tensor_leaves,
)
from repconv.verify.reference import (
    FLOAT64,
    ORIGINAL,
    Float64Reference,
    compare_output,
    computed_in,
    leaves,
)
from repconv.verify.report import UNIT_RATIO, RewriteError, Run, SkippedRun, VerifyReport
from repconv.verify.rewrites import RewriteCheck

# Scale-relative tolerance of the outputs when both models run in the model's own dtype, by the
# least precise floating dtype among the inputs and the model's tensors. Where the models are
# compared in float32 it is a floor: the bar is max(rtol, NOISE_FACTOR * the original's own
# float32 noise), measured against the original run in float64 (repconv.verify.reference).
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2,
                torch.bfloat16: 5e-2}
# ... when fp16/bf16 models run upcast (what the CLI does); docs/tolerances.md has the
# measured error distributions these separate.
UPCAST_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3,
               torch.bfloat16: 2e-2}
# Each fused conv against the ops it replaced, per output element relative to the sum of
# |w * x| + |b| it adds up: rounding the fused weights to the dtype changes that by at most the
# dtype's unit roundoff (2^-8 bf16, 2^-11 fp16), whatever the depth or the cancellation.
REWRITE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-3,
                torch.bfloat16: 4e-3}
# A correct fold errs by 0.92x (median) to 1.67x (max) the original's own float32 noise
# (docs/tolerances.md: 28 reference models, 16 deep noisy conv-BN nets, 11 timm models); 8x
# leaves 4.8x above the largest, and one fused conv's weights x1.0001 in the noisiest nets
# still lands 5.4x over the bar (the network amplifies the change as it amplifies rounding).
NOISE_FACTOR = 8.0
# fp16/bf16 models compared upcast: the factor on the float32 noise scaled to the dtype's unit
# (UNIT_RATIO). A correct fold errs by 0.13-0.28x that on deep timm models
# (docs/tolerances.md), by up to 0.8x on the 2-block reference models, where the floors rule:
# 2 leaves 7x above the deep models. Their outputs then move less under one conv x1.02 than
# under correct rounding; the per-rewrite table is what catches that conv.
LOW_PRECISION_NOISE_FACTOR = 2.0


def _structure_problem(expected: list[tuple[str, Tensor]], got: list[tuple[str, Tensor]],
                       expected_structure: str, got_structure: str) -> str:
    """Why two outputs cannot be compared leaf by leaf ("" when they can)."""
    if not expected:
        return "the original model returned no tensor, so nothing was compared"
    empty = next((name for name, t in expected if t.numel() == 0), None)
    if empty is not None:
        return f"{empty} has no elements, so nothing was compared"
    if len(expected) != len(got) or expected_structure != got_structure:
        return (f"the fused model returns {len(got)} tensor(s) in a different structure than "
                f"the original's {len(expected)}")
    shape = next((f"{n} has shape {list(b.shape)}, the original's {list(a.shape)}"
                  for (n, a), (_, b) in zip(expected, got) if a.shape != b.shape), "")
    return shape


def _least_precise(inputs: Any, model: nn.Module) -> torch.dtype:
    tensors = [*tensor_leaves(inputs), *model.parameters(), *model.buffers()]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()} & set(DEFAULT_RTOL)
    return max(dtypes, key=DEFAULT_RTOL.__getitem__, default=torch.float32)


def _check_tolerance(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be a finite number >= 0, not {value}; pass "
                         f"--{name.replace('_', '-')} like 1e-5")


def verify(
    original: nn.Module,
    fused: nn.Module,
    example_inputs: Any,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    seed: int = 0,
    trials: int = 3,
    vary: Sequence[str] = (),
    shapes: Sequence[Sequence[Sequence[int]]] | None = None,
    extra_shapes: Sequence[Sequence[Sequence[int]]] = (),
    upcast: bool = False,
    samples: Mapping[str, Any] | None = None,
    rewrites: RewriteCheck | None = None,
    rewrite_rtol: float | None = None,
    lenient: Sequence[str] = (),
    noise_factor: float | None = None,
    memory: MemoryBudget | None = None,
    progress: Progress = no_progress,
) -> VerifyReport:
    """Compare ``original`` and ``fused`` on the inputs described in the module docstring.
    Passes when every output leaf is within ``atol`` plus its scale-relative tolerance of the
    reference (``max(rtol, noise_factor * noise)`` of the float64 original where the models
    run in float32, else ``rtol`` of the original as run; ``noise_factor`` defaults to
    NOISE_FACTOR, LOW_PRECISION_NOISE_FACTOR * UNIT_RATIO for fp16/bf16) and every rewrite of
    ``rewrites`` is within ``rewrite_rtol`` of the ops it replaced. ``noise_factor`` 0 turns
    the noise term (and the float64 runs) off; so does an explicit ``rtol`` unless
    ``noise_factor`` is given too (it is then the floor). A variation in ``lenient`` that the
    fused model refuses (a .pt2 whose spatial range torch.export fixed) is skipped with the
    reason instead of failing. ``example_inputs`` is a tensor or a tuple of positional
    arguments, each a tensor or a list/dict of tensors. ``shapes`` replaces the sizes ``vary``
    makes by the caller's list (one shape per tensor input each); ``extra_shapes`` adds sizes
    (skipped where the original does not run). With ``memory``, an input whose forward it
    estimates above its limit is skipped (a varied size) or refused (InputError)."""
    # an explicit rtol is the bar asked for (--rtol 1e-12 must be able to fail): no noise term
    explicit = rtol is not None and noise_factor is None
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    dtype = _least_precise(inputs, original)
    default_factor = (LOW_PRECISION_NOISE_FACTOR * UNIT_RATIO[dtype] if dtype in UNIT_RATIO
                      else NOISE_FACTOR)
    noise_factor = (0.0 if explicit else default_factor) if noise_factor is None else noise_factor
    for name, value in (("rtol", rtol), ("atol", atol), ("rewrite_rtol", rewrite_rtol),
                        ("noise_factor", noise_factor)):
        _check_tolerance(name, value)
    check_seed(seed)
    rtol = (UPCAST_RTOL if upcast else DEFAULT_RTOL)[dtype] if rtol is None else rtol
    rewrite_rtol = REWRITE_RTOL[dtype] if rewrite_rtol is None else rewrite_rtol
    compute = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    reference = Float64Reference(original) if compute == torch.float32 and noise_factor else None
    planned, skipped = plan(inputs, samples or {}, seed, trials, vary, shapes, extra_shapes)
    runs: list[Run] = []
    problem, rewrite_errors = "", []
    extra = rewrites.modules() if rewrites is not None else []
    start, seconds = time.perf_counter(), {}
    with eval_mode(original, fused, *extra), torch.no_grad(), \
            computed_in(compute, original, fused, *extra):
        for index, planned_run in enumerate(planned):
            progress("comparing outputs", index, len(planned))
            given = floating_to(planned_run.inputs(inputs), compute)
            too_big = memory.problem(original, given) if memory is not None else None
            if too_big and planned_run.optional:
                skipped.append(SkippedRun(planned_run.source, planned_run.shapes, too_big))
                continue
            if too_big:
                raise InputError(f"verifying on {planned_run.source} inputs of shape "
                                 f"{brief(planned_run.shapes, 120)} {too_big}")
            run_start = time.perf_counter()
            try:  # each model gets its own copy: a model may change its input in place
                expected = leaves(original(*copies(given)))
            except Exception as exc:  # model code failing on the input is a usage problem
                if planned_run.optional:
                    skipped.append(SkippedRun(planned_run.source, planned_run.shapes,
                                              "the original model does not run at this size "
                                              f"({one_line(exc)})"))
                    continue
                raise TraceError(f"the model fails on {planned_run.source} inputs of shape "
                                 f"{brief(planned_run.shapes, 120)}: {one_line(exc)}") from exc
            try:
                got = leaves(fused(*copies(given)))
            except Exception as exc:  # the deployed model refusing what the original runs
                if planned_run.optional and planned_run.source.partition(" ")[0] in lenient:
                    skipped.append(SkippedRun(planned_run.source, planned_run.shapes,
                                              "the fused model does not accept this size "
                                              f"({one_line(exc)})"))
                    continue
                problem = ("the fused model fails on inputs of shape "
                           f"{brief(planned_run.shapes, 120)} where the original runs "
                           f"({one_line(exc)})")
                break
            problem = _structure_problem(expected[0], got[0], expected[1], got[1])
            if problem:
                break
            exact = reference.run(given, *expected) if reference is not None else None
            runs.append(_compare(planned_run, expected[0], got[0], exact, rtol, atol,
                                 noise_factor, time.perf_counter() - run_start))
        seconds["outputs"] = time.perf_counter() - start
        if rewrites is not None and planned and not problem:
            progress("comparing each rewrite", 0, None)
            start = time.perf_counter()
            rewrite_errors = rewrites.errors(
                floating_to(planned[0].inputs(inputs), compute),
                rewrite_rtol, atol, torch.finfo(dtype).tiny,
                torch.finfo(dtype).eps if dtype in UNIT_RATIO and compute != dtype else None)
            seconds["rewrites"] = time.perf_counter() - start
    if reference is not None:  # the float64 runs, apart from the runs of both models
        seconds["outputs"] -= reference.seconds
        seconds["float64_reference"] = reference.seconds
    note = (f"compared in {_name(compute)}: the fixed rtol applies" if compute != torch.float32
            else "rtol given: it applies as a fixed bar" if reference is None and explicit
            else "noise_factor 0: the fixed rtol applies" if reference is None
            else f"{reference.problem}: the fixed rtol applies" if reference.problem else "")
    problem = problem or _nonfinite_problem(runs)
    report = _report(runs, skipped, problem, rewrite_errors, inputs, dtype, compute,
                     rtol=rtol, atol=atol, seed=seed, rewrite_rtol=rewrite_rtol)
    decisive = max(((run, o) for run in runs for o in run.outputs), key=lambda ro: ro[1].margin,
                   default=None)
    return replace(
        report, reference=FLOAT64 if any(o.noise is not None for r in runs for o in r.outputs)
        else ORIGINAL, reference_note=note, noise_factor=noise_factor if reference else 0.0,
        deciding_output=f"{decisive[1].name} ({decisive[0].source})" if decisive else "",
        reference_error=decisive[1].reference_error if decisive else 0.0,
        noise=decisive[1].noise if decisive else None,
        tolerance=decisive[1].tolerance if decisive else None,
        seconds={k: round(v, 4) for k, v in seconds.items()})


def _nonfinite_problem(runs: list[Run]) -> str:
    """Where an inf or NaN of one model is not the same in the other (first place)."""
    for run in runs:
        for output in run.outputs:
            if output.nonfinite_mismatches:
                return (f"{output.name} ({run.source}) has {output.nonfinite_mismatches:,} "
                        "inf/NaN value(s) that differ between the models (non-finite values "
                        "must match exactly: the same infinity, NaN where NaN)")
    return ""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compare(planned_run: Planned, expected: list[tuple[str, Tensor]],
             got: list[tuple[str, Tensor]], exact: list[Tensor] | None, rtol: float, atol: float,
             noise_factor: float, seconds: float) -> Run:
    outputs = [compare_output(name, a, b, exact[i] if exact is not None else None, rtol=rtol,
                              atol=atol, noise_factor=noise_factor)
               for i, ((name, a), (_, b)) in enumerate(zip(expected, got))]
    return Run(planned_run.source, planned_run.seed, planned_run.shapes, len(outputs),
               sum(a.numel() for _, a in expected), outputs, round(seconds, 4))


def _report(runs: list[Run], skipped: list[SkippedRun], problem: str,
            rewrite_errors: list[RewriteError], inputs: Any, dtype: torch.dtype,
            compute: torch.dtype, *, rtol: float, atol: float, seed: int,
            rewrite_rtol: float) -> VerifyReport:
    outputs = [o for run in runs for o in run.outputs]
    worst = max(outputs, key=lambda o: o.max_rel_error, default=None)
    rewrite_worst = max((r for r in rewrite_errors if not r.problem),
                        key=lambda r: r.magnitude_error, default=None)
    passed = (not problem and bool(runs) and all(o.passed for o in outputs)
              and all(r.passed for r in rewrite_errors if not r.problem))
    infinite = float("inf") if problem else 0.0
    return VerifyReport(
        passed=passed,
        max_abs_error=max((o.max_abs_error for o in outputs), default=infinite),
        max_rel_error=worst.max_rel_error if worst else infinite,
        rtol=rtol,
        atol=atol,
        trials=len(runs),
        seed=seed,
        input_shapes=leaf_shapes(inputs),
        outputs_compared=runs[0].outputs_compared if runs else 0,
        worst_output=worst.name if worst else "",
        elements_compared=runs[0].elements_compared if runs else 0,
        problem=problem,
        dtype=_name(dtype),
        compared_in=_name(compute),
        runs=runs,
        skipped_runs=skipped,
        rewrite_rtol=rewrite_rtol,
        rewrite_errors=rewrite_errors,
        worst_rewrite=rewrite_worst.fused_module if rewrite_worst else "",
    )
