"""DBB-ResNet-18 written the way the DiverseBranchBlock repository (DingXiaoH) writes it.

Structure as in that repo's ``resnet.py`` with ``convnet_utils`` switched to DBB: the 7x7 stem and
every 1x1 shortcut are ``ConvBN`` blocks, every 3x3 conv is a ``DiverseBranchBlock`` with four
branches (kxk conv-BN; 1x1 conv-BN; 1x1 conv -> ``BNAndPadLayer`` -> avg pool -> BN; identity-based
1x1 -> ``BNAndPadLayer`` -> kxk conv -> BN). What stops ``torch.fx``:

* ``BNAndPadLayer.forward`` zero-pads the BN's output and then overwrites the four borders IN PLACE
  with the BN's value at zero: ``output[:, :, 0:p, :] = pad_values`` (a Proxy has no item
  assignment);
* ``DiverseBranchBlock.forward`` sums its branches with in-place ``out += ...`` and picks its path
  with ``hasattr`` on submodules;
* ``IdentityBasedConv1x1`` adds a plain (non-buffer) identity tensor to its weight on every call.

The deploy form is what the authors' ``convert.py`` produces: every module with a
``switch_to_deploy`` method is switched, in ``model.modules()`` order. Each DBB becomes one kxk conv
(``dbb_reparam``) holding the four branches merged with the repo's transforms I-VI; each ConvBN's
conv takes its BN. Numbers are this file's own code, written from the published transforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------ the repo's transforms


def fuse_bn(kernel: Tensor, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Transform I: a conv kernel followed by a BN -> kernel and bias."""
    std = (bn.running_var + bn.eps).sqrt()
    return (kernel * (bn.weight / std).reshape(-1, 1, 1, 1),
            bn.bias - bn.running_mean * bn.weight / std)


def merge_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor,
                  groups: int) -> tuple[Tensor, Tensor]:
    """Transform III: a 1x1 conv (k1, b1) then a kxk conv (k2, b2) -> one kxk conv."""
    if groups == 1:
        kernel = F.conv2d(k2, k1.permute(1, 0, 2, 3))
        bias = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
        return kernel, bias + b2
    kernels, biases = [], []
    k1_t = k1.permute(1, 0, 2, 3)
    w1, w2 = k1.size(0) // groups, k2.size(0) // groups
    for g in range(groups):
        k2_g = k2[g * w2:(g + 1) * w2]
        kernels.append(F.conv2d(k2_g, k1_t[:, g * w1:(g + 1) * w1]))
        biases.append((k2_g * b1[g * w1:(g + 1) * w1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
    return torch.cat(kernels), torch.cat(biases) + b2


def avg_kernel(channels: int, kernel_size: int, groups: int) -> Tensor:
    """Transform V: a kxk average pool as a grouped conv kernel."""
    input_dim = channels // groups
    kernel = torch.zeros(channels, input_dim, kernel_size, kernel_size)
    kernel[torch.arange(channels), torch.arange(channels) % input_dim] = 1.0 / kernel_size**2
    return kernel


def pad_to(kernel: Tensor, size: int) -> Tensor:
    """Transform VI: a small kernel zero-padded to size x size around its centre."""
    h, w = (size - kernel.size(2)) // 2, (size - kernel.size(3)) // 2
    return F.pad(kernel, [w, w, h, h])


# ------------------------------------------------------------------ blocks


def conv_bn_seq(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                     groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels))
    return seq


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1x1 conv whose effective kernel is ``weight + identity`` (weight starts at zero)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        identity = torch.zeros(channels, input_dim, 1, 1)
        identity[torch.arange(channels), torch.arange(channels) % input_dim] = 1.0
        self.id_tensor = identity.type_as(self.weight)  # a plain attribute, as in the repo
        nn.init.zeros_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation,
                        groups=self.groups)

    def get_actual_kernel(self) -> Tensor:
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    """BN, then a border of ``pad_pixels`` holding the BN's value at zero, written in place."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input: Tensor) -> Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            bn = self.bn
            pad_values = (bn.bias.detach()
                          - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var
                                                                              + bn.eps))
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        assert padding == kernel_size // 2
        self.dbb_origin = conv_bn_seq(in_channels, out_channels, kernel_size, stride, padding,
                                      groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0,
                                                      groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn_seq(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0,
                                                           groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size,
                                                       stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        k_origin, b_origin = fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            k_1x1 = pad_to(k_1x1, self.kernel_size)
        else:
            k_1x1, b_1x1 = 0, 0
        kxk = self.dbb_1x1_kxk
        first = kxk.idconv1.get_actual_kernel() if hasattr(kxk, "idconv1") else kxk.conv1.weight
        k_first, b_first = fuse_bn(first, kxk.bn1.bn)
        k_second, b_second = fuse_bn(kxk.conv2.weight, kxk.bn2)
        k_1x1_kxk, b_1x1_kxk = merge_1x1_kxk(k_first, b_first, k_second, b_second, self.groups)
        k_avg = avg_kernel(self.out_channels, self.kernel_size, self.groups)
        k_avg_second, b_avg_second = fuse_bn(k_avg.to(self.dbb_avg.avgbn.weight.device),
                                             self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k_avg_first, b_avg_first = fuse_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
            k_avg, b_avg = merge_1x1_kxk(k_avg_first, b_avg_first, k_avg_second, b_avg_second,
                                         self.groups)
        else:
            k_avg, b_avg = k_avg_second, b_avg_second
        return (k_origin + k_1x1 + k_1x1_kxk + k_avg, b_origin + b_1x1 + b_1x1_kxk + b_avg)

    def switch_to_deploy(self) -> None:
        if hasattr(self, "dbb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(origin.in_channels, origin.out_channels, origin.kernel_size,
                                     origin.stride, origin.padding, origin.dilation,
                                     origin.groups, bias=True)
        self.dbb_reparam.weight.data = kernel
        self.dbb_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        del self.dbb_origin, self.dbb_avg, self.dbb_1x1_kxk
        if hasattr(self, "dbb_1x1"):
            del self.dbb_1x1

    def forward(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class ConvBN(nn.Module):
    """The repo's plain conv-BN (used for 1x1 and >= 7x7 kernels), with its own switch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "bn"):
            return self.nonlinear(self.bn(self.conv(x)))
        return self.nonlinear(self.conv(x))

    def switch_to_deploy(self) -> None:
        kernel, bias = fuse_bn(self.conv.weight, self.bn)
        old = self.conv
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                         old.padding, old.dilation, old.groups, bias=True)
        conv.weight.data = kernel
        conv.bias.data = bias
        for param in self.parameters():
            param.detach_()
        del self.conv, self.bn
        self.conv = conv


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
            padding: int = 0, nonlinear: nn.Module | None = None) -> nn.Module:
    """The repo's builder with CONV_BN_IMPL = 'DBB': 1x1 and >= 7x7 stay ConvBN."""
    if kernel_size == 1 or kernel_size >= 7:
        return ConvBN(in_channels, out_channels, kernel_size, stride, padding, nonlinear)
    return DiverseBranchBlock(in_channels, out_channels, kernel_size, stride, padding,
                              nonlinear=nonlinear)


# ------------------------------------------------------------------ ResNet-18


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = conv_bn(in_planes, planes, 1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv_bn(in_planes, planes, 3, stride, 1, nonlinear=nn.ReLU())
        self.conv2 = conv_bn(planes, planes, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 width_multiplier: float = 0.25) -> None:
        super().__init__()
        self.in_planes = int(64 * width_multiplier)
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", conv_bn(3, self.in_planes, 7, 2, 3, nonlinear=nn.ReLU()))
        self.stage0.add_module("maxpool", nn.MaxPool2d(3, 2, 1))
        widths = [int(w * width_multiplier) for w in (64, 128, 256, 512)]
        self.stage1 = self._make_stage(widths[0], num_blocks[0], 1)
        self.stage2 = self._make_stage(widths[1], num_blocks[1], 2)
        self.stage3 = self._make_stage(widths[2], num_blocks[2], 2)
        self.stage4 = self._make_stage(widths[3], num_blocks[3], 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.stage4(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def dbb_resnet18(width_multiplier: float = 0.25, num_classes: int = 10) -> ResNet:
    """Training form. The identity-based 1x1 weights start at zero in the repo; a trained model's
    are not, so they get small random values here (from the global RNG: seed it first)."""
    model = ResNet((2, 2, 2, 2), num_classes, width_multiplier)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IdentityBasedConv1x1):
                m.weight.normal_(0.0, 0.2)
    return model


@torch.no_grad()
def switch_to_deploy(model: nn.Module) -> nn.Module:
    """What the repo's ``convert.py`` does, on the model it is given."""
    for m in model.modules():
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
    return model.eval()
