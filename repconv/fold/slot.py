"""The slot a folded module leaves: still what it was to whoever looks, the identity when run.

A chain fold swaps its BatchNorm module out. Detector frameworks call their own ``fuse()`` on
every model they load, and it folds ``m.bn`` into ``m.conv`` wherever ``hasattr(m, "bn")``,
reading ``bn.weight``, ``bias``, ``running_mean``, ``running_var`` and ``eps``; an
``nn.Identity`` there breaks them. The slot is a plain torch BatchNorm of the same width whose
statistics make that fold exactly the identity (weight 1, bias 0, mean 0, var 1, eps 0:
``w * 1 / sqrt(1 + 0) = w`` bit for bit), so a framework's fuse() is an exact no-op, and whose
instance ``forward`` is an ``nn.Identity``'s bound forward, so running it executes no op (and
code that ignores the instance forward, TorchScript say, computes ``x * 1 + 0 = x`` exactly).
Tracing reads it as the identity (`repconv.fold.graph.runs_identity`).

Only torch classes: a pickled deploy model unpickles, deep-copies, converts (``.half()``,
``.to()``) and exports with torch alone. The slot's tensors are non-persistent buffers, so the
deploy state_dict is what it was with an ``nn.Identity`` there (no keys for the slot) and a
recorded plan replays to the same slot.

Other folded modules that hold only small per-channel tensors (YOLOv7's ImplicitA ``x + a`` and
ImplicitM ``x * m``, a layer scale) get the same kind of slot, of their own class: each tensor
at 0, or each at 1, whichever makes the class's forward return its input exactly on a probe
(checked, bit for bit). A framework's own fuse() reading them (YOLOv7's ``IDetect.fuse``:
``bias += W @ ia.implicit``, ``weight *= im.implicit``) then adds 0 and multiplies by 1, and
switches to its deploy forward, which calls them no more. Any other module leaves
``nn.Identity``.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repconv.fold.graph import eager_differs, runs_identity

_IDENTITY_STATISTICS = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def vacated(replaced: nn.Module) -> nn.Module:
    """What takes the place of a module a fold made redundant: the identity BatchNorm slot for
    a BatchNorm (of the same width, dtype and device), a neutral slot of its own class for a
    module of small per-channel tensors that can be one, ``nn.Identity`` for anything else."""
    if not isinstance(replaced, _BatchNorm):
        return _neutral_slot(replaced) or nn.Identity()
    kind = next((k for k in (nn.BatchNorm1d, nn.BatchNorm3d) if isinstance(replaced, k)),
                nn.BatchNorm2d)
    like = next((t for t in (replaced.running_var, replaced.weight) if t is not None), None)
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    # no running-statistics tracking: loading a state_dict would add a num_batches_tracked key
    slot = kind(replaced.num_features, eps=0.0, affine=False, track_running_stats=False,
                device=device, dtype=dtype)
    for name, value in _IDENTITY_STATISTICS.items():
        slot._parameters.pop(name, None)
        slot._buffers.pop(name, None)
        slot.register_buffer(name, torch.full((replaced.num_features,), value, dtype=dtype,
                                              device=device), persistent=False)
    return _running_as_identity(slot, f"{replaced.num_features}, folded: runs as the identity")


def _running_as_identity(slot: nn.Module, description: str) -> nn.Module:
    """``slot`` in eval mode, its instance ``forward`` the identity and its repr saying so."""
    # instance attributes win over the class's methods (a bound method, not a module: a
    # tracer that steps into the slot calls a plain function, and TorchScript scripts it)
    slot.forward = nn.Identity().forward
    slot.extra_repr = functools.partial(str, description)
    return slot.eval()


# a per-channel tensor: at most one dimension above 1, and no more elements than this
_MAX_SLOT_ELEMENTS = 1 << 16


def _neutral_slot(replaced: nn.Module) -> nn.Module | None:
    """``replaced``'s class holding each of its tensors at 0 (or else each at 1) where that
    makes the class's forward return a probe input exactly, running as the identity; None
    where no such slot is proven."""
    tensors = {**dict(replaced.named_parameters(recurse=False)),
               **dict(replaced.named_buffers(recurse=False))}
    if (not tensors or next(replaced.children(), None) is not None
            or eager_differs(replaced) is not None
            or any(not t.is_floating_point() or t.numel() > _MAX_SLOT_ELEMENTS
                   or sum(d > 1 for d in t.shape) > 1 for t in tensors.values())):
        return None
    widest = max(tensors.values(), key=lambda t: (t.dim(), t.numel()))
    probe = torch.randn([d if d > 1 else 3 for d in widest.shape] or [3],
                        generator=torch.Generator().manual_seed(0)).to(widest)
    for value in (0.0, 1.0):
        slot = _emptied_copy(replaced)
        for name, tensor in tensors.items():
            slot.register_buffer(name, torch.full_like(tensor.detach(), value), persistent=False)
        try:
            with torch.no_grad():
                out = type(slot).forward(slot, probe.clone())
        except Exception:  # a forward the probe does not fit: no slot proven
            return None
        if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.equal(out, probe):
            return _running_as_identity(slot, f"folded: runs as the identity, its tensors at "
                                              f"{value:g}")
    return None


def _emptied_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with registries and hook tables of its own, all empty."""
    copied = copy.copy(module)
    for name, value in vars(module).items():
        if name.startswith("_") and isinstance(value, (dict, set)):
            copied.__dict__[name] = type(value)()
    return copied


def is_identity_slot(module: nn.Module | None) -> bool:
    """Whether ``module`` is a slot `vacated` made (or one that computes the same): a
    BatchNorm whose instance forward is an ``nn.Identity``, with identity statistics."""
    if module is None:
        return False
    if not (isinstance(module, _BatchNorm) and runs_identity(module)):
        return False
    return all(isinstance(getattr(module, name, None), torch.Tensor)
               and bool((getattr(module, name) == value).all())
               for name, value in _IDENTITY_STATISTICS.items()) and module.eps == 0.0


def real_batchnorms(model: nn.Module) -> int:
    """The BatchNorms of ``model`` that normalise (identity slots left out)."""
    return sum(isinstance(m, _BatchNorm) and not is_identity_slot(m) for m in model.modules())
