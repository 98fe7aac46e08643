"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes.

Every message says what is wrong and what to do next, on one line.
"""

from __future__ import annotations

import reprlib


class RepconvError(Exception):
    """Base class of every error repconv raises on purpose."""

    exit_code = 2


class InputError(RepconvError):
    """A file, option or model given by the user cannot be used (exit code 2)."""


class ModelBuildError(InputError):
    """The architecture named by --model cannot be imported, called or filled with weights."""


class TraceError(RepconvError):
    """The model cannot be traced or run on the example input. ``failed_in``: the path (in the
    module traced) of the innermost module whose forward stopped the trace, when known."""

    def __init__(self, message: str, failed_in: str = "") -> None:
        super().__init__(message)
        self.failed_in = failed_in


class AlgebraError(RepconvError):
    """Two linear maps cannot be combined into one exact convolution; the message is the reason."""


class DeployCheckError(RepconvError):
    """The deploy file repconv made does not load back, or computes otherwise once loaded: a
    bug in repconv (exit code 3), caught before anything is written."""

    exit_code = 3


class OutcomeError(RepconvError):
    """A command that ran but must not pass; ``outcome`` is its result, for the caller to
    show."""

    def __init__(self, message: str, outcome: object = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class VerificationError(OutcomeError):
    """The fused model's outputs do not match the original's (exit code 1)."""

    exit_code = 1


class StrictError(OutcomeError):
    """``--strict``: a BatchNorm a hand-written deploy form would fold was left unfused (exit
    code 4)."""

    exit_code = 4


def one_line(exc: BaseException, limit: int = 200, *, last: bool = False) -> str:
    """An exception as one line for a message: its first (or ``last``) non-empty line, cut to
    ``limit`` characters; its type name when it has no message. Library code quoting the cause
    of a failure (torch's, the model's own) uses this, so no message grows a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 80, 80


def brief(value: object, limit: int = 80) -> str:
    """A value read from a file, for a message: its repr bounded in depth, items and length,
    whatever it holds (a list nested 10,000 deep, or one holding itself, would make ``repr``
    recurse or run for ever)."""
    return _BRIEF.repr(value)[:limit]
