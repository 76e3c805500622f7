"""Tip-Adapter: a training-free key-value cache of the few-shot images (Zhang et al., ECCV 2022).

Logits for a normalised image feature ``f`` (reference notes: baselines.md §3.7)::

    z = s · f W_textᵀ + α · exp(−β · (1 − f Kᵀ)) L

* ``W_text`` [C, D]: normalised features of ``template`` ("a photo of a {}."), computed once in
  eval mode from the class names (a non-persistent buffer, never saved);
* ``s``: the backbone's logit scale, exp of the checkpoint's learned log-scale (≈ 85.23 for
  BiomedCLIP; the published harness hard-coded 85.2323, the same value);
* cache keys ``K`` [NK, D]: one feature per training image — the first augmented view of the run
  (``TrainingData.train_features``; the published harness took one random RandomResizedCrop
  (0.5–1) + flip view, ``augment_epoch = 1``), re-normalised;
* cache values ``L`` [NK, C]: the one-hot training labels;
* ``exp(−β(1 − fKᵀ))`` is computed as the reference does, ``exp(−(β − β·fKᵀ))``.

Nothing is trained.  :meth:`TipAdapter.prepare` builds the cache and then chooses ``(β, α)`` by an
exhaustive grid search on the few-shot validation split (min(K, 4) images per class, eval
transform): ``β_i = 0.1 + i·(scale_β − 0.1)/steps_β`` for ``i = 0..steps_β − 1`` and likewise α
(defaults 50 and 200: both in [0.1, 49.75], 40,000 pairs), maximising validation top-1 accuracy;
the comparison is a strict ">", so the first best pair in (β outer, α inner) order wins.  The
search is vectorised (:func:`search_cache_weights`): all α at once for a chunk of β values.

Learned state (persistent buffers, data-shaped, saved and reloaded): ``keys`` [NK, D], ``values``
[NK, C], ``alpha`` and ``beta`` (0-dim).  Before ``prepare`` the cache is empty and the method is
zero-shot.  The cache holds values for the training classes only, so the method cannot be
re-targeted to other class names (:meth:`set_classnames` refuses).

The published BiomedCLIP run matches this algorithm (no ``variant``); it differs from the original
Tip-Adapter in its harness: keys from one augmented view (the original averaged 10), the search
on the few-shot val split (the original used the full val split and per-dataset ranges, e.g.
Caltech β ∈ [0.1, 12]), logit scale 85.23 (CLIP: 100).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Batch, Method, MethodConfig, TrainingData, class_text_features


@dataclass
class TipAdapterConfig(MethodConfig):
    template: str = field(
        default="a photo of a {}.",
        metadata={"help": "prompt whose normalised text features form the zero-shot classifier "
                          "('{}' = class)"},
    )
    search_scale: tuple[float, float] = field(
        default=(50.0, 50.0),
        metadata={"help": "upper ends (β, α) of the validation grid search: "
                          "values 0.1 + i·(scale − 0.1)/steps"},
    )
    search_step: tuple[int, int] = field(
        default=(200, 200),
        metadata={"help": "number of grid values (β, α) of the validation search (i = 0..steps − 1)"},
    )

    def __post_init__(self):
        _check_template(self.template)
        _check_search(self.search_scale, self.search_step)


def _check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"template: {template!r} must contain exactly one '{{}}' for the class name")


def _check_search(scale: Sequence[float], step: Sequence[int]) -> None:
    if len(scale) != 2 or len(step) != 2:
        raise ValueError(f"search_scale and search_step: give two values each (β, α), got {list(scale)} "
                         f"and {list(step)}")
    for s in scale:
        if not s > 0.1:
            raise ValueError(f"search_scale: each upper end must be > 0.1 (the grid starts at 0.1), got {s}")
    for n in step:
        if n < 1:
            raise ValueError(f"search_step: each number of grid values must be ≥ 1, got {n}")


# --------------------------------------------------------------------------------------------------
# The cache term and the (β, α) search, shared with Tip-Adapter-F
# --------------------------------------------------------------------------------------------------


def search_grid(scale: float, steps: int) -> torch.Tensor:
    """The reference's grid ``[0.1 + i·(scale − 0.1)/steps for i in range(steps)]`` (float32)."""
    return torch.tensor([i * (scale - 0.1) / steps + 0.1 for i in range(steps)], dtype=torch.float64).float()


def cache_affinity(affinity: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """``exp(−β(1 − a))`` of cosine affinities ``a``, written ``exp(−(β − β·a))`` as the reference."""
    return torch.exp(-(beta - beta * affinity))


def tip_logits(
    clip_logits: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    alpha: torch.Tensor | float,
    beta: torch.Tensor | float,
) -> torch.Tensor:
    """``clip_logits + α · exp(−β(1 − affinity)) · values``: [B, C] from [B, C], [B, NK], [NK, C]."""
    return clip_logits + (cache_affinity(affinity, beta) @ values) * alpha


@dataclass(frozen=True)
class SearchResult:
    """The pair chosen by :func:`search_cache_weights` and its validation accuracy."""

    beta: float
    alpha: float
    correct: int  # validation images classified correctly with (beta, alpha)
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.no_grad()
def search_cache_weights(
    clip_logits: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    betas: torch.Tensor,
    alphas: torch.Tensor,
    *,
    max_elements: int = 1 << 24,
) -> SearchResult:
    """Exhaustive (β, α) search maximising the top-1 accuracy of :func:`tip_logits` on a labelled set.

    ``clip_logits`` [M, C] are the zero-shot logits of the set, ``affinity`` [M, NK] its cosine
    affinities to the cache keys, ``values`` [NK, C] the cache values.  Pairs are compared by their
    number of correct predictions with a strict ">", so the first best pair in (β outer, α inner)
    order wins, as the reference's nested loops.  Vectorised: for a chunk of β values all α are
    scored at once; ``max_elements`` bounds the [β chunk, α, M, C] logit tensor.
    """
    if clip_logits.shape[0] == 0:
        raise ValueError("the search needs at least one labelled image")
    labels = labels.to(clip_logits.device).long()
    betas = betas.to(clip_logits)
    alphas = alphas.to(clip_logits)
    m, c = clip_logits.shape
    chunk = max(1, max_elements // max(1, alphas.numel() * m * c))
    best: tuple[int, int, int] | None = None  # (correct, beta index, alpha index)
    for start in range(0, betas.numel(), chunk):
        beta = betas[start:start + chunk, None, None]  # [b, 1, 1]
        cache = cache_affinity(affinity[None], beta) @ values  # [b, M, C]
        logits = clip_logits + cache[:, None] * alphas[None, :, None, None]  # [b, a, M, C]
        correct = (logits.argmax(-1) == labels).sum(-1)  # [b, a]
        # argmax of the row-major flattening = the first maximum in (β, α) order.
        flat = int(correct.flatten().argmax())
        score = int(correct.flatten()[flat])
        if best is None or score > best[0]:
            best = (score, start + flat // alphas.numel(), flat % alphas.numel())
    score, i, j = best
    return SearchResult(beta=float(betas[i]), alpha=float(alphas[j]), correct=score, total=m)


def one_hot_values(labels: torch.Tensor, num_classes: int, method: str) -> torch.Tensor:
    """Cache values: one-hot training labels [N, C] (float32), with an error naming bad labels."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{method}: training labels must be in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels, num_classes).float()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class TipAdapter(Method):
    name = "tip_adapter"
    summary = "Tip-Adapter: training-free cache of few-shot features, (β, α) chosen on val"
    Config = TipAdapterConfig
    trainable = False
    supports_unseen_classes = False
    uses_validation = True

    def __init__(self, backbone, classnames: Sequence[str], config: TipAdapterConfig | None = None):
        super().__init__(backbone, classnames, config)
        device = backbone.device
        self._build_text_features()
        # Data-shaped learned state: empty until prepare(); load_learned_state resizes it.
        self._register_keys(torch.empty(0, backbone.embed_dim, device=device))
        self.register_buffer("values", torch.empty(0, len(self.classnames), device=device))
        self.register_buffer("alpha", torch.tensor(1.0, device=device))
        self.register_buffer("beta", torch.tensor(1.0, device=device))
        self.search_result: SearchResult | None = None

    def _register_keys(self, keys: torch.Tensor) -> None:
        """Fixed cache keys: a persistent buffer (Tip-Adapter-F makes them a parameter)."""
        self.register_buffer("keys", keys)

    def _build_text_features(self) -> None:
        texts = [[self.config.template.format(name)] for name in self.classnames]
        self.register_buffer("text_features", class_text_features(self.backbone, texts), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        raise ValueError(f"{self.name}: the cache holds values for the {len(self.classnames)} training "
                         "classes only and cannot predict other classes")

    def clip_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ self.text_features.t()

    def forward(self, batch: Batch) -> torch.Tensor:
        f = self.image_features(batch)
        return tip_logits(self.clip_logits(f), f @ self.keys.t(), self.values, self.alpha, self.beta)

    @torch.no_grad()
    def search(self, data: TrainingData) -> SearchResult:
        """Choose (β, α) on the validation split with the current keys; sets ``beta`` and ``alpha``."""
        val_x, val_y = data.require_validation(self.name)
        val_x = val_x.to(self.keys)
        cfg = self.config
        result = search_cache_weights(
            self.clip_logits(val_x), val_x @ self.keys.t(), self.values, val_y,
            search_grid(cfg.search_scale[0], cfg.search_step[0]),
            search_grid(cfg.search_scale[1], cfg.search_step[1]),
        )
        self.beta.fill_(result.beta)
        self.alpha.fill_(result.alpha)
        self.search_result = result
        return result

    @torch.no_grad()
    def prepare(self, data: TrainingData) -> None:
        """Build the cache from one feature per training image, then search (β, α) on val."""
        data.require_validation(self.name)  # fail before any work
        device = self.backbone.device
        self.keys = F.normalize(data.train_features.to(device).float(), dim=-1)
        self.values = one_hot_values(data.train_labels.to(device), len(self.classnames), self.name)
        self.search(data)

    def describe(self) -> dict:
        info = {**super().describe(), "cache_size": int(self.keys.shape[0]),
                "alpha": float(self.alpha), "beta": float(self.beta)}
        if self.search_result is not None:
            info["val_accuracy"] = self.search_result.accuracy
        return info
