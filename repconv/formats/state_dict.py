"""Fitting a state_dict to a model: where training scripts keep the weights, the prefixes
DataParallel, Lightning and torch.compile add, and a load that names what does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from repconv.errors import ModelBuildError
from repconv.formats.tensors import check_tensors

# Where training scripts keep the weights, in the order repconv looks.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
PREFIXES = ("module.", "model.", "_orig_mod.")


def is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _fit_keys(
    weights: Mapping[str, Tensor], expected: set[str], found: list[str]
) -> dict[str, Tensor]:
    """Strip DataParallel/Lightning/compile prefixes while that makes the keys fit better."""
    weights = dict(weights)
    for _ in range(3):
        if set(weights) <= expected:
            break
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in weights):
                weights = {key[len(prefix):]: value for key, value in weights.items()}
                found.append(f"stripped key prefix {prefix!r}")
                break
        else:
            break
    return weights


def load_weights(model: nn.Module, weights: Mapping[str, Tensor], found: list[str]) -> None:
    own = model.state_dict()
    weights = _fit_keys(weights, set(own), found)
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        def listing(keys: list[str]) -> str:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            return f"{len(keys)} ({shown})" if keys else "0"

        raise ModelBuildError(
            f"checkpoint does not fit the model: missing keys {listing(missing)}, unexpected "
            f"keys {listing(unexpected)}; check --model and --model-kwargs"
        )
    check_tensors(weights, own)
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if wrong:
        raise ModelBuildError(f"checkpoint shapes do not fit the model: {len(wrong)} tensors "
                              f"differ ({'; '.join(wrong[:3])}); check --model-kwargs")
    model.load_state_dict({**own, **weights}, strict=True, assign=True)
