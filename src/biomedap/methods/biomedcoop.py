"""BiomedCoOp: CoOp with an LLM description bank as teacher (Koleilat et al., CVPR 2025).

The student is CoOp (4 shared context vectors initialised from "a photo of a", class name at the
end, i.e. the prompt "a photo of a {}." with its first four word pieces learned):
``z = s · f tᵀ``, ``t_c`` the normalised text feature of class ``c``, ``f`` the normalised frozen
image feature, ``s`` the checkpoint's logit scale.

Teacher (computed in :meth:`prepare`, eval mode, once per backbone through the run's feature cache,
never saved): ``G[c, i] = normalize(TextEnc(desc_{c,i}))`` for the first ``n_prompts`` (P = 50)
descriptions of each class, a [C, P, D] tensor, and its centroid
``h^all_c = normalize(mean_i G[c, i])``.

Per training batch (``B`` images, ``C`` classes), reference notes biomed-methods.md §3.3 / §13.2:

1. Prompt scores, no gradient: ``S_i = mean_b max_c s · f_b · G[c, i]``.
2. Outlier exclusion (:func:`select_prompts`), global over prompt indices: ``med = median_i S_i``,
   ``MAD = median_i |S_i − med|``, ``z_i = (S_i − med) / MAD``, keep prompt ``i`` iff
   ``|(z_i − mean z) / std z| ≤ τ`` (unbiased std). The MAD normalisation is an affine map with
   positive slope, so it cancels: the kept set is that of the plain z-score of ``S``.
3. ``h^sel_c = normalize(mean_{i kept} G[c, i])``; teacher logits ``z^T = s · f (h^sel)ᵀ``.
4. Loss::

       L = CE(z, y)
         + λ_SCCM · mean_{c,d} (t_{c,d} − h^all_{c,d})²                         (SCCM)
         + λ_KDSP · (1/(B·C)) Σ_b Σ_c p^T_{b,c} (log p^T_{b,c} − log p^S_{b,c})    (KDSP)

   with ``p^S = softmax(z)``, ``p^T = softmax(z^T)`` (temperature 1): KL(teacher ‖ student)
   summed and divided by the number of logits, as released. Only the context trains.
   :meth:`training_step` returns ``loss``, ``ce``, ``sccm``, ``kdsp`` (weighted terms) and
   ``kept`` (number of prompts kept), all logged per epoch.

Inference: ``z = s · f tᵀ`` with the learned prompts only (no teacher, no ensembling), so a
reloaded run predicts without :meth:`prepare`.

Defaults: ``sccm_weight = kdsp_weight = 1``, ``tau = 1.5``, ``n_prompts = 50`` (the released
train.py defaults); the published per-dataset few-shot and base-to-novel values are the preset's
tables (``presets/biomedcoop.yaml``). The published run kept the frozen BERT in train mode
(dropout 0.1 active) while the prompts trained, so ``text_dropout`` defaults to true here; teacher
features are always computed in eval mode.

Deliberate departures from the reference code (no ``variant``: none changes the algorithm's result
where the reference's is defined):

* **Degenerate statistics.** When ``MAD = 0`` (more than half of the scores equal their median) the
  reference divides by zero and its selection becomes NaN/empty. Here the division by the MAD is
  skipped (scale 1); since the second standardisation removes any positive scale, this keeps
  exactly the prompts the reference keeps whenever its MAD is positive. When ``std z = 0`` (all
  scores equal, or a single prompt), when a statistic is not finite, or when no prompt passes
  (possible only for τ < 1), every prompt is kept: ``h^sel = h^all``.
* **One image pass.** The reference encodes every batch twice with identical frozen ViTs (student
  path and a ``ZS_image_encoder`` copy). The teacher logits here use the same cached features ``f``
  as the student: the same numbers, computed once.
* **Teacher statistics in fp32.** Scores, selection and teacher logits are computed without
  autocast (bf16 on CUDA would only perturb the selection); the losses are reduced in fp32.
* **Context initialisation.** The reference initialises from "a photo of a" only when N_CTX = 4
  (random otherwise); here ``ctx_init`` initialises any ``n_ctx`` up to its word-piece count, as in
  CoOp. The published setting (4) is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._teacher import bank_centroid, description_features
from .base import Batch, TrainingData
from .coop import CoOp, CoOpConfig

__all__ = ["BiomedCoOp", "BiomedCoOpConfig", "kdsp_loss", "prompt_scores", "select_prompts"]


@dataclass
class BiomedCoOpConfig(CoOpConfig):
    text_dropout: bool = field(
        default=True,
        metadata={"help": "run the frozen text transformer in train mode (dropout active) while training, as the "
                          "published BiomedCoOp code did; teacher features are always computed in eval mode"},
    )
    descriptions: str = field(
        default="builtin",
        metadata={"help": "description bank of the teacher: 'builtin', 'builtin:<dataset>', or a .json/.py bank "
                          "file (':NAME' picks one bank of a file)"},
    )
    n_prompts: int = field(
        default=50,
        metadata={"help": "P: descriptions per class used as teacher (the first P of each class; every class "
                          "needs at least P)"},
    )
    sccm_weight: float = field(
        default=1.0,
        metadata={"help": "λ_SCCM: weight of mean_{c,d}(t − h_all)², the pull of the learned text features to the "
                          "description centroid"},
    )
    kdsp_weight: float = field(
        default=1.0,
        metadata={"help": "λ_KDSP: weight of KL(softmax(s f h_selᵀ) ‖ softmax(z)) summed / (B·C), distillation "
                          "to the zero-shot logits of the kept descriptions"},
    )
    tau: float = field(
        default=1.5,
        metadata={"help": "τ: keep description i iff the |z-score| of its batch score S_i over the descriptions is "
                          "≤ τ (median/MAD-normalised as published; degenerate statistics keep all)"},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.descriptions, str) or not self.descriptions.strip():
            raise ValueError(f"descriptions must be 'builtin', 'builtin:<dataset>' or a bank file, "
                             f"got {self.descriptions!r}")
        if isinstance(self.n_prompts, bool) or not isinstance(self.n_prompts, int) or self.n_prompts < 1:
            raise ValueError(f"n_prompts must be an integer ≥ 1, got {self.n_prompts!r}")
        if not self.sccm_weight >= 0:
            raise ValueError(f"sccm_weight must be ≥ 0, got {self.sccm_weight}")
        if not self.kdsp_weight >= 0:
            raise ValueError(f"kdsp_weight must be ≥ 0, got {self.kdsp_weight}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def prompt_scores(image: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``S_i = mean_b max_c scale · f_b · G[c, i]`` [P] for image features [B, D] and teacher [C, P, D]."""
    sims = scale * torch.einsum("bd,cpd->bcp", image, teacher)
    return sims.amax(dim=1).mean(dim=0)


def select_prompts(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask [P] of the prompts kept: ``|(z − mean z) / std z| ≤ τ``, ``z = (S − median S) / MAD``.

    Guards (see the module docstring): ``MAD = 0`` skips the division by the MAD; ``std z = 0``,
    a non-finite statistic, or an empty selection keep every prompt. Tensor ops only (no host
    synchronisation).
    """
    med = scores.median()
    mad = (scores - med).abs().median()
    z = (scores - med) / torch.where(mad > 0, mad, torch.ones_like(mad))
    std = z.std() if z.numel() > 1 else torch.zeros_like(med)
    usable = torch.isfinite(std) & (std > 0)
    standard = (z - z.mean()) / torch.where(usable, std, torch.ones_like(std))
    keep = standard.abs() <= tau
    keep_all = ~usable | ~keep.any() | ~torch.isfinite(standard).all()
    return keep | keep_all


def kdsp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(1/(B·C)) Σ_b Σ_c p^T (log p^T − log p^S)`` at temperature 1, for logits [B, C] (unweighted)."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() / student.numel()


class BiomedCoOp(CoOp):
    name = "biomedcoop"
    summary = "BiomedCoOp: CoOp with an LLM description bank as teacher (SCCM + KDSP with outlier-pruned prompts)"
    Config = BiomedCoOpConfig

    def __init__(self, backbone, classnames: Sequence[str], config: BiomedCoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        # Training-time state derived from the bank: set by prepare(), never saved (non-persistent).
        self.register_buffer("teacher_features", None, persistent=False)  # G [C, P, D]
        self.register_buffer("teacher_centroid", None, persistent=False)  # h_all [C, D]

    # ------------------------------------------------------------------ teacher
    def prepare(self, data: TrainingData) -> None:
        """Encode the teacher descriptions (through the run's cache: once per backbone)."""
        cfg = self.config
        features = description_features(self.backbone, self.classnames, cfg.descriptions, cfg.n_prompts,
                                        data=data, method=self.name)
        self.set_teacher(features)

    def set_teacher(self, features: torch.Tensor) -> None:
        """Use ``features`` [C, P, D] (normalised here) as the teacher ``G``; sets ``h_all`` with it."""
        expected = (len(self.classnames), self.backbone.embed_dim)
        if features.dim() != 3 or (features.shape[0], features.shape[2]) != expected:
            raise ValueError(f"{self.name}: teacher features must be [C={expected[0]}, P, D={expected[1]}], "
                             f"got {list(features.shape)}")
        teacher = F.normalize(features.detach().float(), dim=-1).to(self.backbone.device)
        self.teacher_features = teacher
        self.teacher_centroid = bank_centroid(teacher)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the context; the teacher belongs to the old classes and is dropped (prepare() rebuilds it)."""
        super().set_classnames(classnames)
        self.teacher_features = None
        self.teacher_centroid = None

    def _require_teacher(self) -> torch.Tensor:
        if self.teacher_features is None:
            raise RuntimeError(f"{self.name}: training needs the description teacher; call prepare(data) first "
                               "(prediction does not)")
        return self.teacher_features

    @torch.no_grad()
    def teacher_outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """For normalised image features [B, D]: ``scores`` [P], ``keep`` [P], ``h_sel`` [C, D], ``logits`` [B, C].

        fp32, outside autocast, no gradient; ``image`` is the same tensor the student uses.
        """
        teacher = self._require_teacher()
        with torch.autocast(device_type=image.device.type, enabled=False):
            f = image.float()
            scale = self.logit_scale.float()
            scores = prompt_scores(f, teacher, scale)
            keep = select_prompts(scores, self.config.tau)
            weights = keep.to(teacher.dtype)
            h_sel = F.normalize((teacher * weights[None, :, None]).sum(1) / weights.sum(), dim=-1)
            logits = scale * f @ h_sel.t()
        return {"scores": scores, "keep": keep, "h_sel": h_sel, "logits": logits}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss = ce + sccm + kdsp`` (weighted terms, each logged) and ``kept`` (prompts kept this batch)."""
        self._require_teacher()
        image = self.image_features(batch)
        text = self.text_features()  # one text-tower pass serves CE and SCCM
        logits = self.logit_scale * image @ text.t()
        ce = F.cross_entropy(logits.float(), batch.labels.to(logits.device))
        teacher = self.teacher_outputs(image)  # the same image features: one image pass, not two
        sccm = self.config.sccm_weight * (text.float() - self.teacher_centroid).pow(2).mean()
        kdsp = self.config.kdsp_weight * kdsp_loss(logits, teacher["logits"])
        return {"loss": ce + sccm + kdsp, "ce": ce, "sccm": sccm, "kdsp": kdsp,
                "kept": teacher["keep"].sum().float()}
