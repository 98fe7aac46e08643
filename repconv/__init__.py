"""repconv: fold Conv-BN pairs and linear multi-branch blocks into single convolutions."""

from repconv.driver.report import FuseReport
from repconv.errors import (
    AlgebraError,
    InputError,
    ModelBuildError,
    RepconvError,
    StrictError,
    TraceError,
    VerificationError,
)
from repconv.formats.deploy import load_deploy
from repconv.fuse import FuseResult, fuse
from repconv.verify.outputs import verify
from repconv.verify.report import VerifyReport

__all__ = [
    "AlgebraError",
    "FuseReport",
    "FuseResult",
    "InputError",
    "ModelBuildError",
    "RepconvError",
    "StrictError",
    "TraceError",
    "VerificationError",
    "VerifyReport",
    "fuse",
    "load_deploy",
    "verify",
]
__version__ = "0.1.0"
