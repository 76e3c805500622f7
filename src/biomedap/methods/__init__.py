"""Method registry: an explicit table, the one place to add a method besides its own file."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .base import Batch, Method, MethodConfig, TrainingData, class_text_features
# One import per method file.
from .biomedap import BiomedAP, BiomedAPConfig
from .biomedcoop import BiomedCoOp, BiomedCoOpConfig
from .biomeddpt import BiomedDPT, BiomedDPTConfig
from .biovlm import BioVLM, BioVLMConfig
from .clip_adapter import ClipAdapter, ClipAdapterConfig
from .cocoop import CoCoOp, CoCoOpConfig
from .coop import CoOp, CoOpConfig
from .kgcoop import KgCoOp, KgCoOpConfig
from .linear_probe import LinearProbe, LinearProbeConfig
from .lp_plus_plus import LPPlusPlus, LPPlusPlusConfig
from .prograd import ProGrad, ProGradConfig
from .tip_adapter import TipAdapter, TipAdapterConfig
from .tip_adapter_f import TipAdapterF, TipAdapterFConfig
from .zeroshot import ZeroShot, ZeroShotConfig

if TYPE_CHECKING:
    from ..backbone import Backbone

# The order is the order of `biomedap list methods`.
_METHOD_CLASSES: tuple[type[Method], ...] = (
    ZeroShot,
    CoOp,
    CoCoOp,
    KgCoOp,
    ProGrad,
    BiomedCoOp,
    BiomedDPT,
    BiomedAP,
    BioVLM,
    ClipAdapter,
    TipAdapter,
    TipAdapterF,
    LinearProbe,
    LPPlusPlus,
)
METHODS: Mapping[str, type[Method]] = {cls.name: cls for cls in _METHOD_CLASSES}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (case-insensitive, '-' and '_' ignored, '+' read as
    'plus', so ``lp++`` finds ``lp_plus_plus``)."""
    key = name.lower().replace("-", "").replace("_", "").replace("+", "plus")
    for registered, cls in METHODS.items():
        if registered.replace("-", "").replace("_", "").replace("+", "plus") == key:
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
    "BioVLM",
    "BioVLMConfig",
    "BiomedAP",
    "BiomedAPConfig",
    "BiomedCoOp",
    "BiomedCoOpConfig",
    "BiomedDPT",
    "BiomedDPTConfig",
    "CoCoOp",
    "CoCoOpConfig",
    "ClipAdapter",
    "ClipAdapterConfig",
    "CoOp",
    "CoOpConfig",
    "KgCoOp",
    "KgCoOpConfig",
    "LPPlusPlus",
    "LPPlusPlusConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "Method",
    "MethodConfig",
    "ProGrad",
    "ProGradConfig",
    "TrainingData",
    "TipAdapter",
    "TipAdapterConfig",
    "TipAdapterF",
    "TipAdapterFConfig",
    "ZeroShot",
    "ZeroShotConfig",
    "build_method",
    "class_text_features",
    "get_method",
    "list_methods",
]
