"""The contract every method follows.

A method is an ``nn.Module`` holding only its own tensors; the frozen backbone is referenced, not
owned, so ``method.state_dict()`` is exactly what a run saves:

* trainable parameters (``requires_grad=True``), and
* learned state that is not trained by gradients (a probe's coefficients, Tip-Adapter's cache),
  registered as *persistent* buffers.

Everything derived from the backbone and the class names (token ids, fixed word embeddings,
zero-shot text features) is a *non-persistent* buffer, rebuilt on construction, so a saved run
reloads onto the backbone and can be re-targeted to other class names (base-to-novel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..backbone.towers import BlockHook
    from ..data.transforms import AugmentSpec


@dataclass
class Batch:
    """One mini-batch. Feature-space methods read ``features``; pixel-space methods ``pixels``.

    ``features`` are L2-normalised frozen image features [B, D].  A feature-space method given
    ``pixels`` encodes them itself (eval mode, no grad), which is how the cached and the pixel
    paths are checked against each other.
    """

    labels: torch.Tensor | None = None
    features: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    # Tokens entering block ``Method.prefix_block`` (from the cache), for ``input_kind = "tokens"``.
    tokens: torch.Tensor | None = None
    # Other views of the same images, by name (e.g. BioVLM's {"weak": [B, D], "strong": [B, D]}):
    # present in training batches of methods that declare ``extra_views``.
    extra: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                 for f in fields(self) if f.name != "extra"}
        extra = None if self.extra is None else {k: v.to(device) for k, v in self.extra.items()}
        return Batch(**moved, extra=extra)

    def __len__(self) -> int:
        for value in (self.features, self.tokens, self.pixels, self.labels):
            if value is not None:
                return value.shape[0]
        return 0


@dataclass
class TrainingData:
    """Everything a method may use to set itself up, beyond the mini-batches ``fit`` feeds it.

    All features are L2-normalised frozen image features.  ``train_features`` holds one view per
    training image: the first augmented view when the preset augments (the published LP / LP++ /
    Tip-Adapter harness took one random augmented view), else the eval view.  ``views`` are the
    per-epoch views ``fit`` trains on; ``val_*`` the few-shot validation split (min(K, 4) per
    class), present when the method declares ``uses_validation``.
    """

    train_features: torch.Tensor  # [N, D]
    train_labels: torch.Tensor  # [N]
    views: torch.Tensor | None = None  # [V, N, D]
    val_features: torch.Tensor | None = None  # [M, D]
    val_labels: torch.Tensor | None = None  # [M]
    optim: object | None = None  # the run's OptimConfig (methods that run their own loops read it)
    seed: int = 0
    precision: str = "fp32"  # the run's resolved precision, for loops run inside prepare()
    cache: object | None = None  # the run's FeatureCache: teacher text features are stored there
    # Frozen, unprompted eval-view features [N, D] of the training images (class prototypes): always for
    # token-space methods; for feature-space methods only when the run does not augment (then = views[0]).
    train_eval_features: torch.Tensor | None = None

    def encode_texts(self, backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
        """Normalised frozen text features [N, D] of fixed texts (teacher banks), from the run's cache."""
        from ..features import encode_texts

        return encode_texts(backbone, texts, cache=self.cache).to(backbone.device)

    def require_validation(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.val_features is None or self.val_labels is None or len(self.val_labels) == 0:
            raise ValueError(f"{method} selects its hyperparameters on the validation split, which is empty or "
                             "missing; the few-shot split keeps min(K, 4) validation images per class")
        return self.val_features, self.val_labels


@dataclass
class MethodConfig:
    """Base of every method's ``Config``: fields every method has."""

    text_dropout: bool = field(
        default=False,
        metadata={"help": "run the frozen text transformer in train mode (dropout active) while training; "
                          "the published BiomedCoOp/Biomed-DPT/BiomedAP code did, CoOp-family baselines did not"},
    )


class Method(nn.Module):
    """Base class: one subclass per method, one file each, registered in ``methods/__init__.py``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # "features": trains and predicts on cached image features. "tokens": runs ViT blocks itself
    # (visual prompts, fusion): trains on cached tokens entering block ``prefix_block`` and
    # predicts from pixels (or tokens); see :meth:`image_tokens`.
    input_kind: ClassVar[Literal["features", "tokens"]] = "features"
    # False for methods with nothing to optimise by gradient (zero-shot, closed-form probes).
    trainable: ClassVar[bool] = True
    # False for methods whose learned state is tied to the training classes (probes, caches).
    supports_unseen_classes: ClassVar[bool] = True
    # True for methods that select hyperparameters or iterations on the few-shot validation split.
    uses_validation: ClassVar[bool] = False

    @classmethod
    def extra_views(cls, config: MethodConfig) -> dict[str, AugmentSpec]:
        """Additional augmented views of each training image the method trains on, by name.

        The runner encodes ``data.views`` views of each (cached like the main views, drawn from
        seeds of their own) and puts view ``e mod V`` of each name into ``Batch.extra`` in epoch
        ``e``. Default: none.
        """
        return {}

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: MethodConfig | None = None):
        super().__init__()
        if not classnames:
            raise ValueError(f"{self.name}: the class list is empty")
        if len(set(classnames)) != len(classnames):
            raise ValueError(f"{self.name}: duplicate class names in {list(classnames)}")
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: config must be {self.Config.__name__}, got {type(config).__name__}")
        self.backbone = backbone  # plain attribute: Backbone is not an nn.Module, so it is not saved
        self.classnames = list(classnames)
        self.config = config

    # ------------------------------------------------------------------ inference
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale

    def image_features(self, batch: Batch) -> torch.Tensor:
        """Normalised frozen image features of the batch, from the cache or from pixels."""
        if batch.features is not None:
            return batch.features.to(self.backbone.device)
        if batch.pixels is None:
            raise ValueError(f"{self.name}: the batch has neither features nor pixels")
        with torch.no_grad():
            return self.backbone.encode_image(batch.pixels, normalize=True)

    # ------------------------------------------------------------------ token-space methods
    @property
    def prefix_block(self) -> int:
        """First ViT block whose input depends on learned parameters (``input_kind = "tokens"``).

        Blocks ``0 .. prefix_block-1`` run frozen (with :meth:`prefix_hook`, if any): their output
        is what the runner caches per training view.
        """
        return 0

    def prefix_hook(self) -> BlockHook | None:
        """A fixed, parameter-free per-block modification of the frozen prefix blocks (default none)."""
        return None

    def prefix_fingerprint(self) -> str:
        """Names what the frozen prefix computes, for the cache namespace: ``"plain"`` or the hook's name.

        Two methods with the same ``prefix_block`` and fingerprint share cached tokens.
        """
        return "plain"

    def image_tokens(self, batch: Batch) -> torch.Tensor:
        """Tokens entering :attr:`prefix_block` [B, T, width]: the cached ones, or computed from pixels."""
        if batch.tokens is not None:
            return batch.tokens.to(self.backbone.device)
        if batch.pixels is None:
            raise ValueError(f"{self.name}: the batch has neither tokens nor pixels")
        with torch.no_grad():
            return self.backbone.encode_image_prefix(batch.pixels, self.prefix_block, hook=self.prefix_hook())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Class logits [B, C]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def prepare(self, data: TrainingData) -> None:
        """Data-dependent set-up before gradient training (caches, prototypes, closed-form fits); default none.

        Methods that are not trained by ``fit`` (``trainable = False``) do all their learning here.
        """

    def needs_fit(self) -> bool:
        """Whether the runner should call ``fit`` after :meth:`prepare` (default: ``trainable``).

        A variant that does all its training in ``prepare`` (Tip-Adapter-F as released) says no.
        """
        return self.trainable

    def finalize(self, data: TrainingData) -> None:
        """Work after gradient training (e.g. a hyperparameter search on the validation split); default none."""

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses for one batch; ``"loss"`` is optimised, other entries are logged."""
        logits = self(batch)
        loss = F.cross_entropy(logits, batch.labels.to(logits.device))
        return {"loss": loss}

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer, grad_clip: float | None = None) -> dict[str, float]:
        """One optimisation step; methods that shape gradients (ProGrad) override this."""
        losses = self.training_step(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(self.trainable_parameters(), grad_clip)
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Re-target the method to other class names (base-to-novel, cross-dataset evaluation)."""
        raise ValueError(
            f"{self.name} learns state tied to its training classes and cannot predict other classes"
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        # The backbone stays frozen; only its text dropout follows the method's preset.
        self.backbone.set_text_dropout(mode and self.config.text_dropout)
        return self

    # ------------------------------------------------------------------ state
    def learned_state(self) -> dict[str, torch.Tensor]:
        """What a run saves: trainable parameters and persistent buffers (see module docstring)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`learned_state` saved.

        Tensors whose size depends on the training data (a cache with one row per training image)
        take the saved shape; every key must match exactly.
        """
        current = self.state_dict()
        expected, given = set(current), set(state)
        if expected != given:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise ValueError(f"{self.name}: saved state does not match this method "
                             f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})")
        device = self.backbone.device
        for key, value in state.items():
            if current[key].shape != value.shape:
                module_name, _, attr = key.rpartition(".")
                module = self.get_submodule(module_name)
                if attr in module._parameters:
                    old = module._parameters[attr]
                    module._parameters[attr] = nn.Parameter(torch.empty_like(value, device=device),
                                                            requires_grad=old.requires_grad)
                else:
                    module._buffers[attr] = torch.empty_like(value, device=device)
        self.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)

    def describe(self) -> dict:
        """A short description for run cards: counts of trainable and saved values."""
        return {
            "method": self.name,
            "num_classes": len(self.classnames),
            "trainable_parameters": sum(p.numel() for p in self.trainable_parameters()),
            "saved_values": sum(v.numel() for v in self.state_dict().values()),
        }


def class_text_features(backbone: Backbone, texts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """Normalised mean of normalised text features per class (prompt ensembling), [C, D].

    Computed in eval mode without gradients: these are fixed targets/classifiers.
    """
    flat = [text for texts in texts_per_class for text in texts]
    counts = [len(texts) for texts in texts_per_class]
    if any(c == 0 for c in counts):
        raise ValueError("every class needs at least one text")
    with torch.no_grad(), backbone.text_dropout(False):
        features = backbone.encode_text(flat, normalize=True)
    means = torch.stack([chunk.mean(0) for chunk in torch.split(features, counts)])
    return F.normalize(means, dim=-1)
