"""Why ops are left as they are: each BatchNorm left unfused, and each cut, is reported once
with its real reason."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from repconv.fold.graph import data_users
from repconv.fold.region import Region
from repconv.fold.rules.base import describe

# what a reason says, in words a summary groups by: (cause, phrases of reasons that are it)
CAUSES = (
    ("no conv next to it", ("no conv to merge into",)),
    ("never called", ("never called",)),
    ("shared layer", ("shared by",)),
    ("forward cannot be rewritten", ("could not be rewritten", "does not trace",
                                     "not visible in", "own forward")),
    ("would cost more", ("cost:",)),
    ("tensors read elsewhere", ("read elsewhere",)),
    ("statistics or mode", ("train mode", "running statistics", "running_var", "training mode")),
    ("fold did not check out", ("local check failed",)),
    ("dtype or in-place change", ("dtype changes", "changed in place", ".shape is read")),
    ("borders would differ", ("borders", "padding misaligned", "asymmetric padding")),
)
OTHER_CAUSE = "not a linear op here"


@dataclass(frozen=True)
class Skip:
    """Something left unfused, where, and why. ``kind``: "batchnorm", "merge" (a sum or
    concat of branches) or "op"."""

    where: str
    reason: str
    kind: str = "op"

    @property
    def cause(self) -> str:
        """The reason's kind, for a summary that groups by it."""
        return next((cause for cause, phrases in CAUSES
                     if any(phrase in self.reason for phrase in phrases)), OTHER_CAUSE)

    @property
    def folds_elsewhere(self) -> bool:
        """A BatchNorm a hand-written deploy form would fold into its conv: one that has a conv
        next to it and runs."""
        return self.kind == "batchnorm" and self.cause not in ("no conv next to it",
                                                               "never called")


def is_norm(label: str) -> bool:
    return "norm" in label.lower()


def kind_of(node: fx.Node, module: object = None) -> str:
    """"batchnorm", "merge" or "op" for the node left unfused (``module``: what it calls)."""
    name = getattr(node.target, "__name__", str(node.target))
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "batch_norm":
        return "batchnorm"
    if name in ("add", "iadd", "sub", "isub", "cat", "concat") or node.target in ("add", "sub"):
        return "merge"
    return "op"


def account(
    regions: list[Region], lone: list[Region], refused: dict[fx.Node, str],
    cut_at: dict[fx.Node, str],
) -> tuple[list[Skip], list[Skip]]:
    """Sort the reasons into what is left as it is (skips) and where a larger fold was cut
    (cuts): each op left is listed once with its real reason (a BatchNorm that merges into
    nothing says why); a cut whose pieces still fold is not "left"."""
    skips = [Skip(describe(node), reason, _kind(node)) for node, reason in refused.items()]
    explained: set[fx.Node] = set()
    for region in lone:
        norms = [m for m, label in zip(region.members, region.labels) if is_norm(label)]
        if not norms:
            continue
        near = [n for n in (region.sink, *data_users(region.sink)) if n in cut_at]
        explained.update(near)
        reason = cut_at[near[0]] if near else _no_conv_reason(region, refused)
        skips += [Skip(describe(n), reason, "batchnorm") for n in norms]
    folded = {m for region in regions for m in region.members}
    cuts = []
    for node, reason in cut_at.items():
        if node in folded:
            cuts.append(Skip(describe(node), reason, _kind(node)))
        elif node not in explained:
            skips.append(Skip(describe(node), reason, _kind(node)))
    # each place once (a conv shared by two call sites is refused at both)
    return list(dict.fromkeys(skips)), list(dict.fromkeys(cuts))


def _no_conv_reason(region: Region, refused: dict[fx.Node, str]) -> str:
    """Why a BatchNorm merges into no conv: it would run as a depthwise conv, slower than the
    BatchNorm it replaced, so it stays (docs/design.md "3. Rules and regions", "Never
    slower")."""
    source = region.root
    others = sorted({label for label in region.labels if not is_norm(label)})
    readers = [u.name for u in data_users(source) if u not in region.members]
    if others:
        where = f"it merges only with {', '.join(others)}, which is no conv"
    elif source.op == "placeholder":
        where = f"it reads the input {source.name} directly"
    elif source in refused:
        where = f"{describe(source)} before it cannot fold: {refused[source]}"
    elif readers:
        users = len(data_users(source))
        where = (f"its input {describe(source)} has {users} users ({', '.join(readers)} too), "
                 "so folding into it would change what they see")
    else:
        where = f"its input comes from {describe(source)}, which is not a linear op"
    return (f"no conv to merge into: {where}; kept as a BatchNorm, which runs faster than the "
            "depthwise conv it would become")


def _kind(node: fx.Node) -> str:
    module = node.graph.owning_module.get_submodule(str(node.target)) if (
        node.op == "call_module" and node.graph.owning_module is not None) else None
    return kind_of(node, module)
