"""Where the fused module goes in a pickled checkpoint's file: IN's layout is kept (issue 7,
item 5). A detector trainer's checkpoint comes out with the fused module in the slot it came
from, in its dtype, the optimizer dropped and nothing else moved, and loads with that
framework's own kind of loader.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.measure import count_bns, rel_err
from helpers.reference_blocks import randomize_bn
from torch import Tensor, nn

from repconv.formats.checkpoint import load_checkpoint
from repconv.pipeline import Options, fuse_checkpoint, verify_checkpoints
from repconv.pipeline.precision import DeployDtype
from repconv.samples import repvgg_tiny, resnet_tiny

SHAPE = (1, 3, 16, 16)
TRUSTED = Options(trust_pickle=True, input_shape=SHAPE)
OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}


def trained(builder: Callable[..., nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(builder(width=8), seed)


def outputs(model: nn.Module) -> tuple[Tensor, Tensor]:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, model(x)


def yolo_checkpoint(tmp_path: Path) -> tuple[nn.Module, Path]:
    """Ultralytics-style: the live model and its EMA, both pickled; the EMA is the one to use."""
    ema = trained(resnet_tiny, seed=3)
    path = tmp_path / "yolo.pt"
    torch.save({"epoch": 3, "model": trained(resnet_tiny, seed=99), "ema": ema,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}}, path)
    return ema, path


def test_keep_extra_keeps_the_fused_module(tmp_path: Path) -> None:
    original, in_path = yolo_checkpoint(tmp_path)
    out = tmp_path / "deploy.pt"
    fuse_checkpoint(in_path, out, TRUSTED, keep_extra=True)
    payload = torch.load(out, weights_only=False)
    assert list(payload) == ["epoch", "model", "ema", "optimizer"]  # IN's keys, IN's order
    assert payload["epoch"] == 3
    assert payload["optimizer"]["param_groups"] == [{"lr": 0.01}]
    assert count_bns(payload["ema"]) == 0
    assert count_bns(payload["model"]) == count_bns(original) > 0  # the live model, kept as is
    x, expected = outputs(original)
    assert rel_err(expected, payload["ema"](x)) < 1e-5


def test_pickled_module_deploy_drops_training_entries(tmp_path: Path) -> None:
    original, in_path = yolo_checkpoint(tmp_path)
    out = tmp_path / "deploy.pt"
    fuse_checkpoint(in_path, out, TRUSTED)
    deployed = torch.load(out, weights_only=False)
    # the optimizer goes; the live model beside the EMA becomes None; nothing else moves
    assert list(deployed) == ["epoch", "model", "ema"]
    assert deployed["epoch"] == 3 and deployed["model"] is None
    assert count_bns(deployed["ema"]) == 0
    x, expected = outputs(original)
    assert rel_err(expected, deployed["ema"](x)) < 1e-5


def trainer_checkpoint(ema: nn.Module) -> dict[str, object]:
    """What a detector trainer saves mid-run: the live model already stripped to None, the EMA
    in half precision, optimizer state and the run's arguments."""
    return {"model": None, "ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
            "train_args": {"epochs": 3, "imgsz": 16}, "epoch": 7}


def detector_loader(path: Path) -> nn.Module:
    """Written like such frameworks' loaders."""
    ckpt = torch.load(path, weights_only=False)
    return (ckpt.get("ema") or ckpt["model"]).float().eval()


@pytest.mark.parametrize("keep_extra", [False, True], ids=["default", "keep-extra"])
def test_trainer_checkpoint_keeps_its_layout(tmp_path: Path, keep_extra: bool) -> None:
    original = trained(repvgg_tiny, seed=5)
    in_path = tmp_path / "last.pt"
    torch.save(trainer_checkpoint(copy.deepcopy(original).half()), in_path)
    out = tmp_path / "deploy.pt"
    outcome = fuse_checkpoint(in_path, out, TRUSTED, keep_extra=keep_extra)
    assert outcome.report.after.batchnorms == 0

    ckpt = torch.load(out, weights_only=False)
    expected_keys = ["model", "ema", "optimizer", "train_args", "epoch"]
    assert list(ckpt) == (expected_keys if keep_extra else
                          [k for k in expected_keys if k != "optimizer"])
    assert ckpt["model"] is None  # --keep-extra must not put IN's None over the fused model
    assert ckpt["train_args"] == {"epochs": 3, "imgsz": 16} and ckpt["epoch"] == 7
    assert count_bns(ckpt["ema"]) == 0
    assert {p.dtype for p in ckpt["ema"].parameters()} == {torch.float16}  # EMA's own dtype

    loaded = detector_loader(out)
    x, expected = outputs(original)
    with torch.no_grad():
        assert rel_err(expected, loaded(x)) < 5e-3  # the weights went through fp16


def test_model_key_layout_keeps_its_layout(tmp_path: Path) -> None:
    """{'model': module, ...}: the fused module goes back under 'model', where a loader that
    takes ckpt['model'] finds it."""
    original = trained(resnet_tiny, seed=6)
    in_path = tmp_path / "ckpt.pt"
    torch.save({"model": original, "optimizer_state_dict": OPTIMIZER, "epoch": 2,
                "best_acc": 0.5}, in_path)
    out = tmp_path / "deploy.pt"
    fuse_checkpoint(in_path, out, TRUSTED)
    ckpt = torch.load(out, weights_only=False)
    assert list(ckpt) == ["model", "epoch", "best_acc"]
    model = ckpt["model"].eval()
    assert count_bns(model) == 0
    x, expected = outputs(original)
    with torch.no_grad():
        assert rel_err(expected, model(x)) < 1e-5


def test_pickled_deploy_files_record_the_input_shape(tmp_path: Path) -> None:
    """Both pickled layouts (a bare module, the trainer's dict) record the verification input
    shape beside the pickle: `repconv verify` needs no --input-shape, and IN's layout is what
    the user's loader reads."""
    original = trained(repvgg_tiny, seed=8)
    for name, payload in (("bare", original), ("trainer", trainer_checkpoint(original))):
        in_path, out = tmp_path / f"{name}.pt", tmp_path / f"{name}-deploy.pt"
        torch.save(payload, in_path)
        fuse_checkpoint(in_path, out, TRUSTED)
        deployed = load_checkpoint(out, trust_pickle=True)
        assert deployed.input_shape == SHAPE, name
        outcome = verify_checkpoints(in_path, out, Options(trust_pickle=True))
        assert outcome.report.passed and outcome.input_shape_from == "DEPLOY", name
        loaded = torch.load(out, weights_only=False)
        assert isinstance(loaded, nn.Module) if name == "bare" else list(loaded) == [
            "model", "ema", "train_args", "epoch"]


def test_deploy_dtype_and_what_fp16_storage_costs(tmp_path: Path) -> None:
    """An fp16 EMA: the default deploy keeps fp16 and reports its error against the float32
    original beside a float32 deploy's; --dtype float32 writes the float32 one."""
    original = trained(repvgg_tiny, seed=9)
    in_path = tmp_path / "last.pt"
    torch.save(trainer_checkpoint(copy.deepcopy(original).half()), in_path)
    x, _ = outputs(original)
    expected = copy.deepcopy(original).half().float()(x)  # the float32 original: upcast fp16
    errors = {}
    for dtype in (None, DeployDtype.float32, DeployDtype.bfloat16):
        out = tmp_path / f"{dtype}.pt"
        outcome = fuse_checkpoint(in_path, out, TRUSTED, dtype=dtype)
        model = detector_loader(out)  # loads and upcasts, as the trainer's loader does
        stored = next(torch.load(out, weights_only=False)["ema"].parameters()).dtype
        assert stored == (dtype.torch if dtype else torch.float16)
        with torch.no_grad():
            errors[dtype] = rel_err(expected, model(x))
        notes = [n for n in outcome.report.notes if "deploy model is stored in" in n]
        assert bool(notes) == (stored != torch.float32)
        if notes:
            low, full = (float(v) for v in re.findall(r"errs by ([0-9.e+-]+)", notes[0]))
            # measured on the verification input, not on x: the same order
            assert 0.25 < low / errors[dtype] < 4 and full < 1e-5 < low
    assert errors[DeployDtype.float32] < 1e-5 < errors[None] < errors[DeployDtype.bfloat16]
