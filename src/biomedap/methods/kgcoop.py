"""KgCoOp: CoOp regularised towards the hand-written prompt's text features (Yao et al., CVPR 2023).

Logits as CoOp, ``z = s · f tᵀ``.  The loss adds a knowledge-guided term that keeps the learned
class text features close to the zero-shot ones::

    L = CE(z, y) + W · (1 − (1/C) Σ_c cos(t_c, t_c^zs))

with ``t^zs`` the normalised features of ``template`` ("a photo of a {}."), computed once in eval
mode without gradients (rebuilt when the class names change, never saved).  For unit vectors
``1 − cos = ½‖t − t^zs‖²``, so the paper's ``λ · mean_c ‖t_c − t_c^zs‖²`` has ``λ = W / 2``; the
option is the released code's ``W`` (``kg_weight``).  With ``ctx_init`` "a photo of a" and that
template the term is 0 at initialisation: KgCoOp is CoOp anchored to its own starting point in
text-feature space.  Inference uses only ``z``.

Published BiomedCLIP settings (BiomedCoOp's baseline run): SGD lr 0.002, batch 128, 100 epochs,
W per dataset (base-to-novel: W = 8 and 50 epochs) — see ``presets/kgcoop.yaml``.  No code
deviation from the paper: no ``variant``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Batch, class_text_features
from .coop import CoOp, CoOpConfig


@dataclass
class KgCoOpConfig(CoOpConfig):
    kg_weight: float = field(
        default=8.0,
        metadata={"help": "W in L = CE + W·(1 − mean_c cos(t_c, t_c^zs)); the paper's λ (on the squared distance "
                          "mean_c‖t_c − t_c^zs‖²) equals W/2, since 1 − cos = ½‖t − t^zs‖² for unit vectors"},
    )
    template: str = field(
        default="a photo of a {}.",
        metadata={"help": "hand-written prompt whose zero-shot text features anchor the learned ones ('{}' = class)"},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.kg_weight >= 0:
            raise ValueError(f"kg_weight must be ≥ 0, got {self.kg_weight}")
        if self.template.count("{}") != 1:
            raise ValueError(f"template: {self.template!r} must contain exactly one '{{}}' for the class name")


class KgCoOp(CoOp):
    name = "kgcoop"
    summary = "KgCoOp: CoOp with a pull towards the zero-shot prompt's text features"
    Config = KgCoOpConfig

    def __init__(self, backbone, classnames: Sequence[str], config: KgCoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        self._build_anchor()

    def _build_anchor(self) -> None:
        texts = [[self.config.template.format(name)] for name in self.classnames]
        # Eval mode, no grad (class_text_features); derived from backbone + class names: not saved.
        self.register_buffer("zs_text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._build_anchor()

    def knowledge_loss(self, text: torch.Tensor) -> torch.Tensor:
        """``W · (1 − mean_c cos(t_c, t_c^zs))`` for learned class text features ``text`` [C, D]."""
        cos = F.cosine_similarity(text, self.zs_text_features.to(text.dtype), dim=-1)
        return self.config.kg_weight * (1.0 - cos.mean())

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss = ce + kg``; ``kg`` is the weighted regulariser, logged so its size is visible."""
        image = self.image_features(batch)
        text = self.text_features()  # one text-tower pass serves both terms
        logits = self.logit_scale * image @ text.t()
        ce = F.cross_entropy(logits, batch.labels.to(logits.device))
        kg = self.knowledge_loss(text)
        return {"loss": ce + kg, "ce": ce, "kg": kg}
