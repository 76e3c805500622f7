"""CoCoOp: CoOp context shifted by a meta-net of the image feature (Zhou et al., CVPR 2022).

A small meta-net ``π = W₂ ReLU(W₁ f)`` (embed_dim → embed_dim // 16 → word-embedding width, PyTorch
default initialisation) maps each normalised image feature ``f_i`` to one vector that is added to
every context token, ``ctx_i = ctx + π(f_i)``.  Every image therefore gets its own C class prompts,
``t⁽ⁱ⁾_c``, and ``z_{i,c} = s · ⟨f_i, t⁽ⁱ⁾_c⟩``: B·C text-tower passes per batch, at training and at
inference.  Those passes are made in chunks of ``text_chunk_images`` images (all prompts of a chunk
in one text-tower call), so memory stays bounded when ``predict_logits`` hands over thousands of
features at once.

The meta-net is class-agnostic, so a trained model names unseen classes (base-to-novel).
Class-specific context is not part of CoCoOp and is refused.

Published BiomedCLIP settings (BiomedCoOp's baseline run, ``CoCoOp/vit_b16.yaml``): 4 context
vectors from "a photo of a", SGD lr 0.001, batch 1, 10 epochs, Dassl cosine with one warm-up
epoch — see ``presets/cocoop.yaml``.  No code deviation from the paper: no ``variant``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._prompting import insert_context
from .base import Batch
from .coop import CoOp, CoOpConfig


@dataclass
class CoCoOpConfig(CoOpConfig):
    text_chunk_images: int = field(
        default=16,
        metadata={"help": "images whose B·C class prompts go through the text tower in one call; bounds memory "
                          "(a call holds text_chunk_images × classes prompts); results do not depend on it"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.csc:
            raise ValueError("csc: CoCoOp conditions one shared context on each image; class-specific context "
                             "(csc=true) is not part of the method, set csc to false")
        if self.text_chunk_images < 1:
            raise ValueError(f"text_chunk_images must be ≥ 1, got {self.text_chunk_images}")


class CoCoOp(CoOp):
    name = "cocoop"
    summary = "CoCoOp: CoOp context shifted per image by a meta-net (feature space, B·C text passes)"
    Config = CoCoOpConfig

    def __init__(self, backbone, classnames: Sequence[str], config: CoCoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        embed_dim, width = backbone.embed_dim, backbone.text.width
        hidden = max(1, embed_dim // 16)  # 512 -> 32 for BiomedCLIP, as published
        # Built after ctx, from the same seeded stream, with PyTorch's default Linear initialisation.
        self.meta_net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width)
        ).to(backbone.device)

    def instance_text_features(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised text features [B, C, D] of each image's own prompts (``ctx + π(f_i)``).

        ``image`` holds normalised image features [B, D].  (The inherited :meth:`text_features`
        is the unconditioned prompt, π = 0.)
        """
        num_classes = self.token_embeds.shape[0]
        shift = self.meta_net(image.to(self.meta_net[0].weight.dtype))  # [B, W]
        outputs = []
        for start in range(0, image.shape[0], self.config.text_chunk_images):
            part = shift[start:start + self.config.text_chunk_images]
            b = part.shape[0]
            ctx = self.ctx.unsqueeze(0) + part.unsqueeze(1)  # [b, n, W]
            # Row b·C + c is the prompt of class c for image b of the chunk.
            ctx = ctx.unsqueeze(1).expand(b, num_classes, -1, -1).reshape(b * num_classes, *self.ctx.shape)
            embeds = self.token_embeds.repeat(b, 1, 1)
            embeds = insert_context(embeds, ctx, self.ctx_positions.repeat(b, 1))
            mask = self.attention_mask.repeat(b, 1)
            text = self.backbone.encode_text_embeddings(embeds, mask, normalize=True)
            outputs.append(text.reshape(b, num_classes, -1))
        if not outputs:
            return image.new_zeros(0, num_classes, self.backbone.embed_dim)
        return torch.cat(outputs)

    def forward(self, batch: Batch) -> torch.Tensor:
        image = self.image_features(batch)
        text = self.instance_text_features(image)
        return self.logit_scale * torch.einsum("bd,bcd->bc", image.to(text.dtype), text)
