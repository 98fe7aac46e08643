"""Fixtures shared by the CLI and checkpoint tests: the shipped sample checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@pytest.fixture(scope="session")
def repvgg_ckpt() -> Path:
    """sample_checkpoints/repvgg_tiny.pt: {'state_dict', 'optimizer', 'epoch', 'arch', ...}."""
    path = SAMPLE_DIR / "repvgg_tiny.pt"
    assert path.is_file(), f"{path} missing; run `make samples`"
    return path


@pytest.fixture(scope="session")
def resnet_ckpt() -> Path:
    """sample_checkpoints/resnet_tiny.pt, same layout as repvgg_tiny.pt."""
    path = SAMPLE_DIR / "resnet_tiny.pt"
    assert path.is_file(), f"{path} missing; run `make samples`"
    return path
