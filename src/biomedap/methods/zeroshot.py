"""Zero-shot classification with hand-written templates (Radford et al., 2021).

Each class's classifier is the normalised mean of the normalised text features of its prompts
(one per template); logits are ``s · f tᵀ``.  The published BiomedCLIP baseline uses the single
template "a photo of a {}."; several templates are averaged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .base import Batch, Method, MethodConfig, class_text_features


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: tuple[str, ...] = field(
        default=("a photo of a {}.",),
        metadata={"help": "prompt templates with one '{}' for the class name; several are averaged"},
    )

    def __post_init__(self):
        if not self.templates:
            raise ValueError("templates: give at least one template")
        for template in self.templates:
            if template.count("{}") != 1:
                raise ValueError(f"templates: {template!r} must contain exactly one '{{}}' for the class name")


class ZeroShot(Method):
    name = "zeroshot"
    summary = "Zero-shot: class-name prompts from one or several templates, no training"
    Config = ZeroShotConfig
    trainable = False

    def __init__(self, backbone, classnames: Sequence[str], config: ZeroShotConfig | None = None):
        super().__init__(backbone, classnames, config)
        self._build_classifier()

    def _build_classifier(self) -> None:
        texts = [[t.format(name) for t in self.config.templates] for name in self.classnames]
        self.register_buffer("text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._build_classifier()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logit_scale * self.image_features(batch) @ self.text_features.t()
