"""Method registry: an explicit table, the one place to add a method besides its own file."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .base import Batch, Method, MethodConfig, TrainingData, class_text_features
# One import per method file.
from .coop import CoOp, CoOpConfig
from .zeroshot import ZeroShot, ZeroShotConfig

if TYPE_CHECKING:
    from ..backbone import Backbone

# The order is the order of `biomedap list methods`.
_METHOD_CLASSES: tuple[type[Method], ...] = (
    ZeroShot,
    CoOp,
)
METHODS: Mapping[str, type[Method]] = {cls.name: cls for cls in _METHOD_CLASSES}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (case-insensitive, '-' and '_' ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    for registered, cls in METHODS.items():
        if registered.replace("-", "").replace("_", "") == key:
            return cls
    close = difflib.get_close_matches(name.lower(), list(METHODS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}.{hint}")


def list_methods() -> list[type[Method]]:
    return list(METHODS.values())


def build_method(
    name: str,
    backbone: Backbone,
    classnames: Sequence[str],
    config: MethodConfig | Mapping | None = None,
    *,
    seed: int = 0,
) -> Method:
    """Construct a method; its random initialisation is drawn from ``seed``, not the global RNG."""
    from ..config import config_from_dict

    cls = get_method(name)
    if config is None or isinstance(config, Mapping):
        config = config_from_dict(cls.Config, dict(config or {}), where=f"{cls.name}.method_config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(backbone, classnames, config)


__all__ = [
    "METHODS",
    "Batch",
    "CoOp",
    "CoOpConfig",
    "Method",
    "MethodConfig",
    "TrainingData",
    "ZeroShot",
    "ZeroShotConfig",
    "build_method",
    "class_text_features",
    "get_method",
    "list_methods",
]
