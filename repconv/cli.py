"""The repconv command line. Parses, calls the library, renders; holds no logic."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from inspect import cleandoc
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

from repconv import __version__
from repconv.errors import OutcomeError, RepconvError
from repconv.formats.limits import parse_size
from repconv.formats.metadata import parse_kwargs, parse_shape, parse_shapes
from repconv.formats.syscalls import keep_freed_memory
from repconv.measure.quant import DEFAULT_TARGET, requested_target
from repconv.pipeline import Options, bench_checkpoint, fuse_checkpoint, verify_checkpoints
from repconv.pipeline.precision import DeployDtype
from repconv.progress import Progress, progress_display

# The --json document's schema: bump when a field changes meaning or goes away.
JSON_SCHEMA_VERSION = 1
EXIT_INTERNAL = 3  # a bug in repconv, not the user's input
MAX_MESSAGE = 400  # characters of the one error line
EXIT_SIGTERM = 128 + signal.SIGTERM


def one_line_message(message: str) -> str:
    """What stderr and --json show of an error: one line of at most MAX_MESSAGE characters,
    whatever the message grew to (10,000 input shapes, a model's multi-line complaint)."""
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


class Terminated(BaseException):
    """SIGTERM (what CI runners and `timeout` send), raised where Python is running so that
    every temp file is removed on the way out, as for Ctrl-C."""


def _emit_json(payload: dict[str, Any], exit_code: int) -> None:
    document = {"schema_version": JSON_SCHEMA_VERSION, **_jsonable(payload),
                "exit_code": exit_code}
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


class _OneLineErrors(TyperGroup):
    """Usage errors (bad option value, unknown option) as one 'error:' line, exit code 2, and
    with --json also as the one JSON document on stdout."""

    def main(self, args: list[str] | None = None, *rest: Any, standalone_mode: bool = True,
             **kwargs: Any) -> Any:
        try:
            code = super().main(args, *rest, standalone_mode=False, **kwargs)
        except ClickException as exc:
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.exit(0)  # typer has printed the help already
            ctx = getattr(exc, "ctx", None)
            command = ctx.command_path if ctx else "repconv"
            message = one_line_message(f"{exc.format_message()} (see {command} --help)")
            if "--json" in (sys.argv[1:] if args is None else args):
                _emit_json({"ok": False, "error": message}, exc.exit_code)
            Console(stderr=True, soft_wrap=True).print(Text.assemble(
                ("error:", "bold red"), f" {message}"))
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            sys.exit(130)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


app = typer.Typer(
    name="repconv",
    cls=_OneLineErrors,
    help="Fold Conv-BN pairs and linear multi-branch blocks (RepVGG, ACNet, DBB, MobileOne, "
    "RepMixer, ...) into single convolutions, verify the result, write a deploy checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

InPath = Annotated[Path, typer.Argument(metavar="IN", help="Training checkpoint (.pt/.pth/"
                                        ".safetensors).", show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", metavar="MODULE:CALLABLE",
    help="Builds the architecture when IN holds only weights, e.g. mypkg.models:repvgg_a0. "
    "Modules in the current folder are importable.")]
KwargsOpt = Annotated[str | None, typer.Option(
    "--model-kwargs", metavar="JSON", help="Keyword arguments for --model, e.g. "
    "'{\"num_classes\": 10}'.")]
ShapeOpt = Annotated[str | None, typer.Option(
    "--input-shape", metavar="N,C,H,W", help="Shape of the random verification input. Default: "
    "the shape recorded in the checkpoint.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout (human output goes to stderr).")]
RtolOpt = Annotated[float | None, typer.Option(
    "--rtol", help="Allowed error relative to each output's max |value|, as a fixed bar. "
    "Default: the original also runs in float64 and the bar is its own rounding noise times 8 "
    "(fp32; for fp16/bf16 models, compared in float32, 2x that noise scaled to their unit), "
    "at least 1e-5 fp32, 1e-9 fp64, 5e-3 fp16, 2e-2 bf16.")]
AtolOpt = Annotated[float, typer.Option("--atol", help="Allowed absolute error on top of rtol.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random verification inputs "
                                        "(0 to 2**32 - 1).")]
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", metavar="FILE", help="Sample inputs to compare on as well (real data): a .pt "
    "(loaded weights-only) or .safetensors file holding a tensor, a tuple of tensors (one per "
    "model input) or a dict with one tensor; floating point.", show_default=False)]
RewriteRtolOpt = Annotated[float | None, typer.Option(
    "--rewrite-rtol", help="Allowed error of each fused conv against the ops it replaced, at "
    "every output element relative to the sum of |weight * input| + |bias| it adds up. Default "
    "by dtype: 1e-4 fp32, 1e-3 fp16, 4e-3 bf16 (their rounding is 6e-8, 4.9e-4, 3.9e-3).")]
QuantOpt = Annotated[bool, typer.Option(
    "--quant", help="Add the INT8 readiness report: each fused conv's weight ranges, outlier "
    "channels and largest BN scale, and the simulated INT8 error of the model and of each layer "
    "alone, calibrated on the verification inputs (or --inputs).")]
QuantTargetOpt = Annotated[float | None, typer.Option(
    "--quant-target", help=f"Error target of the --quant verdict (which layers to keep in fp16). "
    f"Default {DEFAULT_TARGET:g}.", show_default=False)]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Fail with exit code 4, writing nothing, when a BatchNorm next to a conv is "
    "left unfused (one a hand-written deploy form would fold): for CI steps that must not ship "
    "a model fused only in part.")]
KeepSharedOpt = Annotated[bool, typer.Option(
    "--keep-shared", help="Keep a layer called at several sites (a detection head's conv applied "
    "to every pyramid level) shared: its BatchNorms stay. Default: each site gets a fused copy "
    "of its own (the same ops, no BatchNorm, more parameters; the report says how many).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow a pickled nn.Module as IN, and a .pt2 DEPLOY holding pickled "
    "entries or non-aten ops. Unpickling runs code from the file: only for files you trust.")]


ShapesOpt = Annotated[str | None, typer.Option(
    "--shapes", metavar="N,C,H,W;...", help="The sizes to verify at besides the example, "
    "separated by ';' (one shape per input, joined by '+', for a model with several inputs). "
    "Default: batch 2, and a smaller, an odd and a larger spatial size.", show_default=False)]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", metavar="SIZE", help="Refuse a forward pass estimated to need more memory "
    "than this (8GB, 512MB). Default: the memory the system has available.",
    show_default=False)]


def _options(model: str | None, model_kwargs: str | None, input_shape: str | None,
             shapes: str | None = None, max_memory: str | None = None,
             **typed: Any) -> Options:
    """The library's typed options from the CLI's text: --model-kwargs JSON parsed, --input-shape
    "N,C,H,W", --shapes and --max-memory parsed (each refused as InputError, one line, exit
    2)."""
    return Options(model, parse_kwargs(model_kwargs) if model_kwargs is not None else None,
                   parse_shape(input_shape) if input_shape is not None else None,
                   shapes=parse_shapes(shapes) if shapes is not None else None,
                   max_memory=parse_size(max_memory) if max_memory is not None else None,
                   **typed)


def _jsonable(value: Any) -> Any:
    """Non-finite floats as strings, so every JSON parser accepts the document."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _HeldLogs(logging.Handler):
    """Python warnings and log records (torch's, the model's) raised while a command runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.warnings: list[warnings.WarningMessage] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def show(self) -> None:
        """As they would have been shown: warnings by ``warnings.showwarning``, log records
        by logging's last-resort handler (where no handler of the user's took them)."""
        for caught in self.warnings:
            warnings.showwarning(caught.message, caught.category, caught.filename,
                                 caught.lineno, caught.file, caught.line)
        for record in self.records:
            if logging.lastResort is not None:
                logging.lastResort.handle(record)


@contextlib.contextmanager
def _held_logs() -> Iterator[_HeldLogs]:
    """Hold warnings and library logs while a command runs: shown after it when it succeeds,
    dropped when it fails, so that a refusal is its one error line."""
    held = _HeldLogs()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield held
            held.warnings = list(caught)
    finally:
        root.removeHandler(held)


def _run(as_json: bool, action: Callable[[Progress], Any], exit_code: Callable[[Any], int],
         *, measures_speed: bool = False) -> None:
    """Run ``action`` with a progress line on stderr; render its result; map errors to codes.
    Whatever happens, --json puts exactly one document on stdout: the model's own prints go to
    stderr while it runs. A command that ``measures_speed`` keeps the C library's allocator as
    a user's process has it; the others run faster with the freed memory kept."""
    human = Console(stderr=as_json, highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not measures_speed:
        keep_freed_memory()

    def fail(code: int, message: str, payload: dict[str, Any] | None = None) -> None:
        message = one_line_message(message)
        if as_json:
            _emit_json({**(payload or {"ok": False}), "error": message}, code)
        err.print(Text.assemble(("error:", "bold red"), f" {message}"))
        raise typer.Exit(code)

    try:
        with _sigterm_raises(), contextlib.redirect_stdout(sys.stderr), \
                progress_display(err) as progress, _held_logs() as held:
            result = action(progress)
        held.show()
    except RepconvError as exc:
        outcome = exc.outcome if isinstance(exc, OutcomeError) else None
        if outcome is not None:
            human.print(outcome)
        fail(exc.exit_code, str(exc), outcome.to_dict() if outcome is not None else None)
    except KeyboardInterrupt:
        fail(130, "interrupted: nothing written")
    except Terminated:
        fail(EXIT_SIGTERM, "terminated by SIGTERM: nothing written")
    except Exception as exc:  # a bug: still one line, one JSON document, and a distinct code
        fail(EXIT_INTERNAL, f"internal error in repconv ({type(exc).__name__}: "
                            f"{str(exc).strip()[:200]}); please report it with the command line")
    human.print(result)
    code = exit_code(result)
    if as_json:
        _emit_json(result.to_dict(), code)
    raise typer.Exit(code)


@app.command()
def fuse(
    in_path: InPath,
    out_path: Annotated[Path, typer.Argument(
        metavar="OUT", help="Deploy checkpoint to write; its suffix picks the format: .pt "
        "(state_dict + rewrite plan, or the pickled module for a pickled IN), .safetensors, "
        ".pt2 (torch.export), .onnx (verified in ONNX Runtime; needs repconv[onnx]).",
        show_default=False)],
    model: ModelOpt = None,
    model_kwargs: KwargsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    rtol: RtolOpt = None,
    atol: AtolOpt = 0.0,
    seed: SeedOpt = 0,
    inputs: InputsOpt = None,
    rewrite_rtol: RewriteRtolOpt = None,
    trust_pickle: TrustOpt = False,
    keep_extra: Annotated[bool, typer.Option(
        "--keep-extra", help="Keep training-only entries (optimizer, scheduler, scaler, other "
        "copies of the model) in a .pt OUT.")] = False,
    skip_verify: Annotated[bool, typer.Option(
        "--skip-verify", help="Skip the global verification (the fused model against the "
        "original on seeded inputs); each rewrite is still checked on its own. Run repconv "
        "verify later.")] = False,
    opset: Annotated[int | None, typer.Option(
        "--opset", help="ONNX opset of an .onnx OUT (18 or newer). Default 18.",
        show_default=False)] = None,
    quant: QuantOpt = False,
    quant_target: QuantTargetOpt = None,
    keep_shared: KeepSharedOpt = False,
    strict: StrictOpt = False,
    shapes: ShapesOpt = None,
    max_memory: MaxMemoryOpt = None,
    dtype: Annotated[DeployDtype | None, typer.Option(
        "--dtype", help="Dtype of the deploy model (the model is converted before it is fused "
        "and verified). Default: the model's. For an fp16 EMA that loaders upcast, float32 "
        "keeps the fold's precision; an fp16/bf16 deploy's cost is reported.",
        show_default=False)] = None,
) -> None:
    """Fuse IN into one conv per linear region, verify it, write OUT.

    Exit 0: deploy checkpoint written (verified unless --skip-verify). 1: verification failed
    (nothing written). 2: bad usage or unreadable input (nothing written). 3: internal error.
    4: --strict and a BatchNorm next to a conv was left unfused (nothing written). 130/143:
    interrupted by Ctrl-C/SIGTERM (nothing written).
    """
    _run(
        as_json,
        lambda progress: fuse_checkpoint(in_path, out_path, _options(
            model, model_kwargs, input_shape, shapes, max_memory, rtol=rtol, atol=atol,
            seed=seed, trust_pickle=trust_pickle, inputs_file=inputs, rewrite_rtol=rewrite_rtol,
            unshare=not keep_shared, strict=strict),
            keep_extra=keep_extra,
                                         check=not skip_verify, progress=progress, opset=opset,
                                         quant_target=requested_target(quant, quant_target),
                                         dtype=dtype),
        lambda outcome: 0,
    )


@app.command(short_help="Check that a deploy file computes what its training checkpoint "
             "does (exit 0/1/2).")
def verify(
    original: Annotated[Path, typer.Argument(metavar="ORIGINAL", help="Training checkpoint.",
                                             show_default=False)],
    deploy: Annotated[Path, typer.Argument(metavar="DEPLOY", help="Deploy checkpoint written "
                                           "by repconv fuse (.onnx runs in ONNX Runtime).",
                                           show_default=False)],
    model: ModelOpt = None,
    model_kwargs: KwargsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    rtol: RtolOpt = None,
    atol: AtolOpt = 0.0,
    seed: SeedOpt = 0,
    inputs: InputsOpt = None,
    rewrite_rtol: RewriteRtolOpt = None,
    trust_pickle: TrustOpt = False,
    shapes: ShapesOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Check that DEPLOY computes what ORIGINAL does: every output on seeded random inputs at
    the recorded shape, batch 2 and a smaller, an odd and a larger spatial size, or --shapes
    (and on --inputs), and each fused conv against the ops it replaced.

    Exit 0: outputs and rewrites agree within tolerance. 1: they do not, or nothing could be
    compared. 2: bad usage or unreadable input. 3: internal error.
    """
    _run(
        as_json,
        lambda progress: verify_checkpoints(original, deploy, _options(
            model, model_kwargs, input_shape, shapes, max_memory, rtol=rtol, atol=atol,
            seed=seed, trust_pickle=trust_pickle, inputs_file=inputs, rewrite_rtol=rewrite_rtol),
            progress=progress),
        lambda outcome: 0 if outcome.report.passed else 1,
    )


@app.command(short_help="List what would be fused and what would not, and why; --quant: "
             "INT8 readiness.")
def inspect(
    in_path: InPath,
    model: ModelOpt = None,
    model_kwargs: KwargsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quant: QuantOpt = False,
    quant_target: QuantTargetOpt = None,
    inputs: InputsOpt = None,
    seed: SeedOpt = 0,
    keep_shared: KeepSharedOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """List what would be fused and what would not, and why (with --quant: how each fused conv
    will take INT8 quantization). Writes nothing.

    Exit 0: listed. 2: bad usage or unreadable input. 3: internal error.
    """
    def action(progress: Progress) -> Any:
        options = _options(model, model_kwargs, input_shape, max_memory=max_memory, seed=seed,
                           trust_pickle=trust_pickle, inputs_file=inputs,
                           unshare=not keep_shared)
        outcome = fuse_checkpoint(in_path, None, options, check=False, progress=progress,
                                  quant_target=requested_target(quant, quant_target))
        outcome.report.show_rewrites = True
        return outcome

    _run(as_json, action, lambda outcome: 0)


@app.command(short_help="Time a model against its fused form on this machine, with op "
             "counts and memory.")
def bench(
    in_path: InPath,
    out_path: Annotated[Path | None, typer.Argument(
        metavar="[OUT]", help="Deploy file to time as loaded (.pt, .safetensors, .pt2, or .onnx "
        "in an ONNX Runtime session); without it, IN is fused in memory.",
        show_default=False)] = None,
    model: ModelOpt = None,
    model_kwargs: KwargsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    seconds: Annotated[float, typer.Option(
        "--seconds", help="Time budget of the timed rounds (at least 5 rounds run).")] = 10.0,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch intra-op threads. Default: torch's (the cores it sees).")] = None,
    trust_pickle: TrustOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Time IN's model against its fused form on this machine: latency (warm-up, interleaved
    rounds, median and spread), aten ops executed, parameters, MACs, peak memory (for an .onnx
    OUT, ONNX Runtime's latency with --threads threads; its other figures are not torch's).

    Exit 0: measured. 2: bad usage or unreadable input. 3: internal error.
    """
    _run(
        as_json,
        lambda progress: bench_checkpoint(in_path, out_path, _options(
            model, model_kwargs, input_shape, max_memory=max_memory, trust_pickle=trust_pickle),
            seconds=seconds, threads=threads, progress=progress),
        lambda outcome: 0,
        measures_speed=True,
    )


@app.command()
def version() -> None:
    """Print repconv's version."""
    typer.echo(__version__)


def _reflowed(doc: str) -> str:
    """A docstring's paragraphs, each on one line: Typer keeps the source's line breaks in all
    but the first, which breaks them mid-sentence at any terminal width."""
    return "\n\n".join(" ".join(p.split()) for p in cleandoc(doc).split("\n\n"))


for _command in app.registered_commands:
    _command.help = _reflowed(_command.callback.__doc__ or "")
