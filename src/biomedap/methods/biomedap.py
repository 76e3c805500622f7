"""BiomedAP: Biomed-DPT + gated cross-modal prompt fusion + dual anchors + confidence-aware loss.

Our headline method (BiomedAP, CVPRW 2026, arXiv 2605.15736; released code ``tongdiedie/BiomedAP``,
read in ``biomed-methods.md`` §5, §9.2–§9.3, §10 and §13.1). It is Biomed-DPT
(:mod:`.biomeddpt`: clinical-template text context + deep visual prompts, distilled to the
description-bank centroid) with three additions, each switchable for ablations:

**1. Gated cross-modal fusion** (:class:`~._fusion.GatedPromptFusion`, one module per layer in
``fusion_layers``, default the published blocks 5 and 8 of the 12-block ViT). At a fusion layer, on
the tokens entering that block (after that block's prompts were inserted):

* visual stream ``v = [CLS ; visual prompt tokens]`` (``fusion_patches: true`` adds the patch
  tokens), so the fused prompts depend on the image;
* text stream ``t`` = the learned context vectors [n_ctx, width] (word-embedding space), shared
  by the batch (``inference: mean``), or ``[ctx ; e_c]`` per class (``inference: classwise``, ``e_c``
  the mean word embedding of class c's name pieces);
* ``v', t' = Fuse(v, t)``, pre-LN, the text side first, then the visual side::

      A_t = MHA(LN t, LN v);       t' = t + σ(W_t[t; A_t] + b) ⊙ A_t + FFN_t(t)
      A_v = MHA(LN v, LN [t'; v]); v' = v + σ(W_v[v; A_v] + b) ⊙ A_v + FFN_v(v)

  (the visual side attends to the image-informed text jointly with the image's own tokens; run
  in sequence so that the text branch reaches the prediction even when ``t'`` feeds nothing
  else). Gate bias ``b = −6``, gate weights and (almost) the FFN output layers zero at
  initialisation: the module starts within 1 % of the identity while every parameter has a
  gradient. Inner width ``fusion_dim`` (128) with projections to and from the towers' widths.
* Only the fused *prompt* tokens are written back (CLS and patches are untouched); the block
  then runs on them. Like every visual prompt they are replaced at the next block that is in
  ``prompt_blocks`` (default: every block from the first fusion layer, so at the next block):
  they act on the image through that block's attention, as the released fused tokens did.
* The fused text ``t'`` feeds the alignment term and, with ``conditioned_text: true``, the class
  prompts themselves (``t'`` of the last fusion layer replaces the context: per-image text
  features ``t_{b,c}``, at training and inference).

**2. Dual anchors** (computed in :meth:`BiomedAP.prepare`, eval mode, never saved):

* high (expert) anchor ``h_c = normalize(mean_i G[c, i])``: centroid of the frozen text features
  of the class's first ``n_prompts`` descriptions (40 few-shot, 50 base-to-novel, as published);
* low (core, vision-informed) anchor, :func:`low_anchor`::

      ℓ_c = normalize((1 − β) · t_core,c + β · (p_c − μ_img + μ_txt))

  ``t_core,c`` the frozen text feature of the core template (``low_template``, default
  ``quality/minimal`` = the bare class name), ``p_c`` the mean of the normalised frozen image
  features of class c's K shots (``TrainingData.train_eval_features``: eval view, no prompts),
  ``μ_img = mean_c p_c`` and ``μ_txt = mean_c t_core,c``. *Modality gap:* CLIP-style image and
  text features live in two separate cones of the sphere (a large, class-independent offset
  between the modalities). Averaging ``t_core,c`` with the raw ``p_c`` would mostly pull every
  anchor — and through the L1 term every text feature — toward the image cone, the same way for
  every class. Subtracting the image mean and adding the text mean moves the prototypes into the
  text cone and keeps only what distinguishes the classes visually (``p_c − μ_img``), which is
  what the text features can and should follow. ``β = 0.5``; ``β = 0`` is the text-only low anchor
  of the released code (ablation).

**3. Confidence-aware loss.** ``w_b = 1 − H(softmax(z_b)) / log C`` ∈ [0, 1] (normalised entropy of
the student's prediction, detached). With ``confidence: anchor`` (default, the issue's formula)
the anchor weight of sample b is ``a_b = w_b``; ``confidence: task`` is the opposite direction,
``a_b = 1 − w_b``; ``confidence: none`` is ``a_b = 1`` (the released fixed weights). ``a_b`` weights
the per-sample KL term, the class-level anchor terms take ``λ · mean_b a_b``. Direction: with
``anchor``, a sample the student is confident on is held to the teachers (a confident prediction
that drifts from the expert text is the over-fitting the anchors exist to stop), while a sample
it cannot yet separate is left to the cross-entropy — the few-shot labels are ground truth, the
teachers' soft targets on hard samples are least reliable. ``task`` ("confident samples lean on
the task loss, uncertain ones on the anchors") is one switch away for the ablation.

**Loss** (``s`` logit scale, ``f`` prompted/fused image features, ``t`` learned text features,
``p = softmax``, temperature 1, KL summed and divided by B·C as published)::

    z = s f tᵀ,   z^T = s f hᵀ   (teacher logits on the same image features, not detached)
    L = CE(z, y) + λ_high · ā · mean|t − h| + λ_KL · Σ_b a_b Σ_c p^T_bc (log p^T_bc − log p_bc) / (B·C)
        + λ_low · ā · mean|t − ℓ| + λ_align · mean_layers mean_b (1 − cos(mean_j t'_bj, mean_j t_bj))

``ā = mean_b a_b``. Logged: ``ce``, ``high``, ``kl``, ``low``, ``align`` (weighted terms) and
``conf`` (``ā``). Every component is switchable: ``fusion: false``, ``lambda_low: 0``, ``beta: 0``
(no visual prototype), ``confidence: none``, ``lambda_align: 0``. All of them off is exactly
Biomed-DPT with the same prompt blocks (``tests/test_biomedap.py`` checks the loss).

**Inference.** ``inference: mean`` (default, as released): the fusion text stream is the shared
context (the class-mean context of the released code), one pass per image, ``z = s f tᵀ``.
``inference: classwise`` (the paper's class-wise aggregation): one fused pass per class with that
class's text stream ``[ctx ; e_c]``, ``z_bc = s f_bcᵀ t_c`` — used for the training logits too, so
the model is trained the way it predicts (C× the ViT cost after the prefix).

**Token space / caching.** Blocks before the first prompted or fused block (``prefix_block``,
default the first fusion layer: 5 on BiomedCLIP) depend on nothing learned: the runner caches the
tokens entering it per training view and only blocks 5–11 run per step, the main reason an epoch
is much faster than the published code's, which decoded and ran every image through all 12 blocks
(``benchmarks/bench_biomed.py``: 20.8 s against 79.4 s per epoch on the 2-core CPU, 16 shots × 4
classes, batch 4, fp32).
``prompt_start: 0`` puts prompts in every block, as Biomed-DPT (then nothing is cached).

**Defaults** (preset ``presets/biomedap.yaml``: the published per-dataset λ_high, λ_KL, λ_low and
N_CTX): clinical template, ``n_ctx`` per dataset, context from the template's phrase, class name
at the end, 4 visual prompt tokens, fusion at the published layers with ``fusion_dim`` 128, 4 heads,
FFN 4×, no dropout, gate bias −6; ``n_prompts`` 40; ``low_template`` ``quality/minimal``; β 0.5;
``confidence: anchor``; λ_align 0.1; BERT dropout active while training (as published).
Parameter counts (BiomedCLIP, width 768): a fusion module is 859,392 parameters at
``fusion_dim`` 128 (1.72 M for two layers) against 15,353,856 at the released width (30.7 M);
:meth:`BiomedAP.describe` prints the counts of a built method.

**Variant ``released``** — exactly the released computation (``biomed-methods.md`` §5, §13.1), so
that the published numbers can be reproduced: four fixed zero vectors overwrite patch tokens 1–4
before every block (no visual parameters; blocks before the first fusion layer are cached with the
overwrite); at each fusion layer :class:`~._fusion.ReleasedPromptFusion` (§5.3: 768-d, 8 heads,
dropout 0.1, gates ``σ(W v + b)`` with default init, ``LN(v + γ⊙v + (1−γ)⊙A_v)``, FFN 4×) fuses the
four *zero* tokens with the prompt's positions 1..n_ctx (the ground-truth class's at training, the
class mean at inference) and writes ``v'`` into positions 1–4 — so the fused tokens are the same
for every image; low anchor = the bare class name's text feature (β = 0); fixed weights
(``confidence: none``); λ_align 0.1; 40 descriptions (few-shot). Variant-dependent options left at
``null`` take the released value (``fusion_dim`` = ViT width, ``fusion_heads`` 8,
``fusion_dropout`` 0.1, ``beta`` 0, ``confidence`` none, ``prompt_start`` 0); explicit values win.

Deliberate departures from the released code, besides the paper's components above (fusion that
sees the image, visual-prototype low anchor, confidence weighting, none of which the released code
has, §5.5–§5.6):

* Visual prompts are Biomed-DPT's learnable zero-initialised tokens inserted after CLS (the paper),
  not fixed zeros overwriting patch tokens 1–4, and only from the first fusion layer on.
* The fusion module is ours (pre-LN, gates on ``[v; A_v]`` starting at σ(−6), the visual side
  attending to text and image jointly, inner width 128) instead of the released post-LN module
  whose gates start at 0.5 and whose 30.7 M parameters (123 MB) train with lr 0.0025. Its two
  directions run in sequence (text reads the image, then the image reads that text), not side by
  side: with ``conditioned_text`` off the fused text only feeds ``L_align``, minimal at ``t' = t``,
  so a text branch starting at the identity would never get a gradient. Its FFN output layers
  start at N(0, 1e-5²), not exactly 0 (an exactly-zero output layer leaves the FFN's input layer
  without gradient on the first step).
* The fusion text stream is the shared context at training *and* test time: the released code
  indexed the prompt rows by the ground-truth label at training (with "middle" placement in
  base-to-novel the class name leaked into the image path) and used the class mean at test.
* Class name at the end of the context (few-shot drivers); the released base-to-novel launchers
  used the buggy "middle" placement (``class_token_position: middle_released``, which the preset's
  ``released`` variant uses under ``protocols.base2novel``).
* ``n_ctx`` from the per-dataset table (the authors' ``few_shot.py``, whose output directories
  match their result aggregation); ``scripts/biomedap/few_shot.sh`` forced 4
  (``--set method.n_ctx=4``). Text is padded to the longest prompt, not 256 (same features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.towers import chain_hooks
from ..prompts.templates import format_template, resolve_template
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
from ._fusion import GatedPromptFusion, ReleasedPromptFusion, branch_parameter_counts
from ._prompting import insert_context
from ._teacher import bank_centroid, description_features
from .base import Batch, Method, TrainingData

__all__ = ["BiomedAP", "BiomedAPConfig", "confidence_weights", "default_fusion_layers", "low_anchor"]

PUBLISHED_FUSION_LAYERS = (5, 8)
PUBLISHED_DEPTH = 12
CONFIDENCE = ("anchor", "task", "none")


def default_fusion_layers(depth: int) -> tuple[int, ...]:
    """The published blocks 5 and 8 of the 12-block ViT, scaled to ``depth``: ``⌊5·depth/12⌋, ⌊8·depth/12⌋``."""
    return tuple(sorted({b * depth // PUBLISHED_DEPTH for b in PUBLISHED_FUSION_LAYERS}))


def low_anchor(text: torch.Tensor, image_features: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               beta: float = 0.5) -> torch.Tensor:
    """Vision-informed low anchor ``ℓ_c = normalize((1 − β) t_c + β (p_c − μ_img + μ_txt))`` [C, D].

    Args:
        text: core-template text features [C, D] (normalised here).
        image_features: frozen image features of the training shots [N, D] (normalised here).
        labels: their labels [N] in ``0..C-1``.
        beta: weight of the shifted visual prototype; 0 = text only (image features unused).

    ``p_c`` is the mean of class c's normalised image features, ``μ_img = mean_c p_c`` over the
    classes with shots, ``μ_txt = mean_c t_c``. A class without shots keeps its text feature.
    """
    text = F.normalize(text.float(), dim=-1)
    if beta == 0:
        return text
    if image_features is None or labels is None:
        raise ValueError("low anchor with beta > 0 needs the training images' frozen features and labels")
    images = F.normalize(image_features.float().to(text.device), dim=-1)
    labels = labels.to(text.device).long()
    classes = text.shape[0]
    counts = torch.bincount(labels, minlength=classes).to(images.dtype)
    sums = torch.zeros(classes, images.shape[1], dtype=images.dtype, device=images.device).index_add_(0, labels, images)
    present = counts > 0
    prototypes = sums / counts.clamp_min(1).unsqueeze(1)
    shifted = prototypes - prototypes[present].mean(0) + text.mean(0)
    mixed = torch.where(present.unsqueeze(1), (1 - beta) * text + beta * shifted, text)
    return F.normalize(mixed, dim=-1)


def confidence_weights(logits: torch.Tensor, mode: str = "anchor") -> torch.Tensor:
    """Per-sample anchor weights [B] (detached): ``w = 1 − H(softmax(z))/log C`` (``"anchor"``),
    ``1 − w`` (``"task"``) or ones (``"none"``). One class: ``w = 1``."""
    if mode not in CONFIDENCE:
        raise ValueError(f"confidence must be one of {', '.join(CONFIDENCE)}, got {mode!r}")
    logits = logits.detach().float()
    if mode == "none":
        return torch.ones(logits.shape[0], device=logits.device)
    classes = logits.shape[-1]
    if classes < 2:
        w = torch.ones(logits.shape[0], device=logits.device)
    else:
        log_p = F.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        w = (1 - entropy / math.log(classes)).clamp(0, 1)
    return w if mode == "anchor" else 1 - w


@dataclass
class BiomedAPConfig(ClinicalPromptConfig):
    prompt_start: int | None = field(
        default=None,
        metadata={"help": "first prompted ViT block when prompt_blocks is null; null = the first fusion layer "
                          "(blocks before it are cached), 0 with variant=released; 0 = every block (Biomed-DPT)"},
    )
    fusion: bool = field(default=True, metadata={"help": "gated cross-modal fusion on/off (ablation)"})
    fusion_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "ViT blocks (0-based) with a fusion module, at their input; null = the published 5 and 8 of "
                          "the 12-block ViT, scaled to the backbone's depth (⌊5·depth/12⌋, ⌊8·depth/12⌋)"},
    )
    fusion_dim: int | None = field(
        default=None,
        metadata={"help": "inner width of the fusion modules (projections where the towers differ); null = 128, "
                          "or the ViT width (768) with variant=released"},
    )
    fusion_heads: int | None = field(
        default=None, metadata={"help": "attention heads per fusion attention; null = 4, or 8 with variant=released"}
    )
    fusion_ffn_mult: float = field(
        default=4.0, metadata={"help": "fusion FFN hidden width = fusion_ffn_mult × fusion_dim"}
    )
    fusion_dropout: float | None = field(
        default=None,
        metadata={"help": "dropout in the fusion attentions and FFNs; null = 0, or 0.1 with variant=released"},
    )
    fusion_gate_bias: float = field(
        default=-6.0,
        metadata={"help": "initial gate bias b (gates start at σ(b); their weights start at 0); not used by the "
                          "released module"},
    )
    fusion_patches: bool = field(
        default=False,
        metadata={"help": "the visual stream also holds the patch tokens (keys/values of both attentions), not only "
                          "CLS and the prompt tokens"},
    )
    inference: Literal["mean", "classwise"] = field(
        default="mean",
        metadata={"help": "mean: one fused pass per image with the shared (class-mean) context, as released | "
                          "classwise: one fused pass per class with [context; class-name embedding], per-class dot "
                          "product (the paper's aggregation), at training and inference"},
    )
    conditioned_text: bool = field(
        default=False,
        metadata={"help": "replace the context of the class prompts by the last fusion layer's fused text context: "
                          "image-conditioned text features, at training and inference (B·C text passes)"},
    )
    n_prompts: int = field(
        default=40,
        metadata={"help": "descriptions per class averaged into the high anchor (published: 40 few-shot, 50 B2N)"},
    )
    low_template: str = field(
        default="quality/minimal",
        metadata={"help": "core template of the low anchor: a template id (quality/minimal = the bare class name, "
                          "quality/generic, ...) or a text with one '{}'"},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "β: weight of the shifted few-shot visual prototype in the low anchor (0 = text only); "
                          "null = 0.5, or 0 with variant=released"},
    )
    lambda_high: float = field(default=12.5, metadata={"help": "λ_high: weight of mean|t − h| (expert anchor)"})
    lambda_low: float = field(default=0.3, metadata={"help": "λ_low: weight of mean|t − ℓ| (core anchor); 0 = off"})
    lambda_align: float = field(
        default=0.1, metadata={"help": "λ_align: weight of 1 − cos(mean fused text context, mean context); 0 = off"}
    )
    confidence: Literal["anchor", "task", "none"] | None = field(
        default=None,
        metadata={"help": "per-sample anchor/KL weight from w = 1 − H(p)/log C: anchor (a = w: confident samples held "
                          "to the anchors) | task (a = 1 − w: confident samples lean on the task loss) | none (a = 1, "
                          "fixed weights); null = anchor, or none with variant=released"},
    )
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: learnable visual prompts, fusion that sees the image, vision-informed low anchor, "
                          "confidence weighting | released: the published code (fixed zero tokens over patches 1-4, "
                          "fusion fed those zeros, bare class-name low anchor, fixed weights)"},
    )

    def __post_init__(self):
        self.check_prompt_options()
        if self.prompt_start is not None and self.prompt_start < 0:
            raise ValueError(f"prompt_start must be ≥ 0 or null, got {self.prompt_start}")
        if self.fusion_layers is not None:
            if not self.fusion_layers:
                raise ValueError("fusion_layers: give at least one block, or null for the default")
            if len(set(self.fusion_layers)) != len(self.fusion_layers):
                raise ValueError(f"fusion_layers: a block is listed twice: {list(self.fusion_layers)}")
        if self.fusion_dim is not None and self.fusion_dim < 1:
            raise ValueError(f"fusion_dim must be ≥ 1 or null, got {self.fusion_dim}")
        if self.fusion_heads is not None and self.fusion_heads < 1:
            raise ValueError(f"fusion_heads must be ≥ 1 or null, got {self.fusion_heads}")
        if not self.fusion_ffn_mult > 0:
            raise ValueError(f"fusion_ffn_mult must be > 0, got {self.fusion_ffn_mult}")
        if self.fusion_dropout is not None and not 0 <= self.fusion_dropout < 1:
            raise ValueError(f"fusion_dropout must be in [0, 1) or null, got {self.fusion_dropout}")
        if not math.isfinite(self.fusion_gate_bias):
            raise ValueError(f"fusion_gate_bias must be finite, got {self.fusion_gate_bias}")
        if self.inference not in ("mean", "classwise"):
            raise ValueError(f"inference must be 'mean' or 'classwise', got {self.inference!r}")
        if self.n_prompts < 1:
            raise ValueError(f"n_prompts must be ≥ 1, got {self.n_prompts}")
        low = resolve_template(self.low_template)
        if low.count("{}") > 1:
            raise ValueError(f"low_template: {self.low_template!r} must be a template id or a text with at most one "
                             "'{}' for the class name")
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1] or null, got {self.beta}")
        for name in ("lambda_high", "lambda_low", "lambda_align"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.confidence is not None and self.confidence not in CONFIDENCE:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCE)} or null, got {self.confidence!r}")
        if self.variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {self.variant!r}")
        if self.variant == "released":
            if self.fusion_patches:
                raise ValueError("fusion_patches: the released fusion sees only the four zero tokens; use "
                                 "variant=paper for a fusion that reads the patches")
            if self.conditioned_text:
                raise ValueError("conditioned_text is a variant=paper option (the released fused text only feeds "
                                 "the alignment term)")


class _Pass(NamedTuple):
    """One image pass: features [B, D] (mean) or [B, C, D] (classwise), the fusion text stream
    [B', m, W] and per fusion layer ``(v, v', t')``."""

    features: torch.Tensor
    stream: torch.Tensor | None
    records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class BiomedAP(Method):
    name = "biomedap"
    summary = ("BiomedAP: Biomed-DPT + gated cross-modal prompt fusion, expert and vision-informed anchors, "
               "confidence-aware loss (token space)")
    Config = BiomedAPConfig
    input_kind = "tokens"

    def __init__(self, backbone, classnames: Sequence[str], config: BiomedAPConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        released = cfg.variant == "released"
        vision = backbone.vision
        depth = vision.depth
        # Resolved variant-dependent options.
        self.fusion_dim = cfg.fusion_dim or (vision.width if released else 128)
        self.fusion_heads = cfg.fusion_heads or (8 if released else 4)
        self.fusion_dropout = cfg.fusion_dropout if cfg.fusion_dropout is not None else (0.1 if released else 0.0)
        self.beta = cfg.beta if cfg.beta is not None else (0.0 if released else 0.5)
        self.confidence = cfg.confidence or ("none" if released else "anchor")

        layers = default_fusion_layers(depth) if cfg.fusion_layers is None else cfg.fusion_layers
        self.fusion_layers: tuple[int, ...] = tuple(sorted(backbone.validate_block_indices(layers, "fusion_layers")))
        start = cfg.prompt_start
        if start is None:
            start = 0 if released else self.fusion_layers[0]
        self.blocks: tuple[int, ...] = resolve_prompt_blocks(backbone, cfg.prompt_blocks, start)
        if released:
            check_overwrite_fits(backbone, cfg.n_visual_tokens)
        elif cfg.fusion and self.blocks[0] > self.fusion_layers[0]:
            raise ValueError(f"fusion layer {self.fusion_layers[0]} comes before the first prompted block "
                             f"{self.blocks[0]}: there are no prompt tokens to fuse there; lower prompt_start (or "
                             "list that block in prompt_blocks)")

        self.prompt_learner = ClinicalPromptLearner(
            backbone, self.classnames, template=cfg.template, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init,
            position=cfg.class_token_position or "end", init_std=cfg.init_std, descriptions=cfg.descriptions,
        )
        self.visual_prompts = None if released else DeepVisualPrompts(
            cfg.n_visual_tokens, self.blocks, vision.width, device=backbone.device)
        self.fusion_modules = None
        if cfg.fusion:
            text_width = backbone.text.width
            if released:
                make = lambda: ReleasedPromptFusion(  # noqa: E731
                    vision.width, text_width, self.fusion_dim, heads=self.fusion_heads,
                    ffn_mult=cfg.fusion_ffn_mult, dropout=self.fusion_dropout)
            else:
                make = lambda: GatedPromptFusion(  # noqa: E731
                    vision.width, text_width, self.fusion_dim, heads=self.fusion_heads, ffn_mult=cfg.fusion_ffn_mult,
                    dropout=self.fusion_dropout, gate_bias=cfg.fusion_gate_bias)
            modules = {str(layer): make() for layer in self.fusion_layers}
            self.fusion_modules = nn.ModuleDict(modules).to(backbone.device)
        # Teachers (set by prepare, never saved) and the class-name embeddings of the classwise stream.
        self.register_buffer("high_anchor", None, persistent=False)
        self.register_buffer("low_anchor", None, persistent=False)
        self._build_name_embeddings()

    # ------------------------------------------------------------------ set-up helpers
    @property
    def released(self) -> bool:
        return self.config.variant == "released"

    def _build_name_embeddings(self) -> None:
        embeds = None
        if self.config.inference == "classwise" and not self.released:
            with torch.no_grad():
                embeds = torch.stack([self.backbone.embed_tokens(torch.tensor(self.backbone.text.pieces(name))).mean(0)
                                      for name in self.classnames])
        self.register_buffer("name_embeds", embeds, persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target to other class names (same template and learned state; the anchors are dropped)."""
        self.classnames = list(classnames)
        self.prompt_learner.set_classnames(classnames)
        self._build_name_embeddings()
        self.high_anchor = None
        self.low_anchor = None

    # ------------------------------------------------------------------ token space
    @property
    def prefix_block(self) -> int:
        """First block depending on learned state: the first prompted block (paper), the first fusion layer
        (released; the ViT depth with fusion off: fully cached)."""
        if self.released:
            return self.fusion_layers[0] if self.config.fusion else self.backbone.vision.depth
        return self.blocks[0]

    def _overwrite_hook(self):
        return zero_overwrite_hook(self.config.n_visual_tokens, self.backbone.vision.num_prefix_tokens, self.blocks)

    def prefix_hook(self):
        return self._overwrite_hook() if self.released else None

    def prefix_fingerprint(self) -> str:
        if not self.released:
            return "plain"
        return overwrite_fingerprint(self.config.n_visual_tokens, self.blocks, self.backbone.vision.depth)

    # ------------------------------------------------------------------ forward pieces
    def _text_stream(self, labels: torch.Tensor | None) -> torch.Tensor:
        """The fusion text stream: [m, W] shared, [C, m, W] per class (classwise) or [B, m, W] (released training)."""
        if self.released:
            n = self.prompt_learner.n_ctx
            rows = self.prompt_learner.prompt_embeddings()[:, 1:1 + n]  # positions 1..n_ctx of each prompt
            if self.config.inference == "classwise":
                return rows
            return rows[labels.to(rows.device)] if labels is not None else rows.mean(0)
        ctx = self.prompt_learner.ctx
        if self.config.inference == "classwise":
            names = self.name_embeds.to(ctx.dtype).unsqueeze(1)
            return torch.cat([ctx.unsqueeze(0).expand(names.shape[0], -1, -1), names], dim=1)
        return ctx

    def _fusion_hook(self, stream: torch.Tensor, records: dict):
        modules = {int(k): m for k, m in self.fusion_modules.items()}
        vision = self.backbone.vision
        p = vision.num_prefix_tokens
        released, patches, n_over = self.released, self.config.fusion_patches, self.config.n_visual_tokens

        def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
            module = modules.get(index)
            if module is None:
                return tokens
            if released:  # the (zero-overwritten) tokens at positions p..p+n: fused tokens replace them
                n = n_over
                v = tokens[:, p:p + n]
                v_out, t_out = module(v, stream)
                new = v_out
            else:  # [CLS ; prompts] (+ patches): only the prompt rows are written back
                n = vision.num_extra_tokens(tokens)
                v = tokens if patches else tokens[:, :p + n]
                v_out, t_out = module(v, stream)
                new = v_out[:, p:p + n]
            records[index] = (v, v_out, t_out)
            return torch.cat([tokens[:, :p], new.to(tokens.dtype), tokens[:, p + n:]], dim=1)

        return hook

    def _run(self, batch: Batch, labels: torch.Tensor | None = None) -> _Pass:
        """Image features of the batch (one pass, or one per class with ``inference: classwise``)."""
        if batch.tokens is None and batch.pixels is None:
            raise ValueError(f"{self.name} runs ViT blocks itself: give tokens entering block {self.prefix_block} "
                             "(Backbone.encode_image_prefix) or pixels, not pooled features")
        tokens = self.image_tokens(batch)
        size, classes = tokens.shape[0], len(self.classnames)
        classwise = self.config.inference == "classwise"
        records: dict = {}
        stream, hook = None, None
        if self.fusion_modules is not None:
            stream = self._text_stream(labels)
            if classwise:
                stream = stream.repeat(size, 1, 1)  # row b·C + c = class c
            elif stream.dim() == 2:
                stream = stream.unsqueeze(0).expand(size, -1, -1)
            hook = self._fusion_hook(stream, records)
        if classwise:
            tokens = tokens.repeat_interleave(classes, dim=0)
        if self.released:
            hook = chain_hooks(self._overwrite_hook(), hook)
        prompts = None if self.visual_prompts is None else self.visual_prompts.prompts()
        features = self.backbone.encode_image(tokens=tokens, start_block=self.prefix_block, prompts=prompts, hook=hook,
                                              normalize=True)
        if classwise:
            features = features.reshape(size, classes, -1)
        return _Pass(features, stream, records)

    def _conditioned_text(self, fused: _Pass) -> torch.Tensor:
        """Per-image class text features [B, C, D] with the last fusion layer's fused context."""
        learner = self.prompt_learner
        n, classes = learner.n_ctx, len(self.classnames)
        t_out = fused.records[self.fusion_layers[-1]][2][:, :n]
        if self.config.inference == "classwise":  # rows b·C + c already follow the classes
            ctx = t_out
            size = t_out.shape[0] // classes
        else:
            size = t_out.shape[0]
            ctx = t_out.repeat_interleave(classes, dim=0)
        embeds = insert_context(learner.token_embeds.repeat(size, 1, 1), ctx, learner.ctx_positions.repeat(size, 1))
        mask = learner.attention_mask.repeat(size, 1)
        text = self.backbone.encode_text_embeddings(embeds, mask, normalize=True)
        return text.reshape(size, classes, -1)

    def _scores(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``s ⟨f, t⟩`` for every (image, class): features [B, D] or [B, C, D], text [C, D] or [B, C, D]."""
        text = text.to(features.dtype)
        if features.dim() == 2 and text.dim() == 2:
            return self.logit_scale * features @ text.t()
        if features.dim() == 2:
            features = features.unsqueeze(1)
        return self.logit_scale * (features * text).sum(-1)

    def _logits(self, fused: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits [B, C], class text features [C, D] of the learned prompts)."""
        text = self.prompt_learner()
        scoring = self._conditioned_text(fused) if self.config.conditioned_text and fused.records else text
        return self._scores(fused.features, scoring), text

    # ------------------------------------------------------------------ inference
    def image_features(self, batch: Batch) -> torch.Tensor:
        """Prompted/fused normalised image features: [B, D], or [B, C, D] with ``inference: classwise``."""
        return self._run(batch).features

    def fused_visual_prompts(self, batch: Batch) -> dict[int, torch.Tensor]:
        """The prompt tokens each fusion layer writes back, ``{layer: [B, n, width]}`` (for inspection)."""
        fused = self._run(batch)
        p, n = self.backbone.vision.num_prefix_tokens, self.config.n_visual_tokens
        return {layer: v_out if self.released else v_out[:, p:p + n]
                for layer, (_, v_out, _) in fused.records.items()}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._logits(self._run(batch))[0]

    # ------------------------------------------------------------------ training
    def prepare(self, data: TrainingData) -> None:
        """High anchor from the description bank; low anchor from the core template and the K shots' features."""
        cfg = self.config
        self.high_anchor = self.low_anchor = None
        if cfg.lambda_high or cfg.lambda_kl:
            bank = description_features(self.backbone, self.classnames, cfg.descriptions, cfg.n_prompts,
                                        data=data, method=self.name)
            self.high_anchor = bank_centroid(bank).to(self.backbone.device)
        if cfg.lambda_low:
            self.low_anchor = self.build_low_anchor(data).to(self.backbone.device)

    def core_texts(self) -> list[str]:
        """The low anchor's core-template texts, one per class (released ``empty`` level: "X")."""
        template = resolve_template(self.config.low_template)
        texts = [format_template(template, name) for name in self.classnames]
        if self.released and "{}" not in template:
            texts = ["X"] * len(texts)
        return texts

    def build_low_anchor(self, data: TrainingData) -> torch.Tensor:
        """ℓ [C, D] (:func:`low_anchor`) from ``data``'s frozen eval-view features of the shots."""
        text = data.encode_texts(self.backbone, self.core_texts())
        if self.beta == 0:
            return low_anchor(text, beta=0.0)
        images = data.train_eval_features if data.train_eval_features is not None else data.train_features
        return low_anchor(text, images, data.train_labels, self.beta)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss = ce + high + kl + low + align`` (the weighted terms); ``conf`` = mean anchor weight."""
        cfg = self.config
        labels = batch.labels.to(self.backbone.device)
        fused = self._run(batch, labels if self.released else None)
        logits, text = self._logits(fused)
        ce = F.cross_entropy(logits, labels)
        zero = ce.new_zeros(())
        weights = confidence_weights(logits, self.confidence)
        mean_weight = weights.mean()
        high = kl = low = align = zero
        if cfg.lambda_high or cfg.lambda_kl:
            if self.high_anchor is None:
                raise RuntimeError(f"{self.name}: the anchors are not set; call prepare(data) before training "
                                   "(and again after set_classnames)")
            anchor = self.high_anchor.to(text.dtype)
            if cfg.lambda_high:
                high = cfg.lambda_high * mean_weight * l1_anchor_loss(text, anchor)
            if cfg.lambda_kl:
                teacher = self._scores(fused.features, anchor)
                if self.confidence == "none":
                    kl = cfg.lambda_kl * kl_distillation(logits, teacher)
                else:
                    per_sample = F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                                          log_target=True, reduction="none").sum(-1)
                    kl = cfg.lambda_kl * (weights * per_sample).sum() / logits.numel()
        if cfg.lambda_low:
            if self.low_anchor is None:
                raise RuntimeError(f"{self.name}: the low anchor is not set; call prepare(data) before training")
            low = cfg.lambda_low * mean_weight * l1_anchor_loss(text, self.low_anchor)
        if cfg.lambda_align and fused.records:
            reference = fused.stream.mean(1)
            terms = [1 - F.cosine_similarity(t_out.mean(1).float(), reference.float(), dim=-1).mean()
                     for _, _, t_out in fused.records.values()]
            align = cfg.lambda_align * torch.stack(terms).mean()
        loss = ce + high + kl + low + align
        return {"loss": loss, "ce": ce, "high": high, "kl": kl, "low": low, "align": align, "conf": mean_weight}

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict:
        """Counts of trainable values by part (context, visual prompts, fusion per layer and branch)."""
        info = super().describe()
        parts = {"context": self.prompt_learner.ctx.numel(),
                 "visual_prompts": 0 if self.visual_prompts is None else self.visual_prompts.tokens.numel()}
        fusion = {}
        if self.fusion_modules is not None:
            for key, module in self.fusion_modules.items():
                fusion[int(key)] = branch_parameter_counts(module)
        parts["fusion"] = sum(c["total"] for c in fusion.values())
        info.update(
            variant=self.config.variant,
            parameters=parts,
            fusion_parameters=fusion,
            fusion_layers=list(self.fusion_layers) if self.fusion_modules is not None else [],
            fusion_dim=self.fusion_dim if self.fusion_modules is not None else None,
            prompt_blocks=list(self.blocks),
            prefix_block=self.prefix_block,
            beta=self.beta,
            confidence=self.confidence,
            inference=self.config.inference,
        )
        return info
