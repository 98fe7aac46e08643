"""The checkpoint Python API: load_checkpoint / save_deploy / load_deploy and the pipeline
(fuse_checkpoint, verify_checkpoints) over every input layout and output format.

Every deploy file is checked against the original model's outputs (scale-relative error
max|a-b| / max|a| < 1e-5), not against repconv's own verification.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli_support import interrupt_deploy_writes, sha256
from helpers.measure import count_bns, rel_err
from helpers.reference_blocks import randomize_bn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import repconv
from repconv.errors import InputError
from repconv.formats.checkpoint import load_checkpoint
from repconv.formats.deploy import load_deploy
from repconv.pipeline import Options, fuse_checkpoint, verify_checkpoints
from repconv.rewrite.plan import PLAN_VERSION
from repconv.samples import repvgg_tiny, resnet_tiny

SHAPE = (1, 3, 16, 16)
BUILDERS: dict[str, Callable[..., nn.Module]] = {"repvgg": repvgg_tiny, "resnet": resnet_tiny}
DEPLOY_KEYS = {"repconv_deploy", "state_dict", "plan", "arch", "arch_kwargs", "input_shape"}


def trained(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(BUILDERS[arch](width=8), seed)


def fresh(arch: str) -> nn.Module:
    """A newly built training model with other weights: whatever it computes after
    load_deploy came from the file."""
    torch.manual_seed(12345)
    return BUILDERS[arch](width=8)


def outputs(model: nn.Module, seed: int = 7) -> tuple[Tensor, Tensor]:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x)


def weights_only_options(arch: str) -> Options:
    return Options(model=f"repconv.samples:{arch}_tiny", model_kwargs={"width": 8},
                   input_shape=SHAPE)


TRUSTED = Options(trust_pickle=True, input_shape=SHAPE)


# ------------------------------------------------------------------------- input layouts
# name -> (architecture, writer(original, path) -> path, options, what load reports)


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _torch_save(obj_of: Callable[[nn.Module], object]) -> Callable[[nn.Module, Path], Path]:
    def write(model: nn.Module, path: Path) -> Path:
        path = path.with_suffix(".pt")
        torch.save(obj_of(model), path)
        return path

    return write


def _safetensors(model: nn.Module, path: Path) -> Path:
    path = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _yolo(model: nn.Module) -> dict[str, object]:
    """Ultralytics-style: the live model and its EMA, both pickled; the EMA is the one to use."""
    return {"epoch": 3, "model": trained("resnet", seed=99), "ema": model,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}}


OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}

LAYOUTS: dict[str, tuple[str, Callable[[nn.Module, Path], Path], bool, str]] = {
    "bare_state_dict": ("repvgg", _torch_save(lambda m: m.state_dict()), False,
                        "a bare state_dict"),
    "state_dict_key": ("resnet", _torch_save(lambda m: {"state_dict": m.state_dict(),
                                                        "optimizer": OPTIMIZER, "epoch": 3}),
                       False, "state_dict under 'state_dict'"),
    "model_state_dict_key": ("repvgg", _torch_save(
        lambda m: {"model_state_dict": m.state_dict(), "optimizer_state_dict": OPTIMIZER,
                   "epoch": 3}), False, "state_dict under 'model_state_dict'"),
    "dataparallel_prefix": ("resnet", _torch_save(lambda m: _prefixed(m.state_dict(), "module.")),
                            False, "stripped key prefix 'module.'"),
    "lightning_prefix": ("repvgg", _torch_save(
        lambda m: {"state_dict": _prefixed(m.state_dict(), "model."), "epoch": 3,
                   "global_step": 30, "pytorch-lightning_version": "2.4.0"}),
                         False, "stripped key prefix 'model.'"),
    "safetensors": ("resnet", _safetensors, False, "a safetensors state_dict"),
    "pickled_module": ("repvgg", _torch_save(lambda m: m), True, "a pickled RepVGGTiny"),
    "yolo_model_and_ema": ("resnet", _torch_save(_yolo), True,
                           "a pickled ResNetTiny under 'ema'"),
}
FORMATS = (".pt", ".safetensors", ".pt2")


def _write_input(layout: str, folder: Path) -> tuple[nn.Module, Path, Options]:
    arch, write, pickled, _ = LAYOUTS[layout]
    original = trained(arch, seed=len(layout))
    path = write(original, folder / f"{layout}_in")
    return original, path, TRUSTED if pickled else weights_only_options(arch)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("round_trip")


_FUSED: dict[tuple[str, str], tuple[nn.Module, Path, Path, Options, object] | Exception] = {}


def fused_case(workdir: Path, layout: str, fmt: str) -> tuple[nn.Module, Path, Path, Options,
                                                              object]:
    """(original model, IN, OUT, options, outcome), fused once per worker process."""
    key = (layout, fmt)
    if key not in _FUSED:
        folder = workdir / f"{layout}{fmt.replace('.', '_')}"
        folder.mkdir()
        original, in_path, options = _write_input(layout, folder)
        out = folder / f"deploy{fmt}"
        try:
            outcome = fuse_checkpoint(in_path, out, options)
        except Exception as exc:  # remembered: the other test of this case fails the same way
            _FUSED[key] = exc
        else:
            _FUSED[key] = (original, in_path, out, options, outcome)
    cached = _FUSED[key]
    if isinstance(cached, Exception):
        raise cached
    return cached


def load_deployed(layout: str, out: Path) -> nn.Module:
    arch, _, pickled, _ = LAYOUTS[layout]
    if out.suffix == ".pt2":
        return torch.export.load(out).module()
    if out.suffix == ".pt" and pickled:
        deployed = torch.load(out, weights_only=False)
        if isinstance(deployed, dict):  # IN's layout, as a detector trainer's loader reads it
            deployed = deployed.get("ema") or deployed["model"]
        assert isinstance(deployed, nn.Module)
        return deployed.eval()
    return load_deploy(fresh(arch), out)


MATRIX = [
    pytest.param(layout, fmt, id=f"{layout}{fmt}") for layout in LAYOUTS for fmt in FORMATS
]


@pytest.mark.parametrize("layout, fmt", MATRIX)
def test_round_trip(workdir: Path, layout: str, fmt: str) -> None:
    original, in_path, out, _, outcome = fused_case(workdir, layout, fmt)
    in_hash = sha256(in_path)
    assert outcome.ok
    assert outcome.written
    assert LAYOUTS[layout][3] in outcome.loaded
    assert outcome.report.before.batchnorms == count_bns(original) > 0
    assert outcome.report.after.batchnorms == 0
    assert outcome.report.verification.max_rel_error < 1e-5
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([in_path.name, out.name])

    deployed = load_deployed(layout, out)
    x, expected = outputs(original)
    got = deployed(x)
    assert rel_err(expected, got) < 1e-5
    if isinstance(deployed, torch.fx.GraphModule):  # torch.export program
        assert not [n for n in deployed.graph.nodes if "batch_norm" in str(n.target)]
    else:
        assert count_bns(deployed) == 0
    assert sha256(in_path) == in_hash


@pytest.mark.parametrize("layout, fmt", MATRIX)
def test_verify_checkpoints_round_trip(workdir: Path, layout: str, fmt: str) -> None:
    _, in_path, out, options, _ = fused_case(workdir, layout, fmt)
    outcome = verify_checkpoints(in_path, out, options)
    assert outcome.report.passed
    assert outcome.report.max_rel_error < 1e-5
    assert outcome.report.input_shapes == [list(SHAPE)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    original, path, options = _write_input(layout, tmp_path)
    loaded = load_checkpoint(path, model_reference=options.model,
                             model_kwargs=options.model_kwargs or {},
                             trust_pickle=options.trust_pickle)
    assert LAYOUTS[layout][3] in loaded.found
    assert loaded.pickled is LAYOUTS[layout][2]
    assert not loaded.model.training
    assert loaded.deploy_plan is None
    expected = original.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("layout", ["pickled_module", "yolo_model_and_ema"])
def test_pickled_layouts_need_trust(tmp_path: Path, layout: str) -> None:
    _, path, _ = _write_input(layout, tmp_path)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_checkpoint(path)


# ------------------------------------------------------------------------- deploy .pt content


def test_deploy_pt_content_and_extra(repvgg_ckpt: Path, tmp_path: Path) -> None:
    source = torch.load(repvgg_ckpt, weights_only=True)
    plain, kept = tmp_path / "plain.pt", tmp_path / "kept.pt"
    fuse_checkpoint(repvgg_ckpt, plain, Options())
    fuse_checkpoint(repvgg_ckpt, kept, Options(), keep_extra=True)

    deploy = torch.load(plain, weights_only=True)
    assert set(deploy) == DEPLOY_KEYS
    assert deploy["repconv_deploy"] == PLAN_VERSION
    assert deploy["arch"] == source["arch"] == "repconv.samples:repvgg_tiny"
    assert deploy["arch_kwargs"] == source["arch_kwargs"]
    assert deploy["input_shape"] == source["input_shape"] == [1, 3, 32, 32]
    assert isinstance(deploy["plan"], list) and deploy["plan"]
    assert all(isinstance(v, Tensor) for v in deploy["state_dict"].values())

    with_extra = torch.load(kept, weights_only=True)
    assert set(with_extra) == DEPLOY_KEYS | {"optimizer", "epoch"}
    assert with_extra["epoch"] == source["epoch"]
    assert with_extra["optimizer"]["param_groups"] == source["optimizer"]["param_groups"]
    assert with_extra["plan"] == deploy["plan"]
    assert all(torch.equal(with_extra["state_dict"][k], v)
               for k, v in deploy["state_dict"].items())

    # the same fused model as the training checkpoint rebuilt through load_deploy
    original = load_checkpoint(repvgg_ckpt).model
    fused = load_deploy(repvgg_tiny(**source["arch_kwargs"]), plain)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(original(x), fused(x)) < 1e-5


def test_deploy_safetensors_metadata(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.safetensors"
    fuse_checkpoint(repvgg_ckpt, out, Options())
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == DEPLOY_KEYS - {"state_dict"}
    assert metadata["arch"] == "repconv.samples:repvgg_tiny"
    assert json.loads(metadata["input_shape"]) == [1, 3, 32, 32]
    plan = json.loads(metadata["plan"])
    assert plan == torch.load(_pt_twin(repvgg_ckpt, tmp_path), weights_only=True)["plan"]


def _pt_twin(repvgg_ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "twin.pt"
    fuse_checkpoint(repvgg_ckpt, out, Options())
    return out


# ------------------------------------------------------------------------- recorded input shape


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_verify_uses_input_shape_recorded_in_deploy(tmp_path: Path, fmt: str) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(trained("repvgg").state_dict(), bare)  # records no input shape
    options = Options(model="repconv.samples:repvgg_tiny", model_kwargs={"width": 8})
    out = tmp_path / f"deploy{fmt}"
    with pytest.raises(InputError, match="--input-shape"):
        fuse_checkpoint(bare, out, options)
    assert not out.exists()
    fuse_checkpoint(bare, out, Options(**{**options.__dict__, "input_shape": (1, 3, 24, 24)}))
    outcome = verify_checkpoints(bare, out, options)  # no input shape given
    assert outcome.report.passed
    assert outcome.report.input_shapes == [[1, 3, 24, 24]]
    assert outcome.report.max_rel_error < 1e-5


# ------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_keeps_dtype(tmp_path: Path, dtype: torch.dtype, fmt: str) -> None:
    original = trained("repvgg").to(dtype)
    path = tmp_path / "half.pt"
    torch.save({"state_dict": original.state_dict(), "arch": "repconv.samples:repvgg_tiny",
                "arch_kwargs": {"width": 8}, "input_shape": list(SHAPE)}, path)
    out = tmp_path / f"deploy{fmt}"
    outcome = fuse_checkpoint(path, out, Options())
    assert outcome.report.verification.passed
    assert outcome.report.after.batchnorms == 0
    state = (torch.load(out, weights_only=True)["state_dict"] if fmt == ".pt"
             else load_file(str(out)))
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {dtype}
    fused = load_deploy(fresh("repvgg"), out)
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original.double()(x.double())
        got = fused(x.to(dtype))
    assert got.dtype == dtype
    assert rel_err(expected, got) < (2e-2 if dtype == torch.float16 else 1e-1)


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_fusing_a_deploy_file_again_passes_through(repvgg_ckpt: Path, tmp_path: Path,
                                                   fmt: str) -> None:
    """Commit 7e18bfe: a deploy file given to fuse is passed through unchanged with a note
    saying it is 'already' a deploy file (an idempotent pipeline step), not refused."""
    deploy = tmp_path / f"deploy{fmt}"
    fuse_checkpoint(repvgg_ckpt, deploy, Options())
    again = tmp_path / "again.pt"
    before = sha256(deploy)
    outcome = fuse_checkpoint(deploy, again, Options())
    assert sha256(deploy) == before
    assert outcome.report.rewrites == []
    assert any("already a repconv deploy file" in note for note in outcome.report.notes)
    assert outcome.report.after.batchnorms == 0
    first = torch.load(_pt_twin(repvgg_ckpt, tmp_path), weights_only=True)
    second = torch.load(again, weights_only=True)
    assert second["plan"] == first["plan"]
    assert all(torch.equal(second["state_dict"][k], v) for k, v in first["state_dict"].items())
    assert verify_checkpoints(repvgg_ckpt, again, Options()).report.max_rel_error < 1e-5


def test_load_deploy_refuses_a_training_checkpoint(repvgg_ckpt: Path) -> None:
    with pytest.raises(InputError, match="not a repconv deploy file"):
        load_deploy(repvgg_tiny(), repvgg_ckpt)


def test_load_deploy_is_part_of_the_public_api() -> None:
    assert repconv.load_deploy is load_deploy


# ------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_write_leaves_nothing(repvgg_ckpt: Path, tmp_path: Path, fmt: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after part of OUT reached the disk: the temp file it went to is removed."""
    in_path = tmp_path / "train.pt"
    in_path.write_bytes(repvgg_ckpt.read_bytes())
    in_hash = sha256(in_path)
    written = interrupt_deploy_writes(monkeypatch)
    out = tmp_path / f"deploy{fmt}"
    with pytest.raises(KeyboardInterrupt):
        fuse_checkpoint(in_path, out, Options())
    monkeypatch.undo()
    assert 1 <= len(written) <= 2  # a write on each of the writer's threads at most
    for path in filter(None, written):  # where /proc exists: a temp file beside OUT
        assert Path(path).parent == tmp_path and path != str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]
    assert sha256(in_path) == in_hash


def test_deploy_file_mode_follows_umask(repvgg_ckpt: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "deploy.pt"
        fuse_checkpoint(repvgg_ckpt, out, Options())
        reference = tmp_path / "plain.bin"
        reference.write_bytes(b"x")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)

