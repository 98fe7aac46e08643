"""Each region converted once, as it is applied: its numbers folded in float64, checked against
its own ops on a small input with those same numbers, cast once into its conv, and then the
float64 numbers dropped before the next region. The layer tensors that only this region read
are handed to the caller's ``release``, who may free them when it owns the model; a group of
regions applied all or none (the parts of a concat that absorb its map) hands them over once
every part has checked out."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from repconv.fold import algebra
from repconv.fold.folding import fold_region
from repconv.fold.graph import tensor_dtype
from repconv.fold.local_check import LOCAL_TOLERANCE, local_error, probe
from repconv.fold.region import Region
from repconv.fold.rules import Unary

# the tensors of a model that nothing fused reads any more: the caller's to free
Release = Callable[[list[Tensor]], None]
# (regions done, regions in all)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Converted:
    error: float  # the local check: scale-relative max error in float64
    identity: bool  # the folded map is the identity


def _storage(tensor: Tensor) -> int | None:
    if tensor.is_meta or not tensor.numel():
        return None
    return tensor.untyped_storage().data_ptr()


def _tensors(module: nn.Module, recurse: bool = True) -> list[Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _drop_views(region: Region, storages: set[int | None]) -> None:
    """Empty the region's own views of released tensors (its ops hold the layers' tensors), so
    their memory goes once the caller lets go of the layers' own."""
    with torch.no_grad():
        for op in region.ops:
            if isinstance(op, Unary):
                for tensor in (op.affine.weight, op.affine.bias):
                    if _storage(tensor) in storages:
                        tensor.set_()


class Converter:
    """The regions of one traced scope (``gm``, the module at path ``scope`` in ``model``): an
    empty conv per region (`convs`, by ``id(region)``: geometry and dtype, no storage) for the
    rewrite to place, and `settle`, which fills those that will be placed."""

    def __init__(self, gm: fx.GraphModule, regions: list[Region], seed: int, progress: Progress,
                 *, release: Release | None = None, model: nn.Module | None = None,
                 scope: str = "") -> None:
        self.gm, self.seed, self.progress = gm, seed, progress
        self.release, self.model, self.scope = release, model or gm, scope
        self.device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        self.convs = {id(r): algebra.empty_module(
            r.affine, tensor_dtype(r.sink) or torch.float32, "meta")
            for r in regions if not r.absorbed}  # an absorbed region's map is in its group's
        self.converted: dict[int, Converted] = {}
        self.workspace: Tensor | None = None  # float64 memory the regions' copies reuse

    def settle(self, regions: list[Region]) -> dict[int, str]:
        """Fold, check and fill the conv of each region (all of them will be placed, and every
        part of a group is among them); returns the reasons of those not to be placed: a local
        check failed, in the region or in another part of its group."""
        failed: dict[int, str] = {}
        readers, holders = (self._readers(), self._holders()) if self.release else ({}, {})
        held: dict[int, list[Region]] = defaultdict(list)  # a group's, released when it is whole
        for done, region in enumerate(regions):
            self.progress(done, len(regions))
            if region.absorbed:
                self.converted[id(region)] = Converted(0.0, False)
            else:
                error = self._convert(region)
                if error is not None:
                    failed[id(region)] = (f"local check failed: fused conv differs by "
                                          f"{error:.1e} (scale-relative)")
                    continue
            if region.group:
                held[region.group].append(region)
            elif self.release:
                self._release(region, readers, holders)
        broken = {r.group for r in regions if r.group and id(r) in failed}
        for group, parts in held.items():
            if group in broken:
                failed.update((id(r), "another part of its concat did not check out: the "
                               "concat's map stays whole") for r in parts)
            elif self.release:
                for region in parts:
                    self._release(region, readers, holders)
        return failed

    def _convert(self, region: Region) -> float | None:
        """Fold, check and fill the region's conv; the local error where the check fails."""
        numbers = algebra.Float64Copies(self.workspace)
        found = probe(self.gm, region, self.seed, numbers)
        if found is None:  # its ops do not run alone in float64: nothing proves the fold
            return math.inf
        numbers.spend()  # the fold may now overwrite the copies the probe read
        affine = fold_region(region, numbers)
        assert algebra.same_geometry(affine, region.affine), "analysis and fold agree"
        error = local_error(found, affine)
        if error > LOCAL_TOLERANCE:
            return error
        algebra.fill_module(self.convs[id(region)], affine, self.device)
        self.converted[id(region)] = Converted(error, affine.is_identity())
        wanted = numbers.wanted
        del affine, numbers, found  # the float64 numbers go before the next region's
        if wanted > (0 if self.workspace is None else self.workspace.numel()):
            self.workspace = None
            self.workspace = torch.empty(wanted, dtype=torch.float64, device=self.device)
        return None

    def _release(self, region: Region, readers: dict[int, set[fx.Node]],
                 holders: dict[int, set[str]]) -> None:
        assert self.release is not None
        unread = self._read_only_by(region, readers, holders)
        storages = {_storage(t) for t in unread}
        self.release(unread)
        _drop_views(region, storages)

    def _readers(self) -> dict[int, set[fx.Node]]:
        """The nodes of the scope's trace that read each storage: a module call reads all its
        tensors, an op reads the attributes it takes."""
        readers: dict[int, set[fx.Node]] = defaultdict(set)
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                tensors, users = _tensors(self.gm.get_submodule(node.target)), [node]
            elif node.op == "get_attr":
                value = self.gm
                for name in str(node.target).split("."):
                    value = getattr(value, name)
                tensors = [value] if isinstance(value, Tensor) else []
                users = [node, *node.users]
            else:
                continue
            for key in filter(None, map(_storage, tensors)):
                readers[key].update(users)
        return readers

    def _holders(self) -> dict[int, set[str]]:
        """The paths of the modules of the whole model that hold each storage."""
        holders: dict[int, set[str]] = defaultdict(set)
        for path, module in self.model.named_modules(remove_duplicate=False):
            for key in filter(None, map(_storage, _tensors(module, recurse=False))):
                holders[key].add(path)
        return holders

    def _read_only_by(self, region: Region, readers: dict[int, set[fx.Node]],
                      holders: dict[int, set[str]]) -> list[Tensor]:
        """The tensors of the modules the region calls that nothing else reads or holds: no
        other node of the trace, and no other module of the model (one registered twice, a
        weight tied to another layer)."""
        members = set(region.members)
        called = [m for m in region.members if m.op == "call_module"]
        paths = {".".join(filter(None, (self.scope, str(m.target)))) for m in called}
        found: dict[int, Tensor] = {}
        for member in called:
            for tensor in _tensors(self.gm.get_submodule(member.target)):
                key = _storage(tensor)
                if key is None or key in found or not readers[key] <= members:
                    continue
                if all(any(h == p or h.startswith(p + ".") for p in paths) for h in holders[key]):
                    found[key] = tensor
        return list(found.values())
