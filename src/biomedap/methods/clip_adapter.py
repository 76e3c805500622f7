"""CLIP-Adapter: a residual bottleneck MLP on the image feature (Gao et al., IJCV 2024; arXiv 2021).

For a normalised image feature ``f`` (reference notes: baselines.md §3.6)::

    A(f)  = ReLU(W₂ · ReLU(W₁ f))                W₁: D → D/reduction, W₂: D/reduction → D, no biases
    f'    = ratio · A(f) + (1 − ratio) · f       (re-normalised when ``renormalize``)
    z     = s · f' W_textᵀ

``W_text`` [C, D] are the normalised features of ``template`` ("a photo of a {}."), computed once in
eval mode (a non-persistent buffer); ``s`` is the backbone's logit scale (exp of the checkpoint's,
≈ 85.23 for BiomedCLIP; the published harness hard-coded 85.2323).  Only the adapter trains
(cross-entropy; PyTorch's default Linear initialisation, drawn from the run seed); the last
epoch's adapter is used.

``variant`` sets the defaults of ``ratio`` and ``renormalize`` (an explicit value wins):

* ``"paper"`` (default): ratio 0.2 with re-normalisation, the original CLIP-Adapter.  The original
  applied the adapter to the *raw* CLIP feature and normalised after blending; the adapter here
  sees the normalised feature (the cache stores normalised features).  With re-normalisation the
  two are identical: A has no biases and only ReLUs, so it is positively homogeneous
  (A(c·f) = c·A(f) for c > 0) and the blend scales with ‖f‖, which the normalisation removes.
* ``"released"``: ratio 0.5 without re-normalisation, what BiomedCoOp's harness ran (code from the
  LP++ repository); its optimiser and per-iteration schedule are in the preset's
  ``variants.released`` table (SGD lr 0.01, no momentum or weight decay, one warm-up iteration at
  1e-5, then a cosine of period 20 *iterations*).

The adapter is class-agnostic, so the method can be re-targeted to other class names
(:meth:`ClipAdapter.set_classnames` rebuilds ``W_text``); note that the published harness never
evaluated CLIP-Adapter on novel classes (it forced all classes), so no published base-to-novel
number exists to compare with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Method, MethodConfig, class_text_features

# (ratio, renormalize) of each variant; an explicit config value overrides it.
_VARIANT_DEFAULTS: dict[str, tuple[float, bool]] = {"paper": (0.2, True), "released": (0.5, False)}


@dataclass
class ClipAdapterConfig(MethodConfig):
    template: str = field(
        default="a photo of a {}.",
        metadata={"help": "prompt whose normalised text features form the classifier ('{}' = class)"},
    )
    ratio: float | None = field(
        default=None,
        metadata={"help": "residual ratio: f' = ratio·A(f) + (1 − ratio)·f; null = the variant's "
                          "(paper 0.2, released 0.5)"},
    )
    renormalize: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise f' before the classifier; null = the variant's "
                          "(paper true, released false)"},
    )
    reduction: int = field(
        default=4, metadata={"help": "bottleneck reduction: the adapter's hidden width is D / reduction"}
    )
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: ratio 0.2 with re-normalisation (original CLIP-Adapter) | "
                          "released: ratio 0.5, no re-normalisation (BiomedCoOp's run; optimiser in the "
                          "preset's variants table)"},
    )

    def __post_init__(self):
        if self.variant not in _VARIANT_DEFAULTS:
            raise ValueError(f"variant must be paper or released, got {self.variant!r}")
        if self.template.count("{}") != 1:
            raise ValueError(f"template: {self.template!r} must contain exactly one '{{}}' "
                             "for the class name")
        # Resolved here so that run cards and run ids record the values actually used.
        ratio, renormalize = _VARIANT_DEFAULTS[self.variant]
        if self.ratio is None:
            self.ratio = ratio
        if self.renormalize is None:
            self.renormalize = renormalize
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.reduction < 1:
            raise ValueError(f"reduction must be ≥ 1, got {self.reduction}")


class Adapter(nn.Module):
    """``ReLU(W₂ · ReLU(W₁ x))``: the bottleneck MLP of CLIP-Adapter (no biases)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"reduction: {reduction} leaves no hidden unit for feature dimension {dim}")
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ClipAdapter(Method):
    name = "clip_adapter"
    summary = "CLIP-Adapter: residual bottleneck MLP on the image feature, zero-shot text classifier"
    Config = ClipAdapterConfig
    trainable = True
    supports_unseen_classes = True
    uses_validation = False

    def __init__(self, backbone, classnames: Sequence[str], config: ClipAdapterConfig | None = None):
        super().__init__(backbone, classnames, config)
        self.adapter = Adapter(backbone.embed_dim, self.config.reduction).to(backbone.device)
        self._build_text_features()

    def _build_text_features(self) -> None:
        texts = [[self.config.template.format(name)] for name in self.classnames]
        self.register_buffer("text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the (class-agnostic) adapter to other class names: rebuilds the text classifier."""
        self.classnames = list(classnames)
        self._build_text_features()

    def adapted_features(self, features: torch.Tensor) -> torch.Tensor:
        """``f' = ratio·A(f) + (1 − ratio)·f``, re-normalised when configured."""
        ratio = self.config.ratio
        mixed = ratio * self.adapter(features) + (1.0 - ratio) * features
        return F.normalize(mixed, dim=-1) if self.config.renormalize else mixed

    def forward(self, batch: Batch) -> torch.Tensor:
        features = self.adapted_features(self.image_features(batch))
        return self.logit_scale * features @ self.text_features.t()
