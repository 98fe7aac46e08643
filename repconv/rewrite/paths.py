"""Module paths of traced nodes: which module runs a node, and how paths nest."""

from __future__ import annotations

from torch import fx


def stack(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}))


def module_path(node: fx.Node) -> str:
    """The module that runs ``node``: the called module itself, or the one whose forward holds
    the op ("" for the traced module's own forward)."""
    paths = stack(node)
    return str(node.target) if node.op == "call_module" else (paths[-1] if paths else "")


def frame_of(node: fx.Node) -> str:
    """The module whose forward runs ``node`` ("" for the traced module itself)."""
    paths = stack(node)
    if node.op == "call_module":
        return paths[-2] if len(paths) >= 2 else ""
    return paths[-1] if paths else ""


def join_path(scope: str, path: str) -> str:
    """``path`` inside module ``scope`` ("" is the model itself)."""
    return ".".join(filter(None, (scope, path)))


def common_path(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def inside(path: str, frame: str) -> bool:
    return frame == "" or path == frame or path.startswith(frame + ".")


def relative(path: str, frame: str) -> str:
    return path[len(frame) + 1:] if frame else path


def inside_nodes(gm: fx.GraphModule, frame: str) -> list[fx.Node]:
    """The nodes of ``gm`` that run inside module ``frame`` (all of them for "")."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
            and (frame == "" or frame in stack(n))]
