"""ProGrad: CoOp whose gradient is kept from contradicting the zero-shot model (Zhu et al., ICCV 2023).

The student is CoOp, ``z^s = s · f tᵀ``.  The teacher is zero-shot CLIP with ``template``,
``z^t = s · f (t^zs)ᵀ``, ``t^zs`` the normalised features of "a photo of a {}." (computed once, eval
mode, no grad, never saved).  Two losses on the same student logits::

    L_ce = CE(z^s, y)
    L_kd = T² · mean_i Σ_c −softmax(z^t_i / T)_c · log softmax(z^s_i / T)_c

and, per parameter tensor, ``g_ce = ∇L_ce``, ``g_kd = ∇L_kd``, ``ĝ = g_kd / ‖g_kd‖``::

    g = g_ce − λ ⟨g_ce, ĝ⟩ ĝ   if ⟨g_ce, ĝ⟩ < 0,   else   g = g_ce

(:func:`project_conflicting`).  The optimiser steps with ``g``: the distillation gradient is never
added, it only forbids the half-space that contradicts the teacher.  ``‖g_kd‖ = 0`` leaves ``g_ce``.
``g_kd`` is back-propagated from the exact logit gradient ``T (softmax(z^s/T) − softmax(z^t/T)) / B``,
so a student equal to its teacher (at initialisation, when ``ctx_init`` is the template's phrase)
gives ``g_kd = 0`` exactly, not rounding noise whose direction would be projected on.
``train_step`` logs ``loss`` (= ``ce``), ``ce``, ``kd`` and ``projected`` (1 if any tensor's fired).

Variants:

* ``paper`` (default): the algorithm above.
* ``released``: BiomedCoOp's ``ProGrad_BiomedCLIP`` trainer, which produced the published BiomedCLIP
  numbers, computes the teacher logits with the *student itself* (the zero-shot model it builds
  is never called).  Then ``softmax(z^t/T) = softmax(z^s/T)``, ``g_kd = 0`` and the projection never
  fires: the update is plain CoOp cross-entropy with ProGrad's optimiser settings, and the
  temperature T and λ have no effect.  This variant runs exactly that CE update (the degenerate
  teacher is not evaluated; ``kd`` is logged as 0).

Published BiomedCLIP settings: SGD lr 0.002, batch 128, 100 epochs, λ = 1, T per dataset
(base-to-novel: lr 0.0015, 50 epochs, T = 1) — see ``presets/prograd.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, class_text_features
from .coop import CoOp, CoOpConfig


def _project(g_ce: torch.Tensor, g_kd: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(projected gradient, whether it conflicted) — tensor ops only, no host synchronisation."""
    norm = torch.linalg.vector_norm(g_kd)
    # A zero g_kd divides by the clamp, gives ĝ = 0 and ⟨g_ce, ĝ⟩ = 0: no projection, no NaN.
    unit = g_kd / norm.clamp_min(torch.finfo(g_kd.dtype).tiny)
    dot = (g_ce * unit).sum()
    conflict = dot < 0
    return torch.where(conflict, g_ce - weight * dot * unit, g_ce), conflict


def project_conflicting(g_ce: torch.Tensor, g_kd: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """ProGrad's update direction for one parameter tensor.

    ``ĝ = g_kd / ‖g_kd‖``; if ``⟨g_ce, ĝ⟩ < 0`` return ``g_ce − weight · ⟨g_ce, ĝ⟩ ĝ`` (with
    ``weight = 1`` the component opposing ``g_kd`` is removed), else ``g_ce`` unchanged.  A zero
    ``g_kd`` returns ``g_ce``.
    """
    return _project(g_ce, g_kd, weight)[0]


@dataclass
class ProGradConfig(CoOpConfig):
    temperature: float = field(
        default=1.0, metadata={"help": "distillation temperature T (L_kd is scaled by T²); inert in variant=released"}
    )
    projection_weight: float = field(
        default=1.0,
        metadata={"help": "λ: fraction of the conflicting component removed (1 = full projection; the ProGrad paper "
                          "also used 0.8); inert in variant=released"},
    )
    template: str = field(
        default="a photo of a {}.", metadata={"help": "zero-shot teacher's prompt ('{}' = class name)"}
    )
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: zero-shot teacher + gradient projection | released: BiomedCoOp's BiomedCLIP "
                          "trainer, whose teacher was the student itself, i.e. plain CoOp cross-entropy"},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.projection_weight >= 0:
            raise ValueError(f"projection_weight must be ≥ 0, got {self.projection_weight}")
        if self.template.count("{}") != 1:
            raise ValueError(f"template: {self.template!r} must contain exactly one '{{}}' for the class name")
        if self.variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {self.variant!r}")


class ProGrad(CoOp):
    name = "prograd"
    summary = "ProGrad: CoOp updates projected to not contradict the zero-shot model's predictions"
    Config = ProGradConfig

    def __init__(self, backbone, classnames: Sequence[str], config: ProGradConfig | None = None):
        super().__init__(backbone, classnames, config)
        self._build_teacher()

    def _build_teacher(self) -> None:
        texts = [[self.config.template.format(name)] for name in self.classnames]
        # Eval mode, no grad (class_text_features); derived from backbone + class names: not saved.
        self.register_buffer("zs_text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._build_teacher()

    def teacher_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits ``s · f (t^zs)ᵀ`` [B, C] of normalised image features [B, D]."""
        return self.logit_scale * image @ self.zs_text_features.to(image.dtype).t()

    def _student_and_teacher(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = self.image_features(batch)
        student = self.logit_scale * image @ self.text_features().t()
        if self.config.variant == "released":
            return student, None
        with torch.no_grad():
            teacher = self.teacher_logits(image)
        return student, teacher

    def _losses(self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor):
        ce = F.cross_entropy(student, labels.to(student.device))
        if teacher is None:  # released: the teacher is the student, its distillation term carries no gradient
            return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
        t = self.config.temperature
        target = F.softmax(teacher.float() / t, dim=-1)
        kd = t * t * -(target * F.log_softmax(student.float() / t, dim=-1)).sum(-1).mean()
        return {"loss": ce, "ce": ce, "kd": kd}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss`` = ``ce`` (the objective whose gradient is stepped); ``kd`` is the distillation loss."""
        student, teacher = self._student_and_teacher(batch)
        return self._losses(student, teacher, batch.labels)

    def gradients(self, batch: Batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(losses, g_ce, g_kd)``, one gradient per trainable tensor, from one student forward.

        ``g_kd`` is the vector-Jacobian product of the exact ``∂L_kd/∂z^s = T (softmax(z^s/T) −
        softmax(z^t/T)) / B``: a teacher equal to the student then gives exactly 0, where autograd
        through ``log_softmax`` leaves ~1e-8 of rounding noise whose *direction* the projection
        would otherwise use (with ``ctx_init`` = the template, student = teacher at initialisation).
        """
        if self.config.variant == "released":
            raise ValueError("prograd variant=released has no distillation gradient (its teacher is the student)")
        student, teacher = self._student_and_teacher(batch)
        losses = self._losses(student, teacher, batch.labels)
        params = self.trainable_parameters()
        g_ce = torch.autograd.grad(losses["ce"], params, retain_graph=True)
        t = self.config.temperature
        with torch.no_grad():
            dz = t * (F.softmax(student.float() / t, dim=-1) - F.softmax(teacher.float() / t, dim=-1))
            dz = (dz / student.shape[0]).to(student.dtype)
        g_kd = torch.autograd.grad(student, params, grad_outputs=dz)
        return losses, list(g_ce), list(g_kd)

    def train_step(
        self, batch: Batch, optimizer: torch.optim.Optimizer, grad_clip: float | None = None
    ) -> dict[str, float]:
        """One step with the projected gradient; ``projected`` = 1.0 if the projection fired for any tensor."""
        if self.config.variant == "released":
            # The released teacher gives g_kd = 0: exactly the CoOp cross-entropy step.
            return {**super().train_step(batch, optimizer, grad_clip), "projected": 0.0}
        losses, g_ce, g_kd = self.gradients(batch)
        params = self.trainable_parameters()
        optimizer.zero_grad(set_to_none=True)
        fired = []
        for p, ce_grad, kd_grad in zip(params, g_ce, g_kd, strict=True):
            p.grad, conflict = _project(ce_grad, kd_grad, self.config.projection_weight)
            fired.append(conflict)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["projected"] = float(torch.stack(fired).any())
        return out
