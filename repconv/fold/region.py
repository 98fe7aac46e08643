"""A linear region: a connected set of lowered nodes with one input (its root) and one output
(its sink) whose value is one `Affine` of the root."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from repconv.fold.algebra import Affine
from repconv.fold.rules import LinearOp

CONV_LABELS = ("Conv1d", "Conv2d", "Conv3d", "conv1d", "conv2d", "conv3d", "Linear", "linear",
               "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


@dataclass(frozen=True)
class Region:
    root: fx.Node
    sink: fx.Node
    members: tuple[fx.Node, ...]
    ops: tuple[LinearOp, ...]  # each member's op, which `fold_region` folds
    affine: Affine  # geometry only: shape, groups, strides (`fold_region` has the numbers)
    # the region computes its input unchanged: its numbers say, so analysis leaves it False and
    # the fold of a region with convs decides (`Converter`)
    identity: bool
    labels: tuple[str, ...]
    macs_before: int
    macs_after: int
    chain: bool  # every member has one input: each can be rewritten where it runs
    sources: tuple[fx.Node, ...]  # in a chain, what each member reads
    passthrough: tuple[bool, ...]  # which members pass their input on at no cost (views, ...)
    tail: tuple[fx.Node, ...] = ()  # free identities after the sink, left where they run
    # maps applied after the members': the slice of a per-channel map after a concat of this
    # region's value and others', which the concat's parts absorb (MixConv's BN)
    then: tuple[Affine, ...] = ()
    # regions applied all or none: the parts of such a concat, and the map they absorb
    group: int = 0
    absorbed: bool = False  # its members become the identity: other regions of its group hold it

    @property
    def convs(self) -> int:
        return sum(label in CONV_LABELS for label in self.labels)

    @property
    def kind(self) -> str:
        if self.absorbed:
            return "absorbed by the parts of a concat"
        if self.identity:
            return "identity removed"
        if any(label in ("add", "sub", "cat") for label in self.labels):
            return "multi-branch"
        if self.convs > 1:
            return "conv chain"
        if self.convs == 1:
            has_bn = any("norm" in label.lower() for label in self.labels)
            return "conv+bn" if has_bn else "conv+affine"
        return "affine merge"
