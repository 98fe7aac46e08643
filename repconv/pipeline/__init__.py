"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect, bench."""

from repconv.pipeline.commands import (
    Options,
    bench_checkpoint,
    fuse_checkpoint,
    verify_checkpoints,
)
from repconv.pipeline.outcomes import FuseOutcome, VerifyOutcome

__all__ = ["FuseOutcome", "Options", "VerifyOutcome", "bench_checkpoint", "fuse_checkpoint",
           "verify_checkpoints"]
