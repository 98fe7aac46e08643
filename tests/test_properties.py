"""Property: any block of parallel conv(+BN) branches, summed or concatenated, with or without an
identity branch, either folds to exactly one conv computing the same thing, or is left with a
stated reason that is true of the block; the fused model always verifies.

A block folds exactly when every branch (the identity counts as a 1x1 conv, stride 1, pad 0) has
the same stride and the same ``extent - 2 * padding`` per spatial dim: then every branch reads
the same window of the input, centred alike. torch itself can add branches that violate this
(stride 2 floors output sizes together), and those must be refused, not folded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from helpers.measure import count_bns, count_convs, rel_err
from helpers.reference_blocks import randomize_bn
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import repconv

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


@dataclass(frozen=True)
class Branch:
    out_channels: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    bias: bool
    bn: bool

    @property
    def shrink(self) -> tuple[int, ...]:
        """extent - 2 * padding per dim: branches agree on it iff their windows share centres."""
        return tuple(
            d * (k - 1) + 1 - 2 * p for k, d, p in zip(self.kernel, self.dilation, self.padding)
        )


@dataclass(frozen=True)
class Spec:
    in_channels: int
    spatial: tuple[int, ...]
    mode: str  # "sum" or "cat"
    branches: tuple[Branch, ...]
    identity: bool
    seed: int

    @property
    def nd(self) -> int:
        return len(self.spatial)

    def strides(self) -> set[tuple[int, ...]]:
        found = {b.stride for b in self.branches}
        return found | {(1,) * self.nd} if self.identity else found

    def shrinks(self) -> set[tuple[int, ...]]:
        found = {b.shrink for b in self.branches}
        return found | {(1,) * self.nd} if self.identity else found

    def foldable(self) -> bool:
        return len(self.strides()) == 1 and len(self.shrinks()) == 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _output_size(n: int, k: int, d: int, p: int, s: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """Branches are steered towards one output size (else torch cannot add them), and among the
    paddings that reach it, most often towards the one that is also aligned; the rest are the
    same-shape-but-not-foldable cases (stride 2 floors sizes together) and free draws."""
    nd = draw(st.sampled_from([2, 2, 1]))
    cin = draw(st.sampled_from([2, 4, 6]))
    spatial = tuple(draw(st.integers(6, 10)) for _ in range(nd))
    mode = draw(st.sampled_from(["sum", "cat"]))
    count = draw(st.sampled_from([2, 2, 3, 4, 1]))
    sum_out = draw(st.sampled_from([cin, cin, 2, 4]))
    identity = draw(st.booleans()) and (mode == "cat" or sum_out == cin)
    shared_stride = draw(st.integers(0, 2)) > 0
    stride0 = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(nd))
    # what every branch should produce, and the stride and shrink of the first branch
    target: tuple[int, ...] | None = spatial if identity else None
    reference: tuple[tuple[int, int], ...] | None = ((1, 1),) * nd if identity else None
    branches = []
    for _ in range(count):
        cout = sum_out if mode == "sum" else draw(st.sampled_from([2, 4]))
        steer = draw(st.integers(0, 9)) > 0
        prefer_aligned = draw(st.integers(0, 3)) > 0
        kernel, dilation, padding, stride = [], [], [], []
        for dim in range(nd):
            n = spatial[dim]
            k, d = draw(st.integers(1, 5)), draw(st.integers(1, 2))
            extent = d * (k - 1) + 1
            fits = [p for p in range(4) if n + 2 * p >= extent] or [math.ceil((extent - n) / 2)]
            strides = [stride0[dim]] if shared_stride else [1, 2]
            same_size = [
                (s, p)
                for s in strides
                for p in fits
                if target is not None and _output_size(n, k, d, p, s) == target[dim]
            ]
            aligned = [
                (s, p)
                for s, p in same_size
                if reference is not None and (s, extent - 2 * p) == reference[dim]
            ]
            if steer and aligned and prefer_aligned:
                s, p = aligned[0]
            elif steer and same_size:
                s, p = draw(st.sampled_from(same_size))
            else:
                s, p = draw(st.sampled_from(strides)), draw(st.sampled_from(fits))
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
            stride.append(s)
        branch = Branch(
            out_channels=cout,
            kernel=tuple(kernel),
            dilation=tuple(dilation),
            padding=tuple(padding),
            stride=tuple(stride),
            groups=draw(st.sampled_from(_divisors(math.gcd(cin, cout)))),
            bias=draw(st.booleans()),
            bn=draw(st.integers(0, 3)) > 0,
        )
        if target is None:
            target = tuple(
                _output_size(n, k, d, p, s)
                for n, k, d, p, s in zip(spatial, kernel, dilation, padding, stride)
            )
            reference = tuple(zip(branch.stride, branch.shrink))
        branches.append(branch)
    return Spec(cin, spatial, mode, tuple(branches), identity, draw(st.integers(0, 2**16)))


class RandomBlock(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.mode = spec.mode
        self.identity = spec.identity
        self.branches = nn.ModuleList()
        for b in spec.branches:
            branch = nn.Sequential(
                CONV[spec.nd](
                    spec.in_channels,
                    b.out_channels,
                    b.kernel,
                    stride=b.stride,
                    padding=b.padding,
                    dilation=b.dilation,
                    groups=b.groups,
                    bias=b.bias,
                )
            )
            if b.bn:
                branch.append(BN[spec.nd](b.out_channels))
            self.branches.append(branch)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.identity:
            outs.append(x)
        if self.mode == "cat":
            return torch.cat(outs, dim=1)
        out = outs[0]
        for y in outs[1:]:
            out = out + y
        return out


def _tuples(text: str) -> list[tuple[int, ...]]:
    return [
        tuple(int(v) for v in t.split(",") if v.strip()) for t in re.findall(r"\(([\d, ]+)\)", text)
    ]


def check_reason(reason: str, spec: Spec) -> None:
    """The stated reason is true of the block."""
    if reason.startswith("stride mismatch"):
        a, b = _tuples(reason)
        assert a != b, reason
        assert {a, b} <= spec.strides(), (reason, spec.strides())
    elif "padding misaligned in dim" in reason:
        dim = int(re.search(r"in dim (\d+)", reason).group(1))
        assert len({s[dim] for s in spec.shrinks()}) > 1, (reason, spec.shrinks())
    else:
        raise AssertionError(f"unexpected refusal for a block of linear branches: {reason}")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(specs())
def test_random_linear_block_folds_or_says_why(spec: Spec) -> None:
    torch.manual_seed(spec.seed)
    model = randomize_bn(RandomBlock(spec), seed=spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    example = torch.randn((2, spec.in_channels, *spec.spatial), generator=gen)
    fresh = torch.randn((2, spec.in_channels, *spec.spatial), generator=gen)
    with torch.no_grad():
        outs = [branch(fresh) for branch in model.branches] + ([fresh] if spec.identity else [])
    # torch must combine the branches without broadcasting (a size-1 dim would broadcast)
    assume(len({o.shape[2:] for o in outs}) == 1)
    if spec.mode == "sum":
        assume(len({o.shape for o in outs}) == 1)
    with torch.no_grad():
        expected = model(fresh)

    result = repconv.fuse(model, example)

    assert result.report.verification.passed, (result.report.verification, spec)
    assert count_bns(result.model) == 0, spec  # every branch's own BN folds in any case
    with torch.no_grad():
        got = result.model(fresh)
    assert rel_err(expected, got) < 1e-5, spec
    reasons = [s.reason for s in result.report.skipped]
    event(
        f"{spec.mode}, {len(spec.branches) + spec.identity} branches, "
        f"{'folds' if spec.foldable() else 'refused'}"
    )
    merged_costs_more = [r for r in reasons if r.startswith("cost:")]
    for reason in merged_costs_more:  # never slower: a merge may not add multiply-accumulates
        merged, branches = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+(?= MACs)|"
                                                                          r"(?<=merges )[\d,]+",
                                                                          reason))
        assert merged > branches, reason
    if spec.foldable() and not merged_costs_more:
        assert count_convs(result.model) == 1, (reasons, spec)
        assert reasons == [], spec
    elif spec.foldable():  # several convs, or one conv and the identity branch beside it
        assert count_convs(result.model) + spec.identity > 1, spec
    else:
        # not one conv: several convs remain, or one conv and the identity branch beside it
        assert count_convs(result.model) + spec.identity > 1, spec
        assert reasons, spec
        for reason in set(reasons) - set(merged_costs_more):  # a cost refusal is checked above
            event(reason.split(":")[0])
            check_reason(reason, spec)
