"""Tests for the sample architectures and the shipped sample checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from repconv import samples
from repconv.formats.build import build_model
from repconv.pipeline import Options, fuse_checkpoint
from repconv.samples import make as make_samples

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = samples.SAMPLES
SAMPLE_DIR = ROOT / "sample_checkpoints"
CHECKPOINT_KEYS = {"state_dict", "optimizer", "epoch", "arch", "arch_kwargs", "input_shape"}
EXPECTED_CLASS = {"repvgg_tiny": "RepVGGTiny", "resnet_tiny": "ResNetTiny"}
NAMES = sorted(SAMPLES)


def _load(spec: samples.SampleSpec) -> dict:
    path = SAMPLE_DIR / spec.filename
    assert path.is_file(), f"{path} missing; run `python -m repconv.samples.make`"
    return torch.load(path, weights_only=True)


def test_samples_registry() -> None:
    """SAMPLES entries are consistent with their keys and file names."""
    assert set(SAMPLES) == set(EXPECTED_CLASS)
    for name, spec in SAMPLES.items():
        assert spec.name == name
        assert spec.builder == f"repconv.samples:{name}"
        assert spec.filename == f"{name}.pt"
        assert spec.input_shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_builder_output_shape(name: str) -> None:
    """Each builder resolves, builds the expected class and gives (1, num_classes)."""
    spec = SAMPLES[name]
    torch.manual_seed(0)
    model = build_model(spec.builder, spec.kwargs)
    assert type(model).__name__ == EXPECTED_CLASS[name]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(spec.input_shape))
    assert out.shape == (1, spec.num_classes)


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "has_identity"),
    [(8, 8, 1, True), (8, 16, 1, False), (8, 8, 2, False), (8, 16, 2, False)],
)
def test_repvgg_block_structure(cin: int, cout: int, stride: int, has_identity: bool) -> None:
    """RepVGGBlock branches have the documented names, kernels, paddings and biases."""
    block = samples.RepVGGBlock(cin, cout, stride)
    assert (block.rbr_identity is not None) == has_identity
    if has_identity:
        assert isinstance(block.rbr_identity, nn.BatchNorm2d)
    for branch, k, pad in ((block.rbr_dense, 3, 1), (block.rbr_1x1, 1, 0)):
        assert isinstance(branch.conv, nn.Conv2d)
        assert isinstance(branch.bn, nn.BatchNorm2d)
        assert branch.conv.bias is None
        assert branch.conv.kernel_size == (k, k)
        assert branch.conv.padding == (pad, pad)
        assert branch.conv.stride == (stride, stride)
    x = torch.randn(2, cin, 8, 8)
    assert block(x).shape == (2, cout, 8 // stride, 8 // stride)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_file(name: str) -> None:
    """Shipped checkpoint: weights_only load, keys, strict load, trained BN statistics."""
    spec = SAMPLES[name]
    path = SAMPLE_DIR / spec.filename
    ckpt = _load(spec)
    assert path.stat().st_size < 2 * 1024 * 1024
    assert set(ckpt) == CHECKPOINT_KEYS
    assert ckpt["arch"] == spec.builder
    assert ckpt["arch_kwargs"] == spec.kwargs
    assert ckpt["input_shape"] == list(spec.input_shape)
    assert ckpt["epoch"] == make_samples.EPOCHS
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert len(ckpt["optimizer"]["state"]) > 0  # momentum buffers exist

    model = build_model(ckpt["arch"], ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"], strict=True)

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_var is not None
        assert bn.running_mean is not None
        assert not torch.all(bn.running_var == 1), "running_var untouched by training"
        assert not torch.all(bn.running_mean == 0), "running_mean untouched by training"
        assert int(bn.num_batches_tracked) == make_samples.EPOCHS * make_samples.STEPS_PER_EPOCH

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(ckpt["input_shape"]))
    assert out.shape == (1, spec.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace(name: str) -> None:
    """The sample traces with torch.fx and the traced module matches eager exactly."""
    spec = SAMPLES[name]
    torch.manual_seed(0)
    model = samples.build_sample(spec).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(spec.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_regeneration_is_bit_exact_on_one_machine(name: str, tmp_path: Path) -> None:
    """Two regenerations on this machine give the same bytes. Never compared bit for bit with
    the shipped file: 30 SGD steps amplify the CPU-dependent summation order of float32 convs,
    so another CPU legitimately trains slightly different weights."""
    first, second = (make_samples.write_samples(tmp_path / run, [name], verbose=False)[0]
                     for run in ("first", "second"))
    assert first.final_loss < first.first_loss, "synthetic task should be learnable"
    assert first.size == second.size > 0
    assert _sha256(first.path) == _sha256(second.path)


@pytest.mark.parametrize("name", NAMES)
def test_regeneration_has_the_shipped_structure(name: str, tmp_path: Path) -> None:
    """Same keys, metadata, tensor names, shapes and dtypes as the shipped file; values are
    this machine's own."""
    spec = SAMPLES[name]
    shipped = _load(spec)
    (result,) = make_samples.write_samples(tmp_path, [name], verbose=False)
    regen = torch.load(result.path, weights_only=True)
    assert {k: v for k, v in regen.items() if k not in ("state_dict", "optimizer")} == {
        k: v for k, v in shipped.items() if k not in ("state_dict", "optimizer")
    }
    assert list(regen["state_dict"]) == list(shipped["state_dict"])
    for key, ref in shipped["state_dict"].items():
        got = regen["state_dict"][key]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), key
    assert regen["optimizer"]["param_groups"] == shipped["optimizer"]["param_groups"]
    assert set(regen["optimizer"]["state"]) == set(shipped["optimizer"]["state"])


@pytest.mark.parametrize("name", NAMES)
def test_shipped_sample_looks_trained(name: str) -> None:
    """BN statistics from 30 real steps: finite, positive variances that differ per channel,
    means away from the init; weights moved by SGD (momentum buffers are non-zero)."""
    shipped = _load(SAMPLES[name])
    state = shipped["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    for key in (k for k in state if k.endswith("running_var")):
        var, mean = state[key], state[key.replace("running_var", "running_mean")]
        assert (var > 0).all() and var.std() > 0, key
        assert mean.abs().max() > 1e-3, key
    momenta = [s["momentum_buffer"] for s in shipped["optimizer"]["state"].values()]
    assert momenta and all(m.abs().max() > 0 for m in momenta)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_sample_fuses(name: str) -> None:
    """What the samples are for: every BatchNorm folds, and the fused model verifies."""
    outcome = fuse_checkpoint(SAMPLE_DIR / SAMPLES[name].filename, None, Options())
    assert outcome.report.before.batchnorms > 0
    assert outcome.report.after.batchnorms == 0
    verification = outcome.report.verification
    assert verification.passed and verification.max_rel_error < 1e-5
    assert verification.elements_compared == SAMPLES[name].num_classes
