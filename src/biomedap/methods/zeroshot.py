"""Zero-shot classification with hand-written templates or class descriptions (Radford et al., 2021).

Each class's classifier is the normalised mean of the normalised text features of its prompts
(one per template, or one per description); logits are ``s · f tᵀ``.  The published BiomedCLIP
baseline uses the single template "a photo of a {}."; its ensemble variant averages the first 50
LLM-written descriptions of each class (``descriptions``: a JSON file ``{classname: [sentence, ...]}``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Batch, Method, MethodConfig, class_text_features


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: tuple[str, ...] = field(
        default=("a photo of a {}.",),
        metadata={"help": "prompt templates with one '{}' for the class name; several are averaged"},
    )

    descriptions: str | None = field(
        default=None,
        metadata={"help": "JSON file {classname: [description, ...]}; when set, each class's classifier is the "
                          "mean of its first max_descriptions descriptions instead of the templates"},
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
        if self.config.descriptions:
            texts = _class_descriptions(Path(self.config.descriptions), self.classnames, self.config.max_descriptions)
        else:
            texts = [[t.format(name) for t in self.config.templates] for name in self.classnames]
        self.register_buffer("text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._build_classifier()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logit_scale * self.image_features(batch) @ self.text_features.t()


def _class_descriptions(path: Path, classnames: Sequence[str], limit: int) -> list[list[str]]:
    """The first ``limit`` descriptions of each class from a JSON bank, with errors that name the file."""
    try:
        bank = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"descriptions file not found: {path}") from None
    except ValueError as err:
        raise ValueError(f"descriptions file {path} is not valid JSON: {err}") from None
    if not isinstance(bank, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in bank.values()
    ):
        raise ValueError(f"descriptions file {path} must map each class name to a list of sentences")
    missing = [name for name in classnames if not bank.get(name)]
    if missing:
        raise ValueError(f"descriptions file {path} has no descriptions for {missing}; "
                         f"its classes are {sorted(bank)}")
    return [bank[name][:limit] for name in classnames]
