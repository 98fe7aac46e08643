"""Counting what a model executes: aten ops seen through a ``TorchDispatchMode``.

Module counts and MACs on paper can lie (an ``nn.Identity`` runs nothing, a BatchNorm turned
into a depthwise conv runs a slower op). This counts the ops that actually reach the kernels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten op names (overload packet) by the kind of work they do
CONV_OPS = frozenset({"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                      "conv_transpose2d", "conv_transpose3d", "_convolution",
                      "mkldnn_convolution"})
MATMUL_OPS = frozenset({"addmm", "mm", "linear", "bmm", "matmul", "baddbmm"})
NORM_OPS = frozenset({"_native_batch_norm_legit_no_training", "native_batch_norm",
                      "_native_batch_norm_legit", "batch_norm", "cudnn_batch_norm",
                      "_batch_norm_impl_index"})
# ops that only read metadata or make views: they move no data
FREE_OPS = frozenset({"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute",
                      "squeeze", "unsqueeze", "alias", "detach", "slice", "select", "split",
                      "chunk", "unbind", "as_strided", "size", "stride", "dim", "sym_size",
                      "sym_stride", "sym_numel", "is_contiguous", "_assert_async", "lift_fresh"})


@dataclass
class OpCounts:
    """aten ops executed, by name, with the conv and BatchNorm totals split out."""

    ops: Counter[str] = field(default_factory=Counter)

    @property
    def convs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in CONV_OPS)

    @property
    def matmuls(self) -> int:
        return sum(n for name, n in self.ops.items() if name in MATMUL_OPS)

    @property
    def batchnorms(self) -> int:
        return sum(n for name, n in self.ops.items() if name in NORM_OPS)

    @property
    def total(self) -> int:
        """Ops that move data (views and metadata reads excluded)."""
        return sum(n for name, n in self.ops.items() if name not in FREE_OPS)

    def to_dict(self) -> dict[str, Any]:
        return {"convs": self.convs, "matmuls": self.matmuls, "batchnorms": self.batchnorms,
                "total": self.total, "ops": dict(sorted(self.ops.items()))}


class _Counting(TorchDispatchMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> OpCounts:
    """The aten ops ``run()`` executes, under ``torch.no_grad``."""
    counts: Counter[str] = Counter()
    with torch.no_grad(), _Counting(counts):
        run()
    return OpCounts(counts)
