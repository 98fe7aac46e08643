"""Issue 7 as executable spec: models written like third-party code (YOLO, timm, HuggingFace,
ShuffleNet), fused through the public API, judged on what the fused model executes.

Every model has random BN statistics (``randomize_bn``); outputs are compared at the fuse input
and at other batch and spatial sizes; op counts are aten ops that actually run
(``repconv.measure.opcount.count_ops``), not modules.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from helpers import user_models as um
from helpers import user_models_detector as det
from helpers import user_models_wrappers as wr
from helpers.measure import count_bns, executed, rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn, run
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import repconv
from repconv.measure.opcount import count_ops

TOL = 1e-5


def max_err(original: nn.Module, fused: nn.Module, *args: object, **kwargs: object) -> float:
    """Worst scale-relative error over every tensor leaf of the outputs."""
    expected, _ = tree_flatten(run(original, *args, **kwargs))
    got, _ = tree_flatten(run(fused, *args, **kwargs))
    assert len(expected) == len(got) > 0
    return max(rel_err(e, g) for e, g in zip(expected, got))


def fused_pair(cls: type[nn.Module], example: Tensor, seed: int) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed=seed)
    return model, repconv.fuse(model, example)


def skip_text(result: object) -> str:
    report = result.report
    return "\n".join([*report.notes, *(f"{s.where}: {s.reason}" for s in report.skipped)])


def names_module(where: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", where) is not None


# --------------------------------------------------------------------------- 1. YOLO detector

DET_EXAMPLE = (1, 3, 64, 64)
DET_OTHER = [(2, 3, 64, 64), (1, 3, 96, 128), (2, 3, 128, 96)]


@pytest.fixture(scope="module")
def detector() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = randomize_bn(det.DetectionModel(), seed=1)
    return model, repconv.fuse(model, randn(*DET_EXAMPLE, seed=0))


def test_detector_root_does_not_trace_as_a_whole() -> None:
    model = randomize_bn(det.DetectionModel(), seed=1)
    with pytest.raises(Exception, match="iterated"):
        torch.fx.symbolic_trace(model)
    assert isinstance(run(model, randn(*DET_EXAMPLE, seed=0)), tuple)


@pytest.mark.parametrize("shape", [DET_EXAMPLE, *DET_OTHER])
def test_detector_fused_runs_and_matches(detector, shape) -> None:
    model, result = detector
    x = randn(*shape, seed=0 if shape == DET_EXAMPLE else sum(shape))  # seed 0: the fuse input
    y, levels = run(result.model, x)
    assert y.shape[0] == shape[0] and len(levels) == 3
    assert max_err(model, result.model, x) <= TOL


def test_detector_runs_no_bn_and_merges_each_repconv(detector) -> None:
    model, result = detector
    x = randn(*DET_OTHER[1], seed=3)
    before, after = executed(model, x), executed(result.model, x)
    assert before.batchnorms == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert after.batchnorms == 0, after.ops
    assert after.convs <= before.convs
    assert before.convs - after.convs >= len(det.REPCONV_LAYERS), (before.convs, after.convs)
    for index in det.REPCONV_LAYERS:  # each RepConv block runs one conv
        layer_in = run(model.model[:index], x)
        assert executed(result.model.model[index], layer_in).convs == 1


def test_detector_keeps_layer_attributes_and_classes(detector) -> None:
    model, result = detector
    fused = result.model
    assert type(fused) is det.DetectionModel
    assert fused.save == model.save and fused.names == model.names and fused.yaml == model.yaml
    assert len(fused.model) == len(model.model)
    for original, layer in zip(model.model, fused.model):
        for attr in ("f", "i", "type", "np"):
            assert getattr(layer, attr) == getattr(original, attr), (original.i, attr)
    assert type(fused.model[9]) is nn.Upsample
    assert type(fused.model[10]) is det.Concat and fused.model[10].d == 1
    head = fused.model[-1]
    assert type(head) is det.Detect
    assert (head.nc, head.nl, head.reg_max, head.no) == (3, 3, 4, 19)
    assert torch.equal(head.stride, model.model[-1].stride)
    assert type(head.dfl) is det.DFL
    assert torch.equal(head.dfl.conv.weight, model.model[-1].dfl.conv.weight)
    # ultralytics' own check (< 10 norms) counts the slots a fold leaves: its fuse() runs
    # again, an exact no-op (tests/test_frameworks.py)
    assert not fused.is_fused() and count_bns(fused) == 0


def test_detector_pickles_and_still_runs(detector) -> None:
    model, result = detector
    buffer = io.BytesIO()
    torch.save(result.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is det.DetectionModel
    x = randn(*DET_OTHER[2], seed=5)
    assert max_err(model, loaded, x) <= TOL
    assert executed(loaded, x).batchnorms == 0


# --------------------------------------------------------------------------- 2. metadata reads


@pytest.fixture(scope="module")
def metadata() -> tuple[nn.Module, object]:
    return fused_pair(um.MetadataNet, randn(1, 3, 32, 32, seed=0), seed=2)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 24, 40), (3, 3, 17, 23)])
def test_metadata_reads_do_not_block_folding(metadata, shape) -> None:
    model, result = metadata
    x = randn(*shape, seed=sum(shape))
    assert max_err(model, result.model, x) <= TOL
    after = executed(result.model, x)
    assert after.batchnorms == 0, after.ops
    assert after.convs == 1 + len(um.MetadataNet.BLOCKS) + 1  # stem, one per block, final


def test_each_repvgg_block_runs_one_conv(metadata) -> None:
    model, result = metadata
    x = randn(2, 3, 24, 40, seed=1)
    block_in = run(model.stem, x)
    for name in um.MetadataNet.BLOCKS:
        block = result.model.get_submodule(name)
        counts = executed(block, block_in)
        assert (counts.convs, counts.batchnorms) == (1, 0), (name, counts.ops)
        block_in = run(model.get_submodule(name), block_in)


def test_metadata_reads_are_not_reported_as_users(metadata) -> None:
    _, result = metadata
    complaints = [s for s in result.report.skipped
                  if "getattr" in s.reason or "size" in s.reason or "users" in s.reason]
    assert complaints == []


# --------------------------------------------------------------------------- 3-4. views, cat


@pytest.mark.parametrize("shape", [(2, 3, 24, 40), (3, 3, 14, 18)])
def test_channel_shuffle_keeps_contiguous_before_view(shape) -> None:
    model, result = fused_pair(um.ShuffleUnit, randn(1, 3, 16, 16, seed=0), seed=3)
    x = randn(*shape, seed=1)
    assert max_err(model, result.model, x) <= TOL
    after = executed(result.model, x)
    assert after.batchnorms == 0, after.ops
    assert after.convs <= executed(model, x).convs


def test_single_input_cat_adds_no_conv() -> None:
    model, result = fused_pair(um.SingleInputCat, randn(1, 3, 16, 16, seed=0), seed=4)
    for shape in [(1, 3, 16, 16), (2, 3, 20, 12)]:
        x = randn(*shape, seed=2)
        assert max_err(model, result.model, x) <= TOL
        before, after = executed(model, x), executed(result.model, x)
        assert after.convs <= before.convs == 2, after.ops
        assert after.batchnorms == 1, after.ops  # bn1, bn2 fold; pool_bn has nothing to fold into
        assert after.total < before.total


# --------------------------------------------------------------------------- 5. discarded branch


def test_discarded_branch_does_not_run_after_fusing() -> None:
    model, result = fused_pair(um.AuxHeadNet, randn(1, 3, 16, 16, seed=0), seed=5)
    x = randn(2, 3, 20, 12, seed=1)
    main_only = count_ops(lambda: model.main(model.stem(x)))
    after = executed(result.model, x)
    assert after.convs <= main_only.convs == 3, after.ops
    assert after.batchnorms == 0
    assert max_err(model, result.model, x) <= TOL


def test_discarded_branch_hidden_by_eager_parent_is_reported() -> None:
    model, result = fused_pair(um.EagerAuxNet, randn(1, 3, 16, 16, seed=0), seed=6)
    assert "aux_classifier" in skip_text(result), skip_text(result)
    for shape in [(1, 3, 16, 16), (2, 3, 20, 12)]:
        x = randn(*shape, seed=3)
        assert max_err(model, result.model, x) <= TOL
        assert executed(result.model, x).convs <= executed(model, x).convs


# --------------------------------------------------------------------------- 6. keyword calls


@pytest.mark.parametrize("cls", [wr.BackboneClassifier, wr.ModalClassifier])
def test_backbone_called_with_keywords_is_fused(cls) -> None:
    model, result = fused_pair(cls, randn(1, 3, 32, 32, seed=0), seed=7)
    for shape in [(2, 3, 32, 32), (3, 3, 40, 24)]:
        x = randn(*shape, seed=4)
        before, after = executed(model, x), executed(result.model, x)
        assert after.batchnorms == 0, (cls.__name__, after.ops)
        assert after.convs <= before.convs
        assert max_err(model, result.model, x) <= TOL
    x = randn(2, 3, 40, 24, seed=5)
    if cls is wr.ModalClassifier:  # called the same way the example was: the default mode
        assert max_err(model, result.model, x, mode="logits") <= TOL
    assert run(result.model, x).shape == (2, 10)
    assert type(result.model) is cls  # rule 0.1, checked last: the numbers above come first


# --------------------------------------------------------------------------- 7. timm classifier


@pytest.fixture(scope="module")
def timm_like() -> tuple[nn.Module, object]:
    return fused_pair(wr.TimmLikeResNet, randn(1, 3, 64, 64, seed=0), seed=8)


def test_timm_like_root_keeps_class_methods_and_attributes(timm_like) -> None:
    model, result = timm_like
    fused = result.model
    assert type(fused) is type(model)
    assert fused.pretrained_cfg == model.pretrained_cfg
    assert fused.feature_info == model.feature_info
    assert (fused.num_classes, fused.num_features) == (10, 32)
    x = randn(2, 3, 48, 80, seed=1)
    assert max_err(model.forward_features, fused.forward_features, x) <= TOL
    feats = run(fused.forward_features, x)
    assert rel_err(run(model.forward_head, feats, pre_logits=True),
                   run(fused.forward_head, feats, pre_logits=True)) <= TOL
    assert executed(fused.forward_features, x).batchnorms == 0


def test_timm_like_untouched_modules_keep_names_and_classes(timm_like) -> None:
    model, result = timm_like
    fused = result.model
    for name in ("fc", "act1", "maxpool", "global_pool", "flatten", "layer1.0.act1",
                 "layer1.0.act2", "layer2.0.act1", "layer2.1.act2"):
        assert type(fused.get_submodule(name)) is type(model.get_submodule(name)), name
    assert torch.equal(fused.fc.weight, model.fc.weight)
    x = run(model.maxpool, run(model.act1, run(model.bn1, run(model.conv1,
                                                               randn(2, 3, 40, 56, seed=3)))))
    for name in ("layer1", "layer1.0", "layer2.0"):  # rewritten inside: same name, same job
        assert rel_err(run(model.get_submodule(name), x),
                       run(fused.get_submodule(name), x)) <= TOL, name


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 48, 80), (3, 3, 33, 35)])
def test_timm_like_matches_without_bn(timm_like, shape) -> None:
    model, result = timm_like
    x = randn(*shape, seed=sum(shape))
    assert max_err(model, result.model, x) <= TOL
    before, after = executed(model, x), executed(result.model, x)
    assert after.batchnorms == 0, after.ops
    assert after.convs <= before.convs


def test_timm_like_reset_classifier_still_works(timm_like) -> None:
    model, result = timm_like
    original, fused = copy.deepcopy(model), copy.deepcopy(result.model)
    for m in (original, fused):
        torch.manual_seed(12)  # the same fresh head on both
        m.reset_classifier(5)
    x = randn(2, 3, 40, 56, seed=2)
    assert run(fused, x).shape == (2, 5)
    assert max_err(original, fused, x) <= TOL


# --------------------------------------------------------------------------- 8. never slower


def test_lone_batchnorm_is_not_turned_into_a_conv() -> None:
    model, result = fused_pair(um.LoneBatchNorms, randn(1, 3, 16, 16, seed=0), seed=9)
    for shape in [(1, 3, 16, 16), (2, 3, 20, 12)]:
        x = randn(*shape, seed=6)
        before, after = executed(model, x), executed(result.model, x)
        assert after.convs == before.convs == 2, after.ops
        assert after.batchnorms == len(um.LoneBatchNorms.LONE), after.ops  # bn1 folded
        assert after.total <= before.total
        assert max_err(model, result.model, x) <= TOL
    for name in um.LoneBatchNorms.LONE:
        reasons = [s.reason for s in result.report.skipped if names_module(s.where, name)]
        assert reasons and all(r.strip() for r in reasons), (name, skip_text(result))


def test_chain_that_would_cost_more_is_left_alone() -> None:
    model, result = fused_pair(um.NarrowChain, randn(1, 3, 16, 16, seed=0), seed=10)
    chain_params = model.reduce.weight.numel() + model.expand.weight.numel()  # 128 + 1152
    fused_conv_params = sum(m.weight.numel() for m in result.model.modules()
                            if isinstance(m, nn.Conv2d))
    assert fused_conv_params <= model.stem[0].weight.numel() + chain_params  # not 32x32x3x3
    for shape in [(1, 3, 16, 16), (2, 3, 20, 12)]:
        x = randn(*shape, seed=7)
        after = executed(result.model, x)
        assert (after.convs, after.batchnorms) == (3, 0), after.ops
        assert max_err(model, result.model, x) <= TOL


# --------------------------------------------------------------------------- 9. BNs explained


def test_every_batchnorm_left_is_explained() -> None:
    model, result = fused_pair(um.MixedBatchNorms, randn(2, 3, 16, 16, seed=0), seed=11)
    x = randn(3, 3, 20, 12, seed=8)
    before, after = executed(model, x), executed(result.model, x)
    assert before.batchnorms == len(um.MixedBatchNorms.BNS)
    explained = {name for name in um.MixedBatchNorms.BNS
                 if any(names_module(s.where, name) for s in result.report.skipped)}
    assert after.batchnorms == len(explained), (after.ops, skip_text(result))
    assert {"relu_bn", "batchstat_bn"} <= explained, skip_text(result)  # neither can fold
    assert max_err(model, result.model, x) <= TOL
