"""Shared fixtures and markers: one torch thread per test process, the shipped sample
checkpoints, and ``needs_onnx`` (skipped where the repconv[onnx] extra is not installed).
Shared code lives in ``tests/helpers``."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_checkpoints"
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_onnx: needs the repconv[onnx] extra; skipped where it is missing")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if all(importlib.util.find_spec(name) is not None for name in ONNX_EXTRA):
        return
    skip = pytest.mark.skip(reason="the repconv[onnx] extra is not installed")
    for item in items:
        if "needs_onnx" in item.keywords:
            item.add_marker(skip)


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
