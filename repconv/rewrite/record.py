"""The record of one rewrite: which ops were folded into which conv, where, at what cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewriteRecord:
    """One region folded into one conv."""

    scope: str
    module: str | None
    kind: str
    ops: list[str]
    kernel_size: list[int]
    groups: int
    macs_before: int
    macs_after: int
    local_error: float
    replaced: str = ""  # the node whose value the fused op now computes
    fused_module: str | None = None  # where the fused conv lives in the fused model
    sources: list[str] = field(default_factory=list)  # the module running each op, in order
