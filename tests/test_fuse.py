"""End-to-end tests of ``repconv.fuse``: every reference block folds to one conv, the original is
left alone, outputs of any structure are compared, and the recorded plan replays.

Every model has randomized BN statistics (``randomize_bn``): fresh BNs are the identity and hide
fusion bugs. Outputs are compared on a fresh random input, never the example input the model was
traced and checked with.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.measure import count_bns, count_convs, count_linears, rel_err
from helpers.reference_blocks import (
    BLOCK_NAMES,
    RepVGGBlock,
    block_ndim,
    make_block,
    randomize_bn,
    tiny_net,
    tiny_net_example_input,
)
from helpers.tensors import randn, run
from torch import Tensor, nn

import repconv
from repconv.rewrite.surgery import replay_plan

SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 5)}


def _block(name: str) -> tuple[nn.Module, int]:
    if name == "FiveBranchConcatBlock":  # needs out >= in + 2
        return make_block(name, 6, 11), 6
    return make_block(name, 8), 8


# --------------------------------------------------------------------------- single blocks


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_folds_to_one_conv(name: str) -> None:
    block, cin = _block(name)
    randomize_bn(block, seed=11)
    before_convs = count_convs(block)
    assert count_bns(block) > 0
    spatial = SPATIAL[block_ndim(name)]
    example = randn(2, cin, *spatial, seed=0)
    fresh = randn(2, cin, *spatial, seed=1)
    assert not torch.equal(example, fresh)

    result = repconv.fuse(block, example)

    if name == "FiveBranchConcatBlock":
        # one conv for the concat would read every input channel through a 5x5 kernel: more
        # MACs than its branches, so the pairs stay apart and the pool's BN has no conv
        assert count_bns(result.model) == 1
        assert count_convs(result.model) == 3
        assert any(s.reason.startswith("cost:") for s in result.report.skipped)
    elif name in ("BasicResBlock", "Bottleneck"):  # ReLUs inside: every conv stays, BN folded
        assert count_bns(result.model) == 0
        assert count_convs(result.model) == before_convs
    else:
        assert count_bns(result.model) == 0
        assert count_convs(result.model) == 1
    assert rel_err(run(block, fresh), run(result.model, fresh)) < 1e-5
    assert result.report.verification is not None
    assert result.report.verification.passed
    if name != "FiveBranchConcatBlock":
        assert result.report.skipped == []


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_tiny_net_loses_every_bn(name: str) -> None:
    net = randomize_bn(tiny_net(name), seed=5)
    example = tiny_net_example_input(name, batch=2, seed=0)
    fresh = tiny_net_example_input(name, batch=2, seed=1)

    result = repconv.fuse(net, example)

    assert count_bns(net) > 0
    if name == "FiveBranchConcatBlock":  # see test_block_folds_to_one_conv: a BN per pool
        assert count_bns(result.model) == 2
    else:
        assert count_bns(result.model) == 0
    if name in ("BasicResBlock", "Bottleneck", "RepGhostBlock"):  # one conv per path already
        assert count_convs(result.model) == count_convs(net)
    elif name == "FiveBranchConcatBlock":
        assert count_convs(result.model) == 1 + 2 * 3
    else:  # stem conv + one conv per block
        assert count_convs(result.model) == 3
    assert result.report.verification.passed
    assert result.report.verification.max_rel_error < 1e-5
    assert rel_err(run(net, fresh), run(result.model, fresh)) < 1e-5


# --------------------------------------------------------------------------- the original


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_fuse_leaves_the_original_untouched() -> None:
    net = randomize_bn(tiny_net("DiverseBranchBlock"), seed=2)
    before = _state(net)
    modules_before = [type(m) for m in net.modules()]
    example = tiny_net_example_input("DiverseBranchBlock", batch=2)
    expected = run(net, example)

    result = repconv.fuse(net, example)

    assert result.model is not net
    _assert_same_state(before, net)
    assert [type(m) for m in net.modules()] == modules_before
    assert torch.equal(run(net, example), expected)
    assert not net.training


def test_train_mode_model_keeps_its_flags_and_fuses_its_eval_behaviour() -> None:
    net = randomize_bn(tiny_net("RepVGGBlock"), seed=3).train()
    flags = [m.training for m in net.modules()]
    assert all(flags)
    before = _state(net)  # a forward in train mode would move the running stats
    example = tiny_net_example_input("RepVGGBlock", batch=2)
    fresh = tiny_net_example_input("RepVGGBlock", batch=2, seed=7)

    result = repconv.fuse(net, example)

    assert [m.training for m in net.modules()] == flags
    _assert_same_state(before, net)
    assert any("train mode" in note for note in result.report.notes), result.report.notes
    assert not result.model.training
    assert count_bns(result.model) == 0
    assert result.report.verification.passed
    reference = copy.deepcopy(net).eval()
    assert rel_err(run(reference, fresh), run(result.model, fresh)) < 1e-5
    # the train-mode output (batch statistics) is genuinely different: the note matters
    assert rel_err(run(copy.deepcopy(net), fresh), run(result.model, fresh)) > 1e-2


def test_eval_mode_model_gets_no_train_mode_note() -> None:
    block = randomize_bn(RepVGGBlock(4, 4), seed=1)
    result = repconv.fuse(block, randn(1, 4, 6, 6, seed=0))
    assert not any("train mode" in note for note in result.report.notes)


# --------------------------------------------------------------------------- output structure


class TupleDictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = RepVGGBlock(4, 4)
        self.b = make_block("ACBlock", 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        y = self.a(x)
        return (y, self.b(y)), {"p": self.head(y), "q": y * 2}


def test_tuple_and_dict_outputs_compare_every_leaf() -> None:
    model = randomize_bn(TupleDictOutput(), seed=4)
    example = randn(2, 4, 8, 8, seed=0)
    fresh = randn(2, 4, 8, 8, seed=1)

    result = repconv.fuse(model, example)

    verification = result.report.verification
    assert verification.outputs_compared == 4
    assert verification.passed
    assert count_bns(result.model) == 0
    (e1, e2), e3 = run(model, fresh)
    (g1, g2), g3 = run(result.model, fresh)
    assert set(g3) == {"p", "q"}
    for expected, got in ((e1, g1), (e2, g2), (e3["p"], g3["p"]), (e3["q"], g3["q"])):
        assert rel_err(expected, got) < 1e-5


# --------------------------------------------------------------------------- functional BN


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN + activation: a BatchNorm2d subclass whose forward calls F.batch_norm."""

    def forward(self, x: Tensor) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return F.relu(x)


def test_functional_batch_norm_subclass_folds_into_conv() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), BatchNormAct2d(6))
    randomize_bn(model, seed=6)
    example = randn(2, 4, 8, 8, seed=0)
    fresh = randn(2, 4, 8, 8, seed=1)

    result = repconv.fuse(model, example)

    assert count_bns(result.model) == 0
    assert count_convs(result.model) == 1
    assert result.report.verification.passed
    assert rel_err(run(model, fresh), run(result.model, fresh)) < 1e-5
    assert len(result.report.rewrites) == 1
    assert result.report.rewrites[0].kind == "conv+bn"


# --------------------------------------------------------------------------- child by child


class DataDependent(nn.Module):
    """Does not trace as a whole: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.first = RepVGGBlock(4, 4)
        self.second = RepVGGBlock(4, 6, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.first(x)
        if x.sum() > 0:
            y = -y
        return self.second(y)


def _both_paths_inputs() -> list[Tensor]:
    """Inputs with both signs of x.sum(), so both sides of the branch run."""
    xs = [randn(2, 4, 8, 8, seed=s) for s in range(3)]
    return xs + [-x for x in xs]


def test_untraceable_model_fuses_child_by_child() -> None:
    model = randomize_bn(DataDependent(), seed=8)
    example = randn(2, 4, 8, 8, seed=100)

    result = repconv.fuse(model, example)

    assert count_bns(result.model.first) == 0
    assert count_bns(result.model.second) == 0
    assert count_convs(result.model.first) == 1
    assert count_convs(result.model.second) == 1
    assert any("child by child" in n for n in result.report.notes), result.report.notes
    assert result.report.verification.passed
    taken = set()
    for x in _both_paths_inputs():
        taken.add(bool(x.sum() > 0))
        assert rel_err(run(model, x), run(result.model, x)) < 1e-5
    assert taken == {True, False}  # both sides of the data-dependent branch were checked


class DataDependentList(nn.Module):
    """Like DataDependent, but the blocks live in an nn.ModuleList (MobileOne, timm stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RepVGGBlock(4, 4), RepVGGBlock(4, 4)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
            if x.sum() > 0:
                x = -x
        return x


def test_untraceable_model_fuses_blocks_inside_module_list() -> None:
    model = randomize_bn(DataDependentList(), seed=9)
    example = randn(2, 4, 8, 8, seed=0)

    result = repconv.fuse(model, example)

    assert result.report.verification.passed
    assert count_bns(result.model) == 0
    assert count_convs(result.model) == 2


# --------------------------------------------------------------------------- replay


def test_replay_plan_rebuilds_the_fused_structure_of_a_tiny_net() -> None:
    net = randomize_bn(tiny_net("RepVGGBlock"), seed=10)
    example = tiny_net_example_input("RepVGGBlock", batch=2)
    result = repconv.fuse(net, example)
    # each block, whose whole forward folds, becomes its fused conv (as RepVGG's own deploy
    # code makes it); the stem's BN becomes an Identity
    swaps = {step["path"]: step["spec"] for step in result.plan if step["kind"] == "swap"}
    assert [step["kind"] for step in result.plan].count("frame") == 0
    assert swaps["3"]["type"] == swaps["5"]["type"] == "Conv2d" and swaps["1"] is None

    torch.manual_seed(123)  # a differently initialised model of the same architecture
    rebuilt = replay_plan(tiny_net("RepVGGBlock"), result.plan)
    assert count_bns(rebuilt) == 0
    assert count_convs(rebuilt) == count_convs(result.model)
    rebuilt.load_state_dict(result.model.state_dict())

    fresh = tiny_net_example_input("RepVGGBlock", batch=2, seed=3)
    assert torch.equal(run(rebuilt, fresh), run(result.model, fresh))


def test_replay_plan_rebuilds_rewritten_forwards() -> None:
    """A block whose forward holds more than the fold is rewritten in place (a frame step)."""
    net = randomize_bn(tiny_net("DBBWithInnerBN"), seed=10)
    result = repconv.fuse(net, tiny_net_example_input("DBBWithInnerBN", batch=2))
    assert [step["kind"] for step in result.plan].count("frame") == 2
    rebuilt = replay_plan(tiny_net("DBBWithInnerBN"), result.plan)
    rebuilt.load_state_dict(result.model.state_dict())
    fresh = tiny_net_example_input("DBBWithInnerBN", batch=2, seed=3)
    assert count_bns(rebuilt) == 0
    assert torch.equal(run(rebuilt, fresh), run(result.model, fresh))


def test_replay_plan_rebuilds_the_child_by_child_structure() -> None:
    model = randomize_bn(DataDependent(), seed=12)
    result = repconv.fuse(model, randn(2, 4, 8, 8, seed=0))
    assert {step["scope"] for step in result.plan} == {"first", "second"}

    torch.manual_seed(321)
    rebuilt = replay_plan(DataDependent(), result.plan)
    rebuilt.load_state_dict(result.model.state_dict())

    assert count_bns(rebuilt) == 0
    for x in _both_paths_inputs():
        assert torch.equal(run(rebuilt, x), run(result.model, x))


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float16, 1e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-9)],
)
def test_fused_parameters_keep_the_dtype(dtype: torch.dtype, tolerance: float) -> None:
    base = randomize_bn(RepVGGBlock(8, 8), seed=13)
    model = copy.deepcopy(base).to(dtype)
    truth = copy.deepcopy(base).double()
    example = randn(2, 8, 9, 9, seed=0, dtype=dtype)
    fresh64 = randn(2, 8, 9, 9, seed=1, dtype=torch.float64)
    fresh = fresh64.to(dtype)

    result = repconv.fuse(model, example)

    assert count_convs(result.model) == 1
    assert count_bns(result.model) == 0
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert result.report.verification.passed
    fused_error = rel_err(run(model, fresh), run(result.model, fresh))
    assert fused_error < tolerance
    if dtype is torch.float64:
        assert fused_error < 1e-9
    else:
        # fused in float64 and rounded once: no further from the truth than the original is
        truth_out = run(truth, fresh.double())
        original_error = rel_err(truth_out, run(model, fresh))
        assert rel_err(truth_out, run(result.model, fresh)) <= 1.5 * original_error


# --------------------------------------------------------------------------- linear heads


@pytest.mark.parametrize("order", ["linear_bn", "bn_linear"])
def test_linear_and_batchnorm1d_fold_to_one_linear(order: str) -> None:
    if order == "linear_bn":
        model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6))
    else:
        model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 6))
    randomize_bn(model, seed=14)
    example = randn(4, 8, seed=0)
    fresh = randn(5, 8, seed=1)

    result = repconv.fuse(model, example)

    assert count_bns(result.model) == 0
    assert count_linears(result.model) == 1
    assert count_convs(result.model) == 0
    assert result.report.verification.passed
    assert rel_err(run(model, fresh), run(result.model, fresh)) < 1e-5


# --------------------------------------------------------------------------- cost


def test_cost_increasing_chain_stays_two_convs() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(32, 4, 1, bias=False), nn.Conv2d(4, 32, 3, padding=0)).eval()
    example = randn(2, 32, 8, 8, seed=0)
    fresh = randn(2, 32, 8, 8, seed=1)
    # per sample: 1x1 = 8*8*4 outputs x 32 taps, 3x3 = 6*6*32 outputs x 4*9 taps;
    # one 3x3 conv 32->32 instead = 6*6*32 outputs x 32*9 taps
    before = 8 * 8 * 4 * 32 + 6 * 6 * 32 * 4 * 9
    after = 6 * 6 * 32 * 32 * 9

    result = repconv.fuse(model, example)

    assert count_convs(result.model) == 2
    cost = [s.reason for s in result.report.skipped if s.reason.startswith("cost")]
    assert len(cost) == 1, result.report.skipped
    assert f"{before:,}" in cost[0] and f"{after:,}" in cost[0], cost[0]
    assert result.report.rewrites == []
    assert result.report.verification.passed
    assert rel_err(run(model, fresh), run(result.model, fresh)) < 1e-6


def test_cheap_chain_folds_to_one_conv() -> None:
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1)).eval()
    example = randn(2, 32, 8, 8, seed=0)
    fresh = randn(2, 32, 8, 8, seed=1)

    result = repconv.fuse(model, example)

    assert count_convs(result.model) == 1
    assert not any(s.reason.startswith("cost") for s in result.report.skipped)
    (record,) = result.report.rewrites
    assert record.kind == "conv chain"
    assert record.macs_after < record.macs_before
    assert result.report.verification.passed
    assert rel_err(run(model, fresh), run(result.model, fresh)) < 1e-5


@pytest.mark.parametrize("weights_seed", [38, 101, 102, 103])
def test_dbb_pad_with_bn_value_folds_whatever_the_conv_weights(weights_seed: int) -> None:
    """DBB pads with the BN's bias (``pad(t - c) + c``): the float32 rounding of ``c`` leaves a
    residual bias that must still count as zero (seed 38 once split the block)."""
    torch.manual_seed(weights_seed)
    block, cin = _block("DBBWithInnerBN")
    randomize_bn(block, seed=11)
    result = repconv.fuse(block, randn(2, cin, *SPATIAL[2], seed=0))
    assert count_bns(result.model) == 0 and count_convs(result.model) == 1
    fresh = randn(3, cin, *(n + 5 for n in SPATIAL[2]), seed=2)
    assert rel_err(run(block, fresh), run(result.model, fresh)) < 1e-5
