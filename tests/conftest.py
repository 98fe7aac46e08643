"""Shared fixtures: one torch thread per test process, and the shipped sample checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny convs: with pytest-xdist, torch's intra-op threads only fight each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
