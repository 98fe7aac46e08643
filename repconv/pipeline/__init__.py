"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect, bench."""

from repconv.pipeline.deploy_files import bench_checkpoint, verify_checkpoints
from repconv.pipeline.fusing import fuse_checkpoint
from repconv.pipeline.options import Options
from repconv.pipeline.outcomes import FuseOutcome, VerifyOutcome

__all__ = ["FuseOutcome", "Options", "VerifyOutcome", "bench_checkpoint", "fuse_checkpoint",
           "verify_checkpoints"]
