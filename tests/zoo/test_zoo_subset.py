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
    REPCONV,
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


# Where timm has no deploy form for the Conv-BN pairs (h leaves them all), the bar above cannot
# see a BatchNorm repconv stopped folding: these counts are repconv's own, from `make zoo`.
REPCONV_BATCHNORMS = {"efficientvit_b0": 0, "efficientnet_b0": 0, "resnet18": 0,
                      "mobilenetv3_small_050": 0}


@pytest.mark.parametrize("name", list(REPCONV_BATCHNORMS))
def test_conv_bn_models_leave_no_batchnorm(name: str) -> None:
    comparison = compare(BY_NAME[name], SUBSET_SIZES)
    assert comparison.ops[REPCONV].batchnorms == REPCONV_BATCHNORMS[name], _describe(comparison)
