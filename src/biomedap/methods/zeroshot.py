"""Zero-shot classification with hand-written templates or class descriptions (Radford et al., 2021).

Each class's classifier is the normalised mean of the normalised text features of its prompts
(one per template, or one per description); logits are ``s · f tᵀ``.  The published BiomedCLIP
baseline uses the single template "a photo of a {}."; its ensemble variant averages the first 50
LLM-written descriptions of each class. Here ``descriptions`` names a bank: ``builtin`` (biomedap's
own bank for the dataset, found from the class names), ``builtin:<dataset>``, or a user's JSON /
Python-literal file (see :func:`biomedap.prompts.resolve_descriptions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..prompts.banks import resolve_descriptions
from ..prompts.templates import format_template, resolve_template
from .base import Batch, Method, MethodConfig, class_text_features


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: tuple[str, ...] = field(
        default=("a photo of a {}.",),
        metadata={"help": "prompt templates with one '{}' for the class name, or template ids such as "
                          "'quality/generic' or 'clinical/btmri' (`biomedap prompts templates`); several "
                          "are averaged"},
    )

    descriptions: str | None = field(
        default=None,
        metadata={"help": "description bank used instead of the templates: 'builtin' (biomedap's bank for the "
                          "dataset's classes), 'builtin:<dataset key>', or a .json / .py bank file "
                          "(FILE.py:NAME picks one of several dicts); each class's classifier is the mean of "
                          "its first max_descriptions descriptions"},
    )
    max_descriptions: int = field(
        default=50, metadata={"help": "descriptions used per class (the published ensemble used the first 50)"}
    )

    def __post_init__(self):
        if self.max_descriptions < 1:
            raise ValueError(f"max_descriptions must be ≥ 1, got {self.max_descriptions}")
        if not self.templates:
            raise ValueError("templates: give at least one template")
        for template in self.templates:
            text = resolve_template(template)
            if text.count("{}") != 1:
                shown = f"{template!r} ({text!r})" if text != template else repr(template)
                raise ValueError(f"templates: {shown} must contain exactly one '{{}}' for the class name "
                                 "(a template without the class name scores every class the same)")


class ZeroShot(Method):
    name = "zeroshot"
    summary = "Zero-shot: class-name prompts from templates or a description bank, no training"
    Config = ZeroShotConfig
    trainable = False

    def __init__(self, backbone, classnames: Sequence[str], config: ZeroShotConfig | None = None):
        super().__init__(backbone, classnames, config)
        self._build_classifier()

    def _build_classifier(self) -> None:
        if self.config.descriptions:
            bank = resolve_descriptions(self.config.descriptions, self.classnames,
                                        limit=self.config.max_descriptions, method=self.name)
            texts = [bank[name] for name in self.classnames]
        else:
            templates = [resolve_template(t) for t in self.config.templates]
            texts = [[format_template(t, name) for t in templates] for name in self.classnames]
        self.register_buffer("text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._build_classifier()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logit_scale * self.image_features(batch) @ self.text_features.t()
