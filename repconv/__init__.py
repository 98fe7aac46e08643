"""repconv: fold Conv-BN pairs and linear multi-branch blocks into single convolutions."""

from repconv.checkpoint import load_deploy
from repconv.errors import (
    AlgebraError,
    InputError,
    ModelBuildError,
    RepconvError,
    TraceError,
    VerificationError,
)
from repconv.fuse import FuseResult, fuse
from repconv.report import FuseReport
from repconv.verify import VerifyReport, verify

__all__ = [
    "AlgebraError",
    "FuseReport",
    "FuseResult",
    "InputError",
    "ModelBuildError",
    "RepconvError",
    "TraceError",
    "VerificationError",
    "VerifyReport",
    "fuse",
    "load_deploy",
    "verify",
]
__version__ = "0.1.0"
