"""Tip-Adapter-F: Tip-Adapter with fine-tuned cache keys (Zhang et al., ECCV 2022).

The cache keys of :mod:`~biomedap.methods.tip_adapter` become a learnable matrix ``W_a`` [NK, D],
initialised to the keys ``K`` (one feature per training image); the values ``L`` (one-hot labels)
and the zero-shot text weights stay frozen (reference notes: baselines.md §3.8)::

    z = s · f W_textᵀ + α · exp(−β · (1 − f W_aᵀ)) L          (W_a is not re-normalised)

trained with cross-entropy.  Learned state: ``keys`` (the parameter W_a), ``values``, ``alpha``,
``beta`` — all data-shaped or data-chosen, saved and reloaded like Tip-Adapter's.

``variant`` — the training protocol:

* ``"paper"`` (default), the original algorithm: :meth:`prepare` sets ``W_a = K``, β = ``init_beta``,
  α = ``init_alpha``; ``fit`` trains the keys (preset: AdamW lr 0.001, eps 1e-4, weight decay 0.01,
  20 epochs, batch 256, cosine over all iterations, a fresh augmented view per epoch); then
  :meth:`finalize` searches (β, α) on the validation split with the trained keys, exactly as
  Tip-Adapter.  The last epoch's keys are used: the original picked the best epoch on the *test*
  set, an acknowledged mistake (Tip-Adapter issue #11) that is not reproduced.
* ``"released"``, what BiomedCoOp's harness executed (code from the LP++ repository): inside
  :meth:`prepare`, for each α₀ ∈ {0, 1, …, ``init_alpha_scale`` − 1} a fresh adapter is built from
  ``K`` and trained with its own optimiser and schedule for ``optim.epochs`` epochs with β =
  ``init_beta`` (1) and α = α₀ (:func:`biomedap.train.fit` on the run's training views); its
  validation accuracy at (``init_beta``, α₀) is measured and the best adapter kept (strict ">",
  so the smallest α₀ wins ties).  The reference's "main" fine-tuning loop then stepped an
  optimiser bound to a discarded adapter, so the selected adapter was never trained further: here
  :meth:`needs_fit` is False and the runner skips ``fit``.  :meth:`finalize` then searches (β, α)
  on val as in the paper variant.  Every α₀ run sees the same training views and batch order
  (the reference drew fresh augmentations and a fresh order per run); only α₀ differs.

The paper variant fixes that bug: the adapter that is fine-tuned is the one used.  Both variants
run the final search on the few-shot val split (min(K, 4) per class); the original used the full
val split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import TrainingData
from .tip_adapter import TipAdapter, TipAdapterConfig, one_hot_values, tip_logits


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    init_beta: float = field(
        default=1.0, metadata={"help": "β while the keys train (and during the released α₀ search)"})
    init_alpha: float = field(
        default=1.0, metadata={"help": "α while the keys train (paper variant; released picks α₀ on val)"})
    init_alpha_scale: int = field(
        default=10,
        metadata={"help": "released variant: α₀ ∈ {0, 1, …, init_alpha_scale − 1}, "
                          "one full training run each"})
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: train the keys with fit, then search (β, α) on val | released: "
                          "BiomedCoOp's run — one training run per α₀ inside prepare, keep the best on val, "
                          "no further training"})

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.init_beta) and self.init_beta >= 0):
            raise ValueError(f"init_beta must be a finite number ≥ 0, got {self.init_beta}")
        if not math.isfinite(self.init_alpha):
            raise ValueError(f"init_alpha must be finite, got {self.init_alpha}")
        if self.init_alpha_scale < 1:
            raise ValueError(f"init_alpha_scale must be ≥ 1, got {self.init_alpha_scale}")
        if self.variant not in ("paper", "released"):
            raise ValueError(f"variant must be paper or released, got {self.variant!r}")


class TipAdapterF(TipAdapter):
    name = "tip_adapter_f"
    summary = "Tip-Adapter-F: Tip-Adapter with fine-tuned cache keys, (β, α) chosen on val"
    Config = TipAdapterFConfig
    trainable = True
    supports_unseen_classes = False
    uses_validation = True

    def __init__(self, backbone, classnames: Sequence[str], config: TipAdapterFConfig | None = None):
        super().__init__(backbone, classnames, config)
        self.alpha.fill_(self.config.init_alpha)
        self.beta.fill_(self.config.init_beta)
        # Released variant: the α₀ chosen on val and the val accuracy of every α₀ run (run cards show them).
        self.selected_init_alpha: int | None = None
        self.init_alpha_accuracies: list[float] = []

    def _register_keys(self, keys: torch.Tensor) -> None:
        # [0, D] until prepare() sizes it from the data; load_learned_state resizes it too.
        self.keys = nn.Parameter(keys)

    def needs_fit(self) -> bool:
        # The released protocol trains inside prepare() and never again (see the module docstring).
        return self.config.variant == "paper"

    def prepare(self, data: TrainingData) -> None:
        """Initialise the keys from the training features (released: also run the α₀ search)."""
        data.require_validation(self.name)
        device = self.backbone.device
        cfg = self.config
        with torch.no_grad():
            keys = F.normalize(data.train_features.to(device).float(), dim=-1)
            self.values = one_hot_values(data.train_labels.to(device), len(self.classnames), self.name)
            self.beta.fill_(cfg.init_beta)
            self.alpha.fill_(cfg.init_alpha)
        self.keys = nn.Parameter(keys.clone())
        if cfg.variant == "released":
            self._search_init_alpha(data, keys)

    def _search_init_alpha(self, data: TrainingData, initial_keys: torch.Tensor) -> None:
        from ..train import FeatureTrainData, fit  # train imports methods: import at use

        if data.optim is None:
            raise ValueError(f"{self.name} (variant released) trains inside prepare and needs the run's "
                             "optim settings in TrainingData.optim")
        views = data.views if data.views is not None else data.train_features.unsqueeze(0)
        train = FeatureTrainData(views, data.train_labels)
        val_x, val_y = data.require_validation(self.name)
        val_x = val_x.to(self.keys)
        val_y = val_y.to(val_x.device).long()
        best: tuple[int, int, torch.Tensor] | None = None  # (val correct, α₀, trained keys)
        self.init_alpha_accuracies = []
        for alpha0 in range(self.config.init_alpha_scale):
            with torch.no_grad():  # a fresh adapter from the cache keys
                self.keys.copy_(initial_keys)
                self.alpha.fill_(float(alpha0))
                self.beta.fill_(self.config.init_beta)
            fit(self, train, data.optim, seed=data.seed, precision=data.precision)
            with torch.no_grad():
                logits = tip_logits(self.clip_logits(val_x), val_x @ self.keys.t(), self.values,
                                    self.alpha, self.beta)
                correct = int((logits.argmax(-1) == val_y).sum())
            self.init_alpha_accuracies.append(correct / len(val_y))
            if best is None or correct > best[0]:
                best = (correct, alpha0, self.keys.detach().clone())
        _, alpha0, keys = best
        with torch.no_grad():
            self.keys.copy_(keys)
            self.alpha.fill_(float(alpha0))
        self.selected_init_alpha = alpha0

    def finalize(self, data: TrainingData) -> None:
        """Search (β, α) on the validation split with the trained keys."""
        self.search(data)

    def describe(self) -> dict:
        info = super().describe()
        if self.selected_init_alpha is not None:
            info["selected_init_alpha"] = self.selected_init_alpha
            info["init_alpha_val_accuracies"] = list(self.init_alpha_accuracies)
        return info
