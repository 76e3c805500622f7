"""Biomed-DPT: dual-modality prompt tuning on BiomedCLIP (Peng et al., arXiv 2505.05189).

Text side (:class:`~._deep_prompts.ClinicalPromptLearner`): the dataset's clinical template, e.g.
"a MR photo of a {} in the brain.", whose leading phrase's first ``n_ctx`` word pieces are learned
context vectors initialised from those pieces; the class name follows them (``"end"``).
Image side (:class:`~._deep_prompts.DeepVisualPrompts`): ``n_visual_tokens`` learnable tokens,
zero-initialised, inserted after CLS before every block in ``prompt_blocks`` (default: all blocks
from ``prompt_start = 0``) and replaced at each of them. Teacher: ``h_c = normalize(mean_i G[c, i])``,
the centroid of the frozen text features of the class's first ``n_prompts`` descriptions (computed
in ``prepare``, eval mode, never saved). With ``f`` the prompted image features, ``t`` the learned
text features and ``s`` the logit scale::

    z = s f tᵀ,   z^T = s f hᵀ   (the teacher logits use the same prompted f, as published; no detach)
    L = CE(z, y) + λ_L1 · mean_{c,d} |t − h| + λ_KL · Σ_{b,c} p^T (log p^T − log p^S) / (B·C)

with ``p = softmax`` at temperature 1. Inference: ``z = s f tᵀ``.

Token space (``input_kind = "tokens"``): blocks before the first prompted block
(:attr:`BiomedDPT.prefix_block`) do not depend on anything learned, so their output comes from the
feature cache; the method runs the remaining blocks with its prompts.

Defaults and choices:

* ``template = "clinical"``: the clinical template ``clinical/<key>`` of the catalog dataset whose
  description bank covers the class names (or the one named by ``descriptions = "builtin:<key>"``);
  "a photo of a {}." for class names of no catalog dataset. ``n_ctx = null`` learns every piece
  of the template's phrase; the preset sets the published ``N_CTX`` per dataset.
* ``text_dropout = true``: the published trainer put the whole model in train mode, so BERT's
  dropout was active while the prompts trained (teacher features are computed in eval mode).

Deliberate departures from the reference code (``Kanyooo/Biomed-DPT`` as vendored in BiomedAP):

* Class-name placement: the published runs used "middle" with a class-name length fixed at 1, which
  moves the first piece after the learned span between the two context halves. The default here
  is the template's own order (``"end"``, pieces placed exactly); ``class_token_position:
  middle_released`` reproduces the published layout (and is what ``variant: released`` uses).
* Visual prompts: the paper describes learnable zero-initialised deep prompts; the released code
  overwrites patch tokens 1–4 with four *fixed* zero tensors before every block (not parameters,
  not inserted; the top-left patches are discarded). That is ``variant: released``: no visual
  parameters, the hook :func:`~._deep_prompts.zero_overwrite_hook` runs in every block as a fixed
  part of the frozen prefix, so ``prefix_block = depth``: the cached tokens are the output of the
  last block (overwrites included) and the forward only applies the final LayerNorm, CLS pooling
  and projection to them — image features are fully cached, like the CoOp family's.
* ``n_ctx`` larger than the template's phrase is an error (the reference silently overwrote
  class-name tokens); text is padded to the longest prompt, not 256 (same features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ._deep_prompts import (
    ClinicalPromptConfig,
    ClinicalPromptLearner,
    DeepVisualPrompts,
    check_overwrite_fits,
    kl_distillation,
    l1_anchor_loss,
    overwrite_fingerprint,
    resolve_prompt_blocks,
    zero_overwrite_hook,
)
from ._teacher import bank_centroid, description_features
from .base import Batch, Method, TrainingData


@dataclass
class BiomedDPTConfig(ClinicalPromptConfig):
    prompt_start: int = field(
        default=0, metadata={"help": "first prompted ViT block when prompt_blocks is null (0-based)"}
    )
    n_prompts: int = field(default=50, metadata={"help": "descriptions per class averaged into the teacher h"})
    lambda_l1: float = field(default=12.5, metadata={"help": "λ_L1: weight of mean|t − h| (L1 to the teacher)"})
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: learnable zero-initialised deep visual prompts inserted after CLS | released: four "
                          "fixed zero vectors overwrite patch tokens 1-4 before every block (no visual parameters, "
                          "image features fully cached) and the published class-name placement"},
    )

    def __post_init__(self):
        self.check_prompt_options()
        if self.prompt_start < 0:
            raise ValueError(f"prompt_start must be ≥ 0, got {self.prompt_start}")
        if self.n_prompts < 1:
            raise ValueError(f"n_prompts must be ≥ 1, got {self.n_prompts}")
        if not self.lambda_l1 >= 0:
            raise ValueError(f"lambda_l1 must be ≥ 0, got {self.lambda_l1}")
        if self.variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {self.variant!r}")


class BiomedDPT(Method):
    name = "biomeddpt"
    summary = ("Biomed-DPT: clinical-template context + deep visual prompts, distilled to the description-bank "
               "centroid (token space)")
    Config = BiomedDPTConfig
    input_kind = "tokens"

    def __init__(self, backbone, classnames: Sequence[str], config: BiomedDPTConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        released = cfg.variant == "released"
        self.blocks: tuple[int, ...] = resolve_prompt_blocks(backbone, cfg.prompt_blocks, cfg.prompt_start)
        if released:
            check_overwrite_fits(backbone, cfg.n_visual_tokens)
        position = cfg.class_token_position or ("middle_released" if released else "end")
        self.prompt_learner = ClinicalPromptLearner(
            backbone, self.classnames, template=cfg.template, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init,
            position=position, init_std=cfg.init_std, descriptions=cfg.descriptions,
        )
        self.visual_prompts = None if released else DeepVisualPrompts(
            cfg.n_visual_tokens, self.blocks, backbone.vision.width, device=backbone.device)
        # Teacher h [C, D]: set by prepare(), never saved (non-persistent).
        self.register_buffer("teacher_text", None, persistent=False)

    # ------------------------------------------------------------------ token space
    @property
    def released(self) -> bool:
        return self.config.variant == "released"

    @property
    def prefix_block(self) -> int:
        """Paper: the first prompted block. Released: the ViT's depth (nothing after the frozen blocks is learned)."""
        return self.backbone.vision.depth if self.released else self.blocks[0]

    def prefix_hook(self):
        if not self.released:
            return None
        return zero_overwrite_hook(self.config.n_visual_tokens, self.backbone.vision.num_prefix_tokens, self.blocks)

    def prefix_fingerprint(self) -> str:
        if not self.released:
            return "plain"
        return overwrite_fingerprint(self.config.n_visual_tokens, self.blocks, self.backbone.vision.depth)

    def image_features(self, batch: Batch) -> torch.Tensor:
        """Normalised prompted image features [B, D] from the batch's cached tokens or its pixels."""
        if batch.tokens is None and batch.pixels is None:
            raise ValueError(f"{self.name} runs ViT blocks itself: give tokens entering block {self.prefix_block} "
                             "(Backbone.encode_image_prefix) or pixels, not pooled features")
        tokens = self.image_tokens(batch)
        prompts = None if self.visual_prompts is None else self.visual_prompts.prompts()
        return self.backbone.encode_image(tokens=tokens, start_block=self.prefix_block, prompts=prompts,
                                          normalize=True)

    # ------------------------------------------------------------------ inference
    def text_features(self) -> torch.Tensor:
        return self.prompt_learner()

    def forward(self, batch: Batch) -> torch.Tensor:
        image = self.image_features(batch)
        return self.logit_scale * image @ self.text_features().t()

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the learned prompts to other class names (same template; the teacher is dropped)."""
        self.classnames = list(classnames)
        self.prompt_learner.set_classnames(classnames)
        self.teacher_text = None

    # ------------------------------------------------------------------ training
    def prepare(self, data: TrainingData) -> None:
        """Teacher ``h = normalize(mean_i G[:, i])`` over the first ``n_prompts`` descriptions (skipped if λs are 0)."""
        cfg = self.config
        if cfg.lambda_l1 == 0 and cfg.lambda_kl == 0:
            self.teacher_text = None
            return
        bank = description_features(self.backbone, self.classnames, cfg.descriptions, cfg.n_prompts,
                                    data=data, method=self.name)
        self.teacher_text = bank_centroid(bank).to(self.backbone.device)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss = ce + l1 + kl``; ``l1`` and ``kl`` are the weighted terms."""
        cfg = self.config
        image = self.image_features(batch)
        text = self.text_features()
        logits = self.logit_scale * image @ text.t()
        ce = F.cross_entropy(logits, batch.labels.to(logits.device))
        zero = ce.new_zeros(())
        if cfg.lambda_l1 == 0 and cfg.lambda_kl == 0:
            return {"loss": ce, "ce": ce, "l1": zero, "kl": zero}
        if self.teacher_text is None:
            raise RuntimeError(f"{self.name}: the teacher is not set; call prepare(data) before training "
                               "(and again after set_classnames)")
        teacher = self.teacher_text.to(text.dtype)
        l1 = cfg.lambda_l1 * l1_anchor_loss(text, teacher) if cfg.lambda_l1 else zero
        kl = cfg.lambda_kl * kl_distillation(logits, self.logit_scale * image @ teacher.t()) if cfg.lambda_kl else zero
        return {"loss": ce + l1 + kl, "ce": ce, "l1": l1, "kl": kl}
