"""CoOp: learned context vectors in front of (or around) the class name (Zhou et al., IJCV 2022).

Logits ``s · f tᵀ`` with ``t_c`` the text feature of ``[CLS] ctx₁…ctxₙ <class c> . [SEP]``; only the
context vectors train.  Published BiomedCLIP settings (BiomedCoOp's baseline run): 4 context
vectors initialised from "a photo of a", shared by all classes, class name at the end, SGD
lr 0.002, batch 32, 100 epochs, cosine with one warm-up epoch at 1e-5 — see ``presets/coop.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._prompting import (
    ClassTokenPosition,
    build_prompt_layout,
    context_from_phrase,
    insert_context,
    random_context,
    register_layout,
)
from .base import Batch, Method, MethodConfig


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int | None = field(
        default=4,
        metadata={"help": "number of learned context vectors; null with ctx_init = one per word piece of ctx_init"},
    )
    ctx_init: str | None = field(
        default="a photo of a",
        metadata={"help": "phrase whose word embeddings initialise the context; null = random N(0, init_std²)"},
    )
    csc: bool = field(default=False, metadata={"help": "class-specific context (one set of vectors per class); "
                                                        "cannot name unseen classes"})
    class_token_position: ClassTokenPosition = field(
        default="end", metadata={"help": "where the class name goes: end | middle | front"}
    )
    suffix: str = field(default=".", metadata={"help": "fixed text after the class name"})
    init_std: float = field(default=0.02, metadata={"help": "std of the random context initialisation"})

    def __post_init__(self):
        if self.n_ctx is None and self.ctx_init is None:
            raise ValueError("n_ctx: set n_ctx, ctx_init, or both")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be ≥ 1, got {self.n_ctx}")
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, got {self.class_token_position!r}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


class CoOp(Method):
    name = "coop"
    summary = "CoOp: learned context vectors around the class name (feature space)"
    Config = CoOpConfig

    def __init__(self, backbone, classnames: Sequence[str], config: CoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        if cfg.ctx_init:
            ctx, self._fixed_pieces = context_from_phrase(backbone, cfg.ctx_init, cfg.n_ctx)
        else:
            ctx, self._fixed_pieces = random_context(backbone, cfg.n_ctx, cfg.init_std), []
        if cfg.csc:
            ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        self.ctx = nn.Parameter(ctx)
        self._build_prompts()

    def _build_prompts(self) -> None:
        layout = build_prompt_layout(
            self.backbone, self.classnames, self.ctx.shape[-2], self.config.class_token_position,
            fixed_before_name=self._fixed_pieces, suffix=self.config.suffix,
        )
        register_layout(self, self.backbone, layout)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the learned context to other class names (base-to-novel evaluation)."""
        if self.config.csc:
            raise ValueError("coop with csc=true learns one context per training class and cannot name other classes")
        self.classnames = list(classnames)
        self._build_prompts()

    def text_features(self) -> torch.Tensor:
        """Normalised class text features [C, D] for the current context."""
        embeds = insert_context(self.token_embeds, self.ctx, self.ctx_positions)
        return self.backbone.encode_text_embeddings(embeds, self.attention_mask, normalize=True)

    def forward(self, batch: Batch) -> torch.Tensor:
        image = self.image_features(batch)
        text = self.text_features()
        return self.logit_scale * image @ text.t()
