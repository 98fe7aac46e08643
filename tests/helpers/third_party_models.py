"""Third-party model patterns that ``torch.fx`` cannot trace (issue 15), each with the deploy form
its authors' own conversion produces: the baseline ``repconv.fuse`` must match.

Every model is written from its authors' public code (see each family's module for what was read
and what stops fx) and is small enough for CPU tests. ``ThirdPartyModel.training(seed)`` builds it
with realistic random BN statistics; ``hand_written(model)`` converts a deep copy the way the
authors do (``switch_to_deploy``, ``fuse``, ...), per block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from helpers import third_party_dbb as dbb
from helpers import third_party_multi as multi
from helpers import third_party_padding as padding
from helpers import third_party_yolo as yolo
from helpers import third_party_yolov7 as yolov7
from helpers import third_party_yolov10 as yolov10
from helpers.reference_blocks import randomize_bn
from repconv.measure.opcount import OpCounts, count_ops

Shape = tuple[int, ...]

# other batch, other and odd sizes, both sides of SizeFlagNet's "width > 96"
IMAGE_SHAPES: tuple[Shape, ...] = ((2, 3, 64, 64), (1, 3, 96, 96), (1, 3, 77, 101),
                                   (2, 3, 128, 128))
# detectors need sides divisible by their largest stride, 32
DETECTOR_SHAPES: tuple[Shape, ...] = ((2, 3, 64, 64), (1, 3, 96, 128), (1, 3, 128, 96),
                                      (2, 3, 128, 128))


def output_tensors(output: Any) -> list[Tensor]:
    """Every tensor leaf of a model's output (tuples, lists, dicts), in order."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]


def shaped_input(shape: Shape) -> Tensor:
    """The same input for a shape in every run, test or benchmark."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


def run(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The output tensors of ``model`` on a copy of ``x`` (some forwards write their input)."""
    with torch.no_grad():
        return output_tensors(model(x.clone()))


def executed(model: nn.Module, x: Tensor) -> OpCounts:
    """The aten ops one call runs once caches keyed on the input shape (anchors, grids) are
    filled by a first call."""
    run(model, x)
    return count_ops(lambda: model(x.clone()))


@dataclass(frozen=True)
class ThirdPartyModel:
    name: str
    source: str  # whose code it is written from
    construct: str  # the Python construct that stops torch.fx
    make: Callable[[], nn.Module]  # the training form, weights from the global RNG
    convert: Callable[[nn.Module], nn.Module]  # the authors' deploy conversion, in place
    example: Shape  # the input repconv.fuse is given
    shapes: tuple[Shape, ...]  # where outputs are compared besides the example

    def training(self, seed: int = 0) -> nn.Module:
        """The training form in eval mode, random weights and BN statistics from ``seed``."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.make()
        return randomize_bn(model, seed)

    def hand_written(self, model: nn.Module) -> nn.Module:
        """The authors' deploy form of ``model`` (a converted deep copy; ``model`` unchanged)."""
        return self.convert(copy.deepcopy(model)).eval()


MODELS: tuple[ThirdPartyModel, ...] = (
    ThirdPartyModel(
        "dbb_resnet18", "DingXiaoH/DiverseBranchBlock (resnet.py, diversebranchblock.py)",
        "BNAndPadLayer writes the border in place: output[:, :, 0:p, :] = pad_values",
        dbb.dbb_resnet18, dbb.switch_to_deploy, (1, 3, 64, 64), IMAGE_SHAPES),
    ThirdPartyModel(
        "gelan_repncspelan4", "WongKinYiu/yolov9 (models/common.py, gelan-t.yaml)",
        "y = list(self.cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in [...]); Conv.default_act "
        "and RepConvN.default_act shared by every instance",
        yolo.GELANNet, yolo.yolov9_fuse, (1, 3, 64, 64), IMAGE_SHAPES),
    ThirdPartyModel(
        "yolov10_e2e_head", "ultralytics 8.3 (head.py Detect.forward_end2end, v10Detect.fuse)",
        "eval computes the one-to-many branch and discards it (export mode); anchors cached on "
        "self under `if self.dynamic or self.shape != shape`; x[i] = ... into the caller's list",
        yolov10.v10_detector, yolov10.ultralytics_fuse, (1, 3, 64, 64), DETECTOR_SHAPES),
    ThirdPartyModel(
        "yolov7_idetect", "WongKinYiu/yolov7 (models/yolo.py IDetect, models/common.py)",
        "IDetect: y[..., 0:2] = ... in place, self.grid[i] cached under a shape test, "
        "self.training |= self.export; ImplicitA (x + a) before and ImplicitM (x * m) after "
        "each output conv",
        yolov7.yolov7_idetect, yolov7.yolov7_fuse, (1, 3, 64, 64), DETECTOR_SHAPES),
    ThirdPartyModel(
        "size_flag_child", "issue 15's pattern",
        "self.block(x, big=x.shape[-1] > 96): the child's forward branches on the flag",
        padding.SizeFlagNet, padding.fold_size_flag_net, (1, 3, 64, 64), IMAGE_SHAPES),
    ThirdPartyModel(
        "mobilenet_v1_tf_padding", "transformers (modeling_mobilenet_v1.py)",
        "apply_tf_padding: `if in_height % stride_height == 0` on the input size",
        padding.MobileNetV1, padding.fold_mobilenet_v1, (1, 3, 64, 64), IMAGE_SHAPES),
    ThirdPartyModel(
        "mixnet_mixconv", "pytorchcv (models/common.py MixConv, MixConvBlock)",
        "for x_i, conv_i in zip(torch.split(x, ...), self._modules.values())",
        multi.MixNetTiny, multi.fold_mixnet, (1, 3, 64, 64), IMAGE_SHAPES),
    ThirdPartyModel(
        "tf_efficientnet_conv2d_same", "timm (layers/conv2d_same.py, _efficientnet_blocks.py)",
        "Conv2dSame: pad_same computes max(...) of x.size() before every call",
        padding.TfEfficientNetLite, padding.fold_tf_efficientnet, (1, 3, 64, 64),
        IMAGE_SHAPES),
    ThirdPartyModel(
        "effdet_shared_head", "rwightman/efficientdet-pytorch (efficientdet.py HeadNet)",
        "traces; each head conv is shared by every level, with one BN per level",
        multi.TinyEfficientDet, multi.fold_efficientdet, (1, 3, 64, 64), DETECTOR_SHAPES),
    ThirdPartyModel(
        "fcn_intermediate_layer_getter", "torchvision (models/_utils.py, segmentation/fcn.py)",
        "returns an OrderedDict; fx's trace returns an immutable_dict",
        multi.TinyFCN, multi.fold_fcn, (1, 3, 64, 64), IMAGE_SHAPES),
)
BY_NAME: dict[str, ThirdPartyModel] = {m.name: m for m in MODELS}
