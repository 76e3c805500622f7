"""BioVLM: a bank of learned prompts routed per image by low entropy (Singha et al., ACL Findings 2026).

Prompt bank
    ``K = n_prompts_bank`` (10) learned contexts of ``n_ctx`` (4) vectors each, shared by all
    classes: prompt ``j`` of class ``c`` is ``[CLS] ctx_j,1 … ctx_j,4 <class c> . [SEP]``, giving
    normalised text features ``T[j, c]`` ([K, C, D]) and logits ``Z[b, j, c] = s · f_b · T[j, c]``.

Low-entropy selection (training *and* inference)
    For each image, the ``k = round(ρ·K)`` prompts (ρ = ``selection_ratio`` = 0.5, round half up,
    at least 1) whose ``softmax(Z[b, j])`` has the lowest entropy are kept and the logits are the
    mean of their rows: ``z^S_b = mean_{j ∈ sel_b} Z[b, j]``. The selection is an index (no
    gradient); the gradient flows through the kept rows. Test logits are ``z^S``.

LLM-attribute teacher (computed in :meth:`BioVLM.prepare`, eval mode, cached, never saved)
    ``A = n_attributes`` (10) attribute phrases per class from ``attributes``, framed as
    "{prefix} {class} {suffix}, which {attribute}." (:func:`biomedap.prompts.attribute_sentences`),
    encoded by the frozen text tower: ``G[j, c]`` ([A, C, D]), classes in *label order*.
    ``z^T_b`` = mean of the ``round(ρ·A)`` lowest-entropy rows of ``s · f_b · G[j]ᵀ``.

Strong/weak consistency
    Two extra views of every training image (:meth:`BioVLM.extra_views`, encoded into the feature
    cache by the runner, in ``Batch.extra``): weak = RandomResizedCrop(0.08–1) + flip; strong = the
    same + ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 + GaussianBlur(3, σ ∈ [0.1, 2]) with p = 0.5.
    The teacher logits of both views are pooled (2A = 20 candidates per image), the
    ``round(ρ·2A)`` lowest-entropy rows averaged: ``z^TA_b``. A batch without the two views (a
    method driven outside the runner, the registry tests, ``consistency: false``) skips this term
    (logged as 0).

Loss (N = B·K·C, as published: the KL sums are divided by the size of the prompt-bank logits)::

    L = CE(z^S, y)
      + λ_kl  · Σ_{b,c} p^T (log p^T − log p^S) / N          KL(z^T ‖ z^S), p = softmax, T = 1
      + λ_kla · Σ_{b,c} p^TA (log p^TA − log p^S) / N        KL(z^TA ‖ z^S)
      + λ_cos · (1 − mean_{j<m, c} cos(T[j, c], G[j, c]))   m = min(K, A): prompt j ↔ attribute j
      + λ_H   · mean_b H( mean_{j ∈ sel_b} softmax(Z[b, j]) )

λ_kl = λ_kla = 1, λ_cos = λ_H = 0.5 (published). The last term is TPT's marginal ("average")
entropy of the selected prompt outputs of each image, *added* (minimised: the kept prompts are
pushed to agree on a confident prediction); it carries gradient to the contexts through ``T``.
The released code also added 0.5 × the marginal entropies of the selected teacher outputs of the
attribute bank and of the augmented attribute bank; those depend only on frozen features (image
tower, text tower, fixed sentences), so they are constant with respect to every trainable tensor
whether or not they are detached: they are logged (``h_desc``, ``h_desc_aug``), not optimised.

Defaults follow the published config (``presets/biovlm.yaml``): SGD lr 0.002, batch 32, 50 epochs,
cosine, one warm-up epoch at 1e-5, fp32, frozen text tower in eval mode (only the prompt learner
was registered).

Departures from the released code (mainaksingha01/BioVLM ``53e34dd``), each deliberate:

* **No double embedding.** The release stored the *output of BERT's embedding module* (word +
  position + token type, LayerNorm) as prompt prefix/suffix and fed the result as
  ``inputs_embeds`` again, so position/type embeddings and the LayerNorm were applied twice.
  Here the contexts live in the raw word-embedding space and the text tower adds position/type
  embeddings and its LayerNorm once (:meth:`Backbone.encode_text_embeddings`), as in CoOp.
* **Training runs.** The release's training branch lacked the per-image selection line and
  crashed (``NameError``) on the first step; here the selection is applied in training exactly as
  at inference, as the paper describes.
* **Label order.** The release stacked attribute features in JSON key order, which mismatched the
  classes of BTMRI, COVID_19, DermaMNIST, KneeXray and RETINA in the KL and cosine terms; here
  they follow the class list, whatever the file's order.
* **Teacher once.** The release re-encoded the attribute sentences every step; the frozen text
  tower in eval mode gives the same features, computed once in ``prepare`` (and cached).
* **Entropies with gradient.** The release collected its entropy terms with ``torch.tensor(list)``
  (detached constants); here the prompt-bank entropy is a differentiable loss term (see above).
* **Views.** The release applied flip/jitter/blur to already normalised tensors (colour jitter on
  negative values) sharing the main view's crop; here the strong and weak views are augmented on
  the PIL image with crops of their own and pre-extracted into the feature cache. The main
  training view is the Dassl crop without flip, normalised with the backbone's (CLIP) statistics;
  the release flipped it too and used ImageNet statistics.
* ``ctx_init``: the release's init-phrase path called CLIP-only functions and crashed; here it is
  an option: every prompt starts from the phrase's word embeddings plus N(0, ``init_std``²) noise
  (without the noise the K prompts would be identical). Default: random N(0, 0.02²), as released.

No ``variant: released``: the released training code does not run, so no published number
depends on a behaviour it could have had.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import AugmentSpec
from ..prompts.banks import (
    AmbiguousBankError,
    AttributeFrame,
    BankFormatError,
    MissingBankError,
    _as_bank,
    _as_frame,
    attribute_sentences,
    check_against,
    find_bank,
    load_attributes,
)
from ._prompting import build_prompt_layout, context_from_phrase, insert_context, register_layout
from .base import Batch, Method, MethodConfig, TrainingData

__all__ = [
    "STRONG_VIEW",
    "WEAK_VIEW",
    "BioVLM",
    "BioVLMConfig",
    "attribute_texts",
    "kl_sum",
    "marginal_entropy",
    "num_selected",
    "resolve_attributes",
    "select_low_entropy",
]

WEAK_VIEW = AugmentSpec(kind="random_resized_crop", scale=(0.08, 1.0), hflip=True)
"""BioVLM's weak view: RandomResizedCrop(0.08–1) + horizontal flip."""

STRONG_VIEW = AugmentSpec(
    kind="random_resized_crop", scale=(0.08, 1.0), hflip=True,
    color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.8, blur_kernel=3, blur_p=0.5,
)
"""BioVLM's strong view: the weak view + ColorJitter(0.4, 0.4, 0.4, 0.1) (p 0.8) + GaussianBlur(3) (p 0.5)."""

BUILTIN = "builtin"


# ------------------------------------------------------------------------------------ formulas


def num_selected(n: int, ratio: float) -> int:
    """How many of ``n`` candidates the selection keeps: ``ratio·n`` rounded half up, in [1, n]."""
    return max(1, min(n, math.floor(ratio * n + 0.5)))


def select_low_entropy(logits: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``b``, keep the candidates ``j`` of ``logits`` [B, J, C] whose softmax has the lowest entropy.

    Returns ``(mean of the kept rows [B, C], the kept rows [B, k, C])``. The choice is made without
    gradient; gradients flow through the kept rows. Ties go to the lower index.
    """
    if logits.dim() != 3:
        raise ValueError(f"select_low_entropy expects [B, J, C] logits, got shape {tuple(logits.shape)}")
    k = num_selected(logits.shape[1], ratio)
    with torch.no_grad():
        log_p = F.log_softmax(logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)  # [B, J]
        # A stable sort keeps ties in index order (topk does not promise an order for ties).
        index = torch.sort(entropy, dim=1, stable=True).indices[:, :k]
    kept = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return kept.mean(dim=1), kept


def marginal_entropy(kept: torch.Tensor) -> torch.Tensor:
    """TPT's marginal entropy per row: ``H(mean_j softmax(kept[b, j]))`` for ``kept`` [B, k, C] -> [B]."""
    log_p = F.log_softmax(kept.float(), dim=-1)
    log_mean = torch.logsumexp(log_p, dim=1) - math.log(kept.shape[1])  # log of the mean probability
    return -(log_mean.exp() * log_mean).sum(-1)


def kl_sum(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``Σ_{b,c} p^T (log p^T − log p^S)`` of logits [B, C] (temperature 1), not normalised."""
    log_t = F.log_softmax(teacher.float(), dim=-1)
    log_s = F.log_softmax(student.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum()


# ------------------------------------------------------------------------------------ attributes


def resolve_attributes(source: str | os.PathLike, classnames: Sequence[str]) -> tuple[AttributeFrame, dict[str, list[str]]]:
    """The attribute frame and ``{class: [phrase, ...]}`` covering ``classnames``, from an ``attributes`` option.

    * ``"builtin"`` — the built-in list of the catalog dataset whose classes cover ``classnames``;
    * ``"builtin:<dataset>"`` — that dataset's built-in list;
    * a JSON file ``{"frame": {"prefix": ..., "suffix": ...}, "attributes": {class: [phrase, ...]}}``
      (keys in any order: features always follow ``classnames``).

    Raises:
        MissingBankError: no list covers the classes (missing classes are named, with close spellings).
        AmbiguousBankError: several built-in lists cover the classes (name the dataset).
        BankFormatError, FileNotFoundError: a malformed or missing file.
    """
    text = os.fspath(source).strip()
    if text == BUILTIN or text.startswith(BUILTIN + ":"):
        dataset = text[len(BUILTIN) + 1:].strip() or None
        if dataset is None:
            try:
                dataset = find_bank(classnames)
            except AmbiguousBankError as err:
                raise AmbiguousBankError(f"{err} For biovlm: attributes=builtin:<dataset>.") from None
            if dataset is None:
                raise MissingBankError(
                    f"biovlm: no built-in attribute list covers the classes {list(classnames)} (class names must "
                    "match a catalog dataset's exactly); pass attributes=builtin:<dataset> or a JSON file "
                    '{"frame": {"prefix": ..., "suffix": ...}, "attributes": {class: [10 phrases]}}'
                )
        frame, table = load_attributes(dataset)
        where = f"the built-in attribute list of {dataset}"
    else:
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            raise FileNotFoundError(f"biovlm: attributes file {text} does not exist (or use 'builtin')")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise BankFormatError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or "frame" not in data or "attributes" not in data:
            raise BankFormatError(f'{path} must hold {{"frame": {{"prefix", "suffix"}}, "attributes": {{...}}}}')
        frame, table = _as_frame(data["frame"], str(path)), _as_bank(data["attributes"], str(path))
        where = str(path)
    match = check_against(table, classnames)
    if not match.ok:
        raise MissingBankError(f"biovlm: {where} does not cover every class:\n{match.summary()}")
    return frame, table


def attribute_texts(source: str | os.PathLike, classnames: Sequence[str], n_attributes: int) -> list[list[str]]:
    """The first ``n_attributes`` framed attribute sentences of each class, in the order of ``classnames``."""
    frame, table = resolve_attributes(source, classnames)
    texts = []
    for name in classnames:
        sentences = attribute_sentences((frame, table), name)
        if len(sentences) < n_attributes:
            raise ValueError(f"biovlm uses {n_attributes} attributes per class (n_attributes), but {source} has "
                             f"{len(sentences)} for {name!r}; lower n_attributes or add attributes")
        texts.append(sentences[:n_attributes])
    return texts


# ------------------------------------------------------------------------------------ method


@dataclass
class BioVLMConfig(MethodConfig):
    n_prompts_bank: int = field(default=10, metadata={"help": "K: number of learned prompts in the bank"})
    n_ctx: int = field(default=4, metadata={"help": "context vectors per prompt (shared by all classes)"})
    ctx_init: str | None = field(
        default=None,
        metadata={"help": "phrase whose word embeddings (+ N(0, init_std²) noise per prompt) initialise every "
                          "prompt; null = random N(0, init_std²) as released"},
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random context initialisation (or noise)"})
    suffix: str = field(default=".", metadata={"help": "fixed text after the class name"})
    selection_ratio: float = field(
        default=0.5,
        metadata={"help": "fraction of lowest-entropy prompts (and teacher attributes) kept per image, in training "
                          "and at inference (rounded half up, at least one)"},
    )
    attributes: str = field(
        default="builtin",
        metadata={"help": "LLM attribute teacher: builtin (found from the class names) | builtin:<dataset> | a JSON "
                          "file {\"frame\": {\"prefix\", \"suffix\"}, \"attributes\": {class: [phrases]}}"},
    )
    n_attributes: int = field(default=10, metadata={"help": "A: attributes per class used by the teacher"})
    consistency: bool = field(
        default=True,
        metadata={"help": "strong/weak augmentation consistency term; true makes the runner pre-extract a weak and "
                          "a strong view of every training image"},
    )
    kl_weight: float = field(default=1.0, metadata={"help": "λ_kl on KL(z^T ‖ z^S)/N, N = B·K·C"})
    kl_aug_weight: float = field(default=1.0, metadata={"help": "λ_kla on KL(z^TA ‖ z^S)/N (strong/weak views)"})
    cos_weight: float = field(
        default=0.5, metadata={"help": "λ_cos on 1 − mean cos(T[j, c], G[j, c]) (prompt j paired with attribute j)"}
    )
    entropy_weight: float = field(
        default=0.5,
        metadata={"help": "λ_H on the marginal entropy of each image's selected prompt outputs (minimised)"},
    )

    def __post_init__(self):
        for option in ("n_prompts_bank", "n_ctx", "n_attributes"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option} must be an integer ≥ 1, got {value!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if not 0 < self.selection_ratio <= 1:
            raise ValueError(f"selection_ratio must be in (0, 1], got {self.selection_ratio}")
        if not str(self.attributes).strip():
            raise ValueError("attributes: give 'builtin', 'builtin:<dataset>' or a JSON file")
        for option in ("kl_weight", "kl_aug_weight", "cos_weight", "entropy_weight"):
            value = getattr(self, option)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{option} must be a finite number ≥ 0, got {value}")


class BioVLM(Method):
    name = "biovlm"
    summary = "BioVLM: bank of learned prompts, per-image low-entropy selection, LLM-attribute teacher (feature space)"
    Config = BioVLMConfig

    @classmethod
    def extra_views(cls, config: BioVLMConfig) -> dict[str, AugmentSpec]:
        """The weak and strong views of the consistency term (none when it is switched off)."""
        if not config.consistency or config.kl_aug_weight == 0:
            return {}
        return {"weak": WEAK_VIEW, "strong": STRONG_VIEW}

    def __init__(self, backbone, classnames: Sequence[str], config: BioVLMConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        k, n = cfg.n_prompts_bank, cfg.n_ctx
        if cfg.ctx_init:
            base, self._fixed_pieces = context_from_phrase(backbone, cfg.ctx_init, n)
            noise = torch.empty(k, n, backbone.text.width).normal_(std=cfg.init_std)
            ctx = base.unsqueeze(0) + noise.to(base.device)
        else:
            ctx, self._fixed_pieces = torch.empty(k, n, backbone.text.width).normal_(std=cfg.init_std), []
        self.ctx = nn.Parameter(ctx.to(backbone.device))  # [K, n_ctx, width]
        # Teacher [A, C, D]: training-time state from prepare(), never saved.
        self.register_buffer("attribute_features", None, persistent=False)
        self._build_prompts()

    def _build_prompts(self) -> None:
        layout = build_prompt_layout(
            self.backbone, self.classnames, self.config.n_ctx, "end",
            fixed_before_name=self._fixed_pieces, suffix=self.config.suffix,
        )
        register_layout(self, self.backbone, layout)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the bank to other class names (base-to-novel, cross-dataset); the teacher is dropped."""
        self.classnames = list(classnames)
        self._build_prompts()
        self.attribute_features = None

    # ------------------------------------------------------------------ prompts and logits
    def bank_text_features(self) -> torch.Tensor:
        """Normalised text features ``T`` [K, C, D] of every prompt of the bank for every class."""
        k, n, width = self.ctx.shape
        c, length = self.attention_mask.shape
        rows = self.token_embeds.unsqueeze(0).expand(k, -1, -1, -1).reshape(k * c, length, width)
        ctx = self.ctx.unsqueeze(1).expand(-1, c, -1, -1).reshape(k * c, n, width)
        embeds = insert_context(rows, ctx, self.ctx_positions.repeat(k, 1))
        text = self.backbone.encode_text_embeddings(embeds, self.attention_mask.repeat(k, 1), normalize=True)
        return text.reshape(k, c, -1)

    def bank_logits(self, image: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``Z[b, j, c] = s · f_b · T[j, c]`` [B, K, C]."""
        text = self.bank_text_features() if text is None else text
        return self.logit_scale * torch.einsum("bd,kcd->bkc", image, text.to(image.dtype))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean logits of each image's lowest-entropy prompts [B, C]."""
        logits, _ = select_low_entropy(self.bank_logits(self.image_features(batch)), self.config.selection_ratio)
        return logits

    # ------------------------------------------------------------------ teacher
    def prepare(self, data: TrainingData) -> None:
        """Encode the attribute sentences once (through the run's cache): the teacher ``G``."""
        self._build_teacher(data)

    def _build_teacher(self, data: TrainingData | None = None) -> torch.Tensor:
        cfg = self.config
        texts = attribute_texts(cfg.attributes, self.classnames, cfg.n_attributes)
        flat = [sentence for per_class in texts for sentence in per_class]  # class-major, label order
        if data is not None:
            features = data.encode_texts(self.backbone, flat)
        else:
            from ..features import encode_texts

            features = encode_texts(self.backbone, flat).to(self.backbone.device)
        features = features.reshape(len(self.classnames), cfg.n_attributes, -1).transpose(0, 1).contiguous()
        self.attribute_features = features  # [A, C, D]
        return features

    def teacher_features(self) -> torch.Tensor:
        """The teacher ``G`` [A, C, D] (built from ``attributes`` if :meth:`prepare` was not called)."""
        if self.attribute_features is None:
            return self._build_teacher()
        return self.attribute_features

    def teacher_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``s · f_b · G[j, c]`` [B, A, C]."""
        return self.logit_scale * torch.einsum("bd,acd->bac", image, self.teacher_features().to(image.dtype))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``loss = ce + λ_kl·kl + λ_kla·kl_aug + λ_cos·cos + λ_H·h_prompt`` (unweighted terms logged)."""
        cfg = self.config
        image = self.image_features(batch)
        labels = batch.labels.to(image.device)
        text = self.bank_text_features()
        bank = self.bank_logits(image, text)
        student, kept = select_low_entropy(bank, cfg.selection_ratio)
        ce = F.cross_entropy(student.float(), labels)
        h_prompt = marginal_entropy(kept).mean()
        n = bank.numel()  # N = B·K·C

        with torch.no_grad():
            teacher, kept_t = select_low_entropy(self.teacher_logits(image), cfg.selection_ratio)
            h_desc = marginal_entropy(kept_t).mean()
        kl = kl_sum(teacher, student) / n

        views = batch.extra or {}
        zero = torch.zeros((), device=image.device)
        kl_aug, h_desc_aug = zero, zero
        if cfg.consistency and "weak" in views and "strong" in views:
            with torch.no_grad():
                strong = views["strong"].to(image.device, image.dtype)  # normalised, like Batch.features
                weak = views["weak"].to(image.device, image.dtype)
                pooled = torch.cat([self.teacher_logits(strong), self.teacher_logits(weak)], dim=1)
                teacher_aug, kept_a = select_low_entropy(pooled, cfg.selection_ratio)
                h_desc_aug = marginal_entropy(kept_a).mean()
            kl_aug = kl_sum(teacher_aug, student) / n

        m = min(cfg.n_prompts_bank, cfg.n_attributes)
        target = self.teacher_features()[:m].to(text.dtype)
        cos = 1.0 - F.cosine_similarity(text[:m].float(), target.float(), dim=-1).mean()

        loss = (ce + cfg.kl_weight * kl + cfg.kl_aug_weight * kl_aug + cfg.cos_weight * cos
                + cfg.entropy_weight * h_prompt)
        return {"loss": loss, "ce": ce, "kl": kl, "kl_aug": kl_aug, "cos": cos, "h_prompt": h_prompt,
                "h_desc": h_desc, "h_desc_aug": h_desc_aug}
