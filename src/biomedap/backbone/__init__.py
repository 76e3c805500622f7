"""The frozen backbone: loading, tower adapters and the tiny test model."""

from .core import Backbone, BackboneIdentity
from .loading import (
    ALIASES,
    BIOMEDBERT_HUB_ID,
    BIOMEDCLIP_HUB_ID,
    BackboneLoadError,
    MissingWeightsError,
    load_backbone,
    save_local_dir,
)
from .tiny import build_random_biomedclip, build_tiny_backbone
from .towers import BlockHook, TokenizedText, UnsupportedBackboneError

__all__ = [
    "ALIASES",
    "BIOMEDBERT_HUB_ID",
    "BIOMEDCLIP_HUB_ID",
    "Backbone",
    "BackboneIdentity",
    "BackboneLoadError",
    "BlockHook",
    "MissingWeightsError",
    "TokenizedText",
    "UnsupportedBackboneError",
    "build_random_biomedclip",
    "build_tiny_backbone",
    "load_backbone",
    "save_local_dir",
]
