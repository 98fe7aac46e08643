"""The CI subset of the timm zoo (benchmarks/zoo_models.py), one test per model: repconv leaves
no more BatchNorm ops and runs no more convs than timm's hand-written deploy form
(``reparameterize_model``), and matches the training model within 1e-4 (scale-relative) at the
fuse input, at batch 2 and at another input size. Latency is benchmarks/zoo.py's job.

Needs timm: runs under .venv-zoo (`make zoo-env test-zoo`); skipped where timm is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from zoo_models import (
    BY_NAME,
    SUBSET,
    SUBSET_SIZES,
    Comparison,
    compare,
    correctness_failures,
)


def _describe(comparison: Comparison) -> str:
    ops = ", ".join(f"{form} {counts.convs} convs {counts.batchnorms} BNs"
                    for form, counts in comparison.ops.items())
    return (f"ops: {ops}; repconv errors {comparison.errors}; hand-written errors "
            f"{comparison.hand_written_errors}; float32 noise {comparison.float32_noise}; "
            f"problems {comparison.problems}")


@pytest.mark.parametrize("name", SUBSET)
def test_repconv_matches_hand_written_deploy_form(name: str) -> None:
    comparison = compare(BY_NAME[name], SUBSET_SIZES)
    failures = correctness_failures(comparison)
    assert not failures, f"{name} fails {', '.join(failures)}; {_describe(comparison)}"
