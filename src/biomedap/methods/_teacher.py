"""Teacher text from description banks, shared by BiomedCoOp, Biomed-DPT and BiomedAP.

The teacher is the frozen text tower applied to each class's first ``P`` descriptions:
``G[c, i] = normalize(TextEnc(desc_{c,i}))``, a [C, P, D] tensor. It is computed once per run
(from the feature cache when the run has one: the same sentences are encoded once per backbone)
and is never saved with a run: it is training-time state derived from the bank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..prompts.banks import resolve_descriptions

if TYPE_CHECKING:
    from ..backbone import Backbone
    from .base import TrainingData

__all__ = ["bank_centroid", "description_features"]


def description_features(
    backbone: Backbone,
    classnames: Sequence[str],
    source: str,
    n_prompts: int,
    *,
    data: TrainingData | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """Normalised teacher features [C, P, D] of the first ``n_prompts`` descriptions per class.

    ``source`` is a ``descriptions`` option value (``"builtin"``, ``"builtin:<dataset>"`` or a bank
    file; see :func:`biomedap.prompts.resolve_descriptions`). Every class must have at least
    ``n_prompts`` descriptions (prompt index ``i`` is a column across classes, as published):
    a shorter class is an error naming it, never a silent truncation.
    """
    bank = resolve_descriptions(source, classnames, limit=n_prompts, method=method)
    short = {name: len(bank[name]) for name in classnames if len(bank[name]) < n_prompts}
    if short:
        raise ValueError(f"{method or 'this method'} uses {n_prompts} descriptions per class (n_prompts), but "
                         f"{source} has fewer for {short}; lower n_prompts or add descriptions")
    texts = [text for name in classnames for text in bank[name]]
    if data is not None:
        flat = data.encode_texts(backbone, texts)
    else:
        from ..features import encode_texts

        flat = encode_texts(backbone, texts).to(backbone.device)
    return flat.reshape(len(classnames), n_prompts, -1)


def bank_centroid(features: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``normalize(mean_i G[:, i])`` over all prompts, or over the prompt indices where ``keep`` is True: [C, D]."""
    if keep is not None:
        features = features[:, keep]
    return F.normalize(features.mean(dim=1), dim=-1)
