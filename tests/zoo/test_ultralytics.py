"""The deploy file inside its real framework (issue 16): ultralytics' YOLOv8-n, YOLOv9-t and
YOLOv10-n, built from their yaml (no weights), given trained-looking BatchNorm statistics and
saved as the trainer saves ``best.pt`` (the fp16 EMA in its dict layout), are fused by the
``repconv`` CLI in a real process, written in float32 as the loaders run it (README). Then
ultralytics' own ``YOLO(deploy).predict(image)`` runs (its loader upcasts and calls its own
``fuse()``, which must be an exact no-op on what repconv folded), the raw head outputs match
the original's, and ``copy.deepcopy`` of the deploy model runs; so do the reference framework's
loader, fuse() and EMA (tests/helpers/reference_framework.py). Nothing reaches the network:
ultralytics runs offline, with its settings in a temp folder.

Needs ultralytics: runs under .venv-zoo (`make zoo-env test-zoo`); skipped where it is missing.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.cli_support import run_process
from helpers.reference_framework import ModelEMA, attempt_load
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repconv.fold.slot import is_identity_slot

# before ultralytics is imported: no connectivity check, settings outside the home folder
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repconv-yolo-settings-"))
ultralytics = pytest.importorskip("ultralytics")

MODELS = ("yolov8n", "yolov9t", "yolov10n")
SIZE = 32  # the stride-32 grid is 1x1: the smallest input every level accepts


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every attempt to open a connection is recorded and fails."""
    attempts: list[Any] = []

    def refuse(*args: Any, **_kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("no network in the zoo tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda _self, *a: refuse(*a))
    yield attempts
    assert not attempts, f"ultralytics tried to reach the network: {attempts}"


def trained_statistics(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters of the ranges training leaves, far from the
    identity (so a fold that drops one shows), mild enough for 100+ layers in fp16."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            sign = torch.where(torch.rand(c, generator=generator) < 0.5, -1.0, 1.0)
            module.running_mean.copy_(sign * (0.1 + torch.rand(c, generator=generator)))
            module.running_var.copy_(0.3 + 2.5 * torch.rand(c, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.5)
    return model.eval()


def trainer_best_pt(model: nn.Module, path: Path) -> None:
    """The dict ultralytics' trainer writes (BaseTrainer.save_model): the EMA in fp16, the live
    model None, optimizer state and the run's records."""
    ema = copy.deepcopy(model).half()
    torch.save({
        "epoch": 9, "best_fitness": 0.42, "stopper": {"best_fitness": 0.42, "best_epoch": 9},
        "model": None, "ema": ema, "updates": 120, "modelopt": None,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.937}]},
        "scaler": {}, "train_args": {"model": "yolo.yaml", "imgsz": SIZE, "epochs": 10},
        "train_metrics": {"metrics/mAP50(B)": 0.42, "fitness": 0.42}, "train_results": {},
        "date": "2026-12-01T00:00:00", "version": ultralytics.__version__,
    }, path)


def head_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        leaves, _ = tree_flatten(model(x.clone()))
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def relative_error(expected: list[Tensor], got: list[Tensor]) -> float:
    assert [e.shape for e in expected] == [g.shape for g in got]
    return max(float((e.double() - g.double()).abs().max() / e.double().abs().max())
               for e, g in zip(expected, got))


@pytest.mark.parametrize("name", MODELS)
def test_deploy_file_runs_in_ultralytics(name: str, tmp_path: Path) -> None:
    from ultralytics import YOLO

    trained = trained_statistics(YOLO(f"{name}.yaml").model, seed=len(name))
    best, deploy = tmp_path / "best.pt", tmp_path / "deploy.pt"
    trainer_best_pt(trained, best)
    proc = run_process([sys.executable, "-m", "repconv", "fuse", best, deploy, "--trust-pickle",
                        "--dtype", "float32", "--input-shape", f"1,3,{SIZE},{SIZE}", "--json"],
                       tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["verification"]["passed"] and report["rewrites"], report["notes"]

    # the raw head outputs, as the framework's loader runs them (upcast to float32)
    original = torch.load(best, weights_only=False)["ema"].float().eval()
    fused = torch.load(deploy, weights_only=False)["ema"].float().eval()
    x = torch.randn(2, 3, SIZE * 2, SIZE * 2, generator=torch.Generator().manual_seed(1))
    expected = head_outputs(original, x)
    assert relative_error(expected, head_outputs(fused, x)) < 1e-5

    # the framework's own fuse() folds each slot into its conv: an exact no-op there (and it
    # folds what repconv left, its own way)
    folded = {name: (m, m.conv.weight.clone(), m.conv.bias.clone())
              for name, m in fused.named_modules() if is_identity_slot(getattr(m, "bn", None))}
    assert folded, "no folded BatchNorm left a slot"
    reference = copy.deepcopy(fused)
    fused.fuse(verbose=False)
    assert not any(is_identity_slot(m) for m in fused.modules())
    kept = {id(m) for m in fused.modules()}  # v10's head drops its unused branch
    for name, (layer, weight, bias) in folded.items():
        if id(layer) not in kept:
            continue
        assert not hasattr(layer, "bn"), name
        assert torch.equal(layer.conv.weight, weight) and torch.equal(layer.conv.bias, bias), name
    # what the framework makes of the original (v10's head drops its unused branch)
    framework_original = copy.deepcopy(original).fuse(verbose=False)
    assert relative_error(head_outputs(framework_original, x), head_outputs(fused, x)) < 1e-5
    assert relative_error(expected, head_outputs(reference, x)) < 1e-5  # the copy runs

    # the reference framework's loader (its own fuse), and its EMA copy
    framework_model = attempt_load(deploy)
    assert relative_error(head_outputs(framework_original, x),
                          head_outputs(ModelEMA(framework_model).ema, x)) < 1e-5

    # the user's path: YOLO(deploy) loads, fuses again and predicts on an in-memory image
    yolo = YOLO(str(deploy))
    image = (np.random.default_rng(0).random((SIZE * 2, SIZE * 2, 3)) * 255).astype(np.uint8)
    results = yolo.predict(image, imgsz=SIZE * 2, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    assert yolo.predictor.model.model.is_fused()
    copy.deepcopy(yolo.model)
