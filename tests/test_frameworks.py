"""The deploy file inside the user's framework (issue 16): the reference framework
(helpers/reference_framework.py: its loader, its own fuse(), its EMA) accepts every pickled
deploy layout repconv writes; the framework's fuse() is an exact no-op on what repconv folded; the
deploy model survives deepcopy, pickling without repconv installed, dtype and device moves and
train/eval switches, and runs no BatchNorm op in any of them.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import user_models_detector as det
from helpers.cli_support import run_process
from helpers.measure import count_bns, rel_err
from helpers.reference_blocks import randomize_bn
from helpers.reference_framework import ModelEMA, attempt_load, fuse_conv_and_bn
from helpers.third_party_models import BY_NAME, shaped_input
from helpers.third_party_models import run as run_outputs
from torch import Tensor, nn
from torch.fx.graph_module import GraphModule

import repconv
from repconv.fold.slot import is_identity_slot, vacated
from repconv.measure.opcount import count_ops
from repconv.pipeline import Options, fuse_checkpoint
from repconv.samples import repvgg_tiny, resnet_tiny

SHAPE = (1, 3, 32, 32)
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "repvgg": lambda: repvgg_tiny(width=8),
    "resnet": lambda: resnet_tiny(width=8),
    "detector": det.DetectionModel,
}


def trained(name: str) -> nn.Module:
    torch.manual_seed(len(name))
    return randomize_bn(BUILDERS[name](), seed=len(name)).eval()


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x.clone())
    return out[0] if isinstance(out, tuple) else out


def write_deploy(tmp_path: Path, model: nn.Module, layout: str, dtype: str | None) -> Path:
    """A deploy file written by repconv fuse from a pickled training checkpoint."""
    source = tmp_path / "last.pt"
    if layout == "trainer":  # the fp16 EMA in the trainer's dict
        torch.save({"epoch": 3, "model": None, "ema": copy.deepcopy(model).half(),
                    "optimizer": {"state": {}, "param_groups": []}}, source)
    else:
        torch.save(model, source)
    out = tmp_path / "deploy.pt"
    from repconv.pipeline.precision import DeployDtype

    fuse_checkpoint(source, out, Options(trust_pickle=True, input_shape=SHAPE),
                    dtype=DeployDtype(dtype) if dtype else None)
    return out


@pytest.mark.parametrize("dtype", [None, "float32"], ids=["stored-dtype", "float32"])
@pytest.mark.parametrize("layout", ["trainer", "bare"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_reference_framework_accepts_the_deploy_file(tmp_path: Path, name: str, layout: str,
                                                     dtype: str | None) -> None:
    original = trained(name)
    deploy = write_deploy(tmp_path, original, layout, dtype)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = original.float() if layout == "bare" else copy.deepcopy(original).half().float()
    expected = run(reference, x)

    plain = torch.load(deploy, weights_only=False)
    plain = (plain["ema"] if isinstance(plain, dict) else plain).float().eval()
    assert count_bns(plain) == 0
    before = run(plain, x)

    # .float().fuse().eval(): where a layer's bn is a slot, the framework folds it
    loaded = attempt_load(deploy)
    assert not any(is_identity_slot(getattr(m, "bn", None)) and isinstance(m.conv, nn.Conv2d)
                   for m in loaded.modules())
    assert torch.equal(run(loaded, x), before), "the framework's fuse() is not an exact no-op"
    stored_fp16 = layout == "trainer" and dtype is None
    assert rel_err(expected, before) < (2e-3 if stored_fp16 else 1e-5)

    ema = ModelEMA(loaded)  # deep copies the (re-fused) deploy model, then averages into it
    assert torch.equal(run(ema.ema, x), before)
    ema.update(loaded)  # d * v + (1 - d) * v: rounding only
    assert rel_err(before, run(ema.ema, x)) < 1e-6
    assert torch.equal(run(copy.deepcopy(plain), x), before)


def test_the_framework_fuse_of_a_slot_is_bit_exact() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    torch.nn.init.normal_(conv.weight)
    slot = vacated(randomize_bn(nn.BatchNorm2d(16), seed=2))
    fused = fuse_conv_and_bn(conv, slot)
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)
    torch_fold = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), slot)  # ultralytics' way
    assert torch.equal(torch_fold.weight, conv.weight) and torch.equal(torch_fold.bias, conv.bias)


def test_the_slot_runs_no_op_in_any_mode_or_dtype() -> None:
    slot = vacated(randomize_bn(nn.BatchNorm2d(4), seed=3))
    x = torch.randn(2, 4, 5, 5)
    for prepare in (lambda m: m.train(), lambda m: m.eval(), lambda m: m.half(),
                    lambda m: m.to("cpu", torch.bfloat16), lambda m: copy.deepcopy(m),
                    lambda m: pickle.loads(pickle.dumps(m))):
        moved = prepare(copy.deepcopy(slot))
        assert is_identity_slot(moved)
        inp = x.to(moved.running_var.dtype)
        counts = count_ops(lambda m=moved, i=inp: m(i))
        assert moved(inp) is inp and counts.total == 0, counts.ops
    assert slot.state_dict() == {}  # the deploy state_dict has no keys for it
    assert "folded: runs as the identity" in repr(slot)


class Implicit(nn.Module):
    """YOLOv7's ImplicitA (``x + a``) or ImplicitM (``x * m``): a per-channel tensor its
    framework's fuse() folds into the next or previous conv."""

    def __init__(self, channels: int, multiply: bool) -> None:
        super().__init__()
        self.multiply = multiply
        self.implicit = nn.Parameter(torch.randn(1, channels, 1, 1) + multiply)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit * x if self.multiply else self.implicit + x


class ScaleAndShift(nn.Module):
    """Two per-channel tensors: no single value of both makes it the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.rand(4)), nn.Parameter(torch.rand(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


@pytest.mark.parametrize(("multiply", "value"), [(False, 0.0), (True, 1.0)])
def test_a_folded_implicit_leaves_a_slot_of_its_own_class(multiply: bool, value: float) -> None:
    """The framework's fuse() reads ``ia.implicit`` and ``im.implicit``: the slot holds the
    value that makes its fold exact (b + W @ 0, W * 1), and running it executes no op."""
    slot = vacated(Implicit(6, multiply))
    assert type(slot) is Implicit and torch.equal(slot.implicit, torch.full((1, 6, 1, 1), value))
    assert slot.state_dict() == {}  # the deploy state_dict has no keys for it, as with Identity
    x = torch.randn(2, 6, 5, 5)
    assert slot(x) is x and count_ops(lambda: slot(x)).total == 0
    assert torch.equal(type(slot).forward(slot, x), x)  # its class's forward, as TorchScript runs
    restored = pickle.loads(pickle.dumps(slot))
    assert restored(x) is x and torch.equal(restored.implicit, slot.implicit)


@pytest.mark.parametrize("module", [ScaleAndShift(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                                    nn.Linear(4, 4)], ids=lambda m: type(m).__name__)
def test_a_module_no_neutral_value_makes_the_identity_leaves_an_identity(module: nn.Module
                                                                        ) -> None:
    assert type(vacated(module)) is nn.Identity


def test_the_authors_fuse_runs_on_the_fused_yolov7_and_changes_nothing() -> None:
    """YOLOv7's Model.fuse() folds IDetect's ImplicitA/M into its convs (reading
    ``ia[i].implicit``) and switches to ``fuseforward``; on repconv's model, which folded them
    already, it must run and compute the same."""
    spec = BY_NAME["yolov7_idetect"]
    training = spec.training(0)
    x = shaped_input(spec.example)
    fused = repconv.fuse(training, x.clone(), check=False).model
    framework = spec.convert(copy.deepcopy(fused))
    for shape in (spec.example, *spec.shapes):
        x = shaped_input(shape)
        assert all(torch.equal(a, b) for a, b in zip(run_outputs(fused, x),
                                                      run_outputs(framework, x)))


def test_rewritten_modules_keep_their_attributes_through_copies(tmp_path: Path) -> None:
    """A module rewritten in place (the detector's RepConv layers: a chain of the fused conv
    and the activation, so an nn.Sequential) takes the place of the detector's layer; the
    root's forward routes through its ``f`` and ``i``: they survive deepcopy, pickling, a
    deepcopy of the unpickled model, and pickling a deepcopy."""
    model = trained("detector")
    x = torch.randn(1, 3, 64, 64)
    fused = repconv.fuse(model, x).model
    rewritten = (GraphModule, nn.Sequential)
    layers = [m for m in fused.model if isinstance(m, rewritten)]
    assert [type(m).__name__ for m in layers] == ["Sequential"] * 2, layers
    expected = run(fused, x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    # a framework deep-copies the model (its EMA) and then saves the copy
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(fused), buffer)
    buffer.seek(0)
    copied_then_pickled = torch.load(buffer, weights_only=False)
    for copy_ in (copy.deepcopy(fused), unpickled, copy.deepcopy(unpickled),
                  copy.deepcopy(copy.deepcopy(unpickled)), copied_then_pickled):
        for layer, kept in zip(layers, [m for m in copy_.model if isinstance(m, rewritten)]):
            assert (kept.f, kept.i, kept.type, kept.np) == (layer.f, layer.i, layer.type, layer.np)
        assert torch.equal(run(copy_, x), expected)


_WITHOUT_REPCONV = """
import copy, sys, torch
sys.modules["repconv"] = None  # importing repconv fails: the file must not need it
sys.path.insert(0, sys.argv[2])
from helpers.reference_framework import ModelEMA, attempt_load
model = attempt_load(sys.argv[1])
ema = ModelEMA(copy.deepcopy(model))
x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(float(model(x)[0].sum()), float(ema.ema(x)[0].sum()))
"""


def test_a_pickled_deploy_file_loads_without_repconv(tmp_path: Path) -> None:
    original = trained("detector")
    deploy = write_deploy(tmp_path, original, "trainer", "float32")
    proc = run_process([sys.executable, "-c", _WITHOUT_REPCONV, deploy,
                        Path(__file__).parent], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded_sum, ema_sum = map(float, proc.stdout.split())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = float(run(copy.deepcopy(original).half().float(), x).sum())
    assert loaded_sum == ema_sum and abs(loaded_sum - expected) <= 1e-4 * abs(expected) + 1e-3


def test_torch_export_and_fx_see_through_the_slots() -> None:
    model = trained("resnet")
    x = torch.randn(2, 3, 32, 32)
    fused = repconv.fuse(model, x).model
    assert any(is_identity_slot(m) for m in fused.modules())
    expected = run(fused, x)
    traced = torch.fx.symbolic_trace(fused)
    program = torch.export.export(fused, (x,))
    assert torch.equal(run(traced, x), expected)
    assert torch.allclose(run(program.module(), x), expected, rtol=1e-6, atol=1e-6)
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
