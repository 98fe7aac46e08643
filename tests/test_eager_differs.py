"""What makes calling a module run more than its class's forward (`graph.eager_differs`), and
what fusing does with such a module: it is kept as it is, its reason in the report, its
children still fused; and an instance forward that is an ``nn.Identity`` (a BatchNorm slot
left where a fold removed it) counts as the identity it is."""

from __future__ import annotations

import pytest
import torch
from helpers.reference_blocks import randomize_bn
from torch import Tensor, fx, nn

import repconv
from repconv.fold.graph import alias_base, eager_differs, mutated_input, runs_identity, trace
from repconv.measure.opcount import count_ops


def _conv_bn() -> nn.Sequential:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))


def test_hooks_and_instance_forwards_differ() -> None:
    assert eager_differs(nn.Conv2d(3, 4, 3)) is None
    hooked = nn.Conv2d(3, 4, 3)
    handle = hooked.register_forward_hook(lambda m, a, o: o)
    assert "has a forward hook" in (eager_differs(hooked) or "")
    handle.remove()
    assert eager_differs(hooked) is None
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert "has a forward pre-hook" in (eager_differs(hooked) or "")
    patched = nn.Conv2d(3, 4, 3)
    patched.forward = lambda x: x
    assert "its forward is replaced on the instance" in (eager_differs(patched) or "")

    class OwnCall(nn.Conv2d):
        def __call__(self, *args: object) -> Tensor:
            return super().__call__(*args) * 2

    assert "defines its own __call__" in (eager_differs(OwnCall(3, 4, 3)) or "")
    assert eager_differs(fx.symbolic_trace(nn.Conv2d(3, 4, 3))) is None  # fx's own __call__


def test_global_hooks_differ_for_every_module() -> None:
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: o)
    try:
        assert "has a forward hook" in (eager_differs(nn.BatchNorm2d(4)) or "")
    finally:
        handle.remove()
    assert eager_differs(nn.BatchNorm2d(4)) is None


def test_an_identity_instance_forward_is_the_identity() -> None:
    """Issue 16's folded BatchNorm slot: its forward is an nn.Identity set on the instance."""
    model = _conv_bn()
    model[1].__dict__["forward"] = nn.Identity()
    assert runs_identity(model[1]) and eager_differs(model[1]) is None
    x = torch.randn(2, 3, 8, 8)
    result = repconv.fuse(model, x)
    assert result.report.verification is not None and result.report.verification.passed
    assert not any("replaced on the instance" in s.reason for s in result.report.skipped)
    with torch.no_grad():
        assert torch.equal(result.model(x), model[0](x))
    assert count_ops(lambda: result.model(x)).batchnorms == 0
    # an Identity with a hook of its own is no identity
    model[1].__dict__["forward"].register_forward_hook(lambda m, a, o: o * 2)
    assert not runs_identity(model[1])
    assert "replaced on the instance" in (eager_differs(model[1]) or "")


class Clamped(nn.Module):
    """A block (a conv-BN inside a Sequential) whose output a hook clamps."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _conv_bn()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_a_hooked_block_is_kept_and_its_children_still_fused() -> None:
    torch.manual_seed(0)
    block = Clamped()
    block.register_forward_hook(lambda m, a, out: out.clamp(-0.5, 0.5))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), block, nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    result = repconv.fuse(model, x)
    assert result.report.verification is not None and result.report.verification.passed
    fused_block = result.model[1]
    assert type(fused_block) is Clamped and fused_block._forward_hooks  # the hook still runs
    assert count_ops(lambda: result.model(x)).batchnorms == 0  # its conv-BN folded inside
    assert any("1 does not trace as a whole (has a forward hook" in n
               for n in result.report.notes)
    with torch.no_grad():
        assert float(result.model(x).abs().max()) <= 0.5
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("write", ["x[:, :2].clamp_(-1, 1)", "x.narrow(1, 0, 2).clamp_(-1, 1)",
                                   "x.view(-1)[:8].zero_()", "x.transpose(2, 3)[0].relu_()"])
def test_a_change_through_a_view_is_a_change_of_its_base(write: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"def forward(self, x):\n    {write}\n    return x + 1\n", namespace)
    module_class = type("Writes", (nn.Module,), {"forward": namespace["forward"]})
    gm = trace(module_class())
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = [n for n in gm.graph.nodes if mutated_input(n, gm) is not None]
    assert changed and all(mutated_input(n, gm) is placeholder for n in changed)
    assert all(alias_base(n.args[0], gm) is placeholder for n in changed)
