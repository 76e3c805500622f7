"""LP++: a linear probe blended with the zero-shot classifier, class-wise (Huang et al., CVPR 2024).

Logits for a normalised image feature ``f`` (reference notes: baselines.md §3.10)::

    z_c = ⟨W_c, f⟩ + b_c + α_c · ⟨f, t_c⟩

with ``t_c`` the normalised text feature of ``template`` ("a photo of a {}."; computed once in
eval mode, rebuilt from the class names, never saved) and a raw cosine in the text term (no
logit scale).  Learned state: ``weight`` W [C, D], ``bias`` b [C], ``alpha`` α [C] (persistent
buffers; nothing is trained by ``fit``).

Set-up (:meth:`LPPlusPlus.prepare`, everything on one feature per training image):

* init — ``W_c = Σ_{i: y_i = c} f_i`` (class *sums*), ``b`` ~ U(±1/√D) (PyTorch's default Linear
  bias init, drawn from the method's seeded initialisation), ``α_c = α₀ = 250 · mean_c[mean_{i:
  y_i = c} ⟨f_i, t_c⟩]`` (250 × the class-averaged true-class cosine);
* full-batch cross-entropy over all N training features for ``iterations`` (300) iterations;
  W and b take an SGD step with momentum 0.9 (no weight decay) every iteration with step size
  ``η_W = 4N / λ_max(FᵀF)``; α takes a plain gradient step every ``alpha_every`` (10) iterations
  with ``η_α = N / (4 · max_c Σ_i ⟨f_i, t_c⟩²)`` (:func:`lp_plus_plus_step_sizes`, float64,
  exact eigenvalue);
* model selection — after every iteration the validation accuracy is computed and the state of
  the last iteration whose accuracy is ≥ the best so far is kept (later ties win).  The
  reference recorded the *test* accuracy at that iteration instead, which is the same selection
  without looking at the test set.

``variant`` — what the α step's gradient is:

* ``"paper"`` (default): the gradient of the loss with respect to α at the iteration of the step
  (the same forward pass that gives W's gradient), i.e. a plain block-coordinate gradient step.
  The step size ``η_α`` is derived for one gradient at the current point, which is why neither a
  sum nor a mean over the last 10 iterations is used.
* ``"released"``: the reference code never zeroes α's gradient buffer (its optimiser holds only
  W and b), so each α step uses the *cumulative sum* of every α-gradient since iteration 1,
  evaluated at the earlier iterates (the original LP++ code does the same; baselines.md §7.10).
  The published BiomedCLIP LP++ numbers come from this behaviour.

Deviations from the reference, none of which changes the algorithm: W's init is computed in fp32
(the reference summed in fp16); gradients are computed in closed form (``∂L/∂z = (softmax(z) −
onehot(y)) / N``), the same values autograd gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .base import Batch, Method, MethodConfig, TrainingData, class_text_features


@dataclass
class LPPlusPlusConfig(MethodConfig):
    template: str = field(
        default="a photo of a {}.",
        metadata={"help": "prompt whose text features t_c form the zero-shot term α_c·⟨f, t_c⟩ "
                          "('{}' = class)"},
    )
    iterations: int = field(
        default=300, metadata={"help": "full-batch iterations; the state of the best-val iteration is kept"}
    )
    alpha_every: int = field(
        default=10,
        metadata={"help": "α (the class-wise blending weights) takes a gradient step every N iterations"},
    )
    alpha_init_scale: float = field(
        default=250.0,
        metadata={"help": "α₀ = alpha_init_scale × the class-averaged mean cosine of images to their class "
                          "text"},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the W, b updates"})
    variant: Literal["paper", "released"] = field(
        default="paper",
        metadata={"help": "paper: each α step uses the current α-gradient | released: the published code's "
                          "never-zeroed α-gradient buffer (cumulative sum since iteration 1)"},
    )

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError(f"template: {self.template!r} must contain exactly one '{{}}' for the class "
                             "name")
        if self.iterations < 1:
            raise ValueError(f"iterations must be ≥ 1, got {self.iterations}")
        if self.alpha_every < 1:
            raise ValueError(f"alpha_every must be ≥ 1, got {self.alpha_every}")
        if not math.isfinite(self.alpha_init_scale):
            raise ValueError(f"alpha_init_scale must be finite, got {self.alpha_init_scale}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.variant not in ("paper", "released"):
            raise ValueError(f"variant must be paper or released, got {self.variant!r}")


def lp_plus_plus_step_sizes(features: torch.Tensor, text_features: torch.Tensor) -> tuple[float, float]:
    """``(η_W, η_α) = (4N / λ_max(FᵀF), N / (4 · max_c Σ_i ⟨f_i, t_c⟩²))``, computed in float64.

    ``features`` F [N, D] are the training features, ``text_features`` [C, D] the class text
    features.  λ_max is an exact eigenvalue; FᵀF [D, D] and FFᵀ [N, N] share their non-zero
    eigenvalues, so the smaller of the two Gram matrices is decomposed.
    """
    f = features.detach().to(torch.float64)
    t = text_features.detach().to(f.device, torch.float64)
    n = f.shape[0]
    gram = f.t() @ f if f.shape[1] <= n else f @ f.t()
    lambda_max = float(torch.linalg.eigvalsh(gram)[-1])
    text_energy = float(((f @ t.t()) ** 2).sum(0).max())
    if lambda_max <= 0 or text_energy <= 0:
        raise ValueError("lp_plus_plus: degenerate training features (zero Gram matrix or zero text cosines)")
    return 4.0 * n / lambda_max, n / (4.0 * text_energy)


def lp_plus_plus_init(
    features: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor, scale: float = 250.0
) -> tuple[torch.Tensor, float]:
    """``(W [C, D], α₀)``: class sums of the features and ``scale · mean_c mean_{i: y_i=c} ⟨f_i, t_c⟩``."""
    num_classes = text_features.shape[0]
    onehot = F.one_hot(labels.long(), num_classes).to(features.dtype)  # [N, C]
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"lp_plus_plus: no training features for class indices {missing}")
    weight = onehot.t() @ features
    true_cos = (features @ text_features.t()).gather(1, labels.long()[:, None]).squeeze(1)  # [N]
    per_class = (onehot.t() @ true_cos) / counts
    return weight, float(scale * per_class.mean())


@dataclass
class LPPlusPlusFit:
    """What :func:`train_lp_plus_plus` returns: the selected state and how it was found."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    best_iteration: int  # 1-based
    history: list[float]  # the score after each iteration
    eta_w: float
    eta_alpha: float


def train_lp_plus_plus(
    features: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
    *,
    iterations: int = 300,
    alpha_every: int = 10,
    momentum: float = 0.9,
    variant: str = "paper",
) -> LPPlusPlusFit:
    """LP++'s full-batch loop from the given initial state; ``score(W, b, α)`` selects the iteration.

    Every iteration: forward over all N features, closed-form gradients of the mean CE, an SGD
    momentum step on W and b, every ``alpha_every``-th iteration a gradient step on α (its
    gradient per ``variant``, see the module docstring); then ``score`` of the new state, kept if
    ≥ the best so far (later ties win).
    """
    if variant not in ("paper", "released"):
        raise ValueError(f"variant must be paper or released, got {variant!r}")
    features = features.float()
    n = features.shape[0]
    eta_w, eta_alpha = lp_plus_plus_step_sizes(features, text_features)
    text_logits = features @ text_features.float().t()  # [N, C], fixed
    onehot = F.one_hot(labels.long(), text_features.shape[0]).float()
    weight, bias, alpha = weight.float().clone(), bias.float().clone(), alpha.float().clone()
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    alpha_grad_sum = torch.zeros_like(alpha)
    best_score, best = -math.inf, None
    history: list[float] = []
    for iteration in range(1, iterations + 1):
        logits = features @ weight.t() + bias + alpha * text_logits
        dz = (logits.softmax(-1) - onehot) / n  # ∂ mean-CE / ∂ logits
        grad_w, grad_b, grad_alpha = dz.t() @ features, dz.sum(0), (dz * text_logits).sum(0)
        # torch.optim.SGD's momentum (dampening 0): v ← m·v + g, p ← p − η·v (v starts at g).
        velocity_w.mul_(momentum).add_(grad_w)
        velocity_b.mul_(momentum).add_(grad_b)
        weight.sub_(eta_w * velocity_w)
        bias.sub_(eta_w * velocity_b)
        alpha_grad_sum.add_(grad_alpha)
        if iteration % alpha_every == 0:
            alpha.sub_(eta_alpha * (alpha_grad_sum if variant == "released" else grad_alpha))
        current = float(score(weight, bias, alpha))
        history.append(current)
        if current >= best_score:
            best_score, best = current, (weight.clone(), bias.clone(), alpha.clone(), iteration)
    if best is None:  # only if every score was NaN
        raise RuntimeError("lp_plus_plus: the selection score was NaN at every iteration")
    return LPPlusPlusFit(best[0], best[1], best[2], best[3], history, eta_w, eta_alpha)


class LPPlusPlus(Method):
    name = "lp_plus_plus"
    summary = "LP++: linear probe + class-wise blended zero-shot text term, full-batch with closed-form steps"
    Config = LPPlusPlusConfig
    trainable = False  # its own full-batch loop runs in prepare()
    supports_unseen_classes = False
    uses_validation = True

    def __init__(self, backbone, classnames: Sequence[str], config: LPPlusPlusConfig | None = None):
        super().__init__(backbone, classnames, config)
        device = backbone.device
        num_classes, dim = len(self.classnames), backbone.embed_dim
        # PyTorch's default Linear bias init, drawn from the method's seeded RNG (build_method's seed).
        bound = 1.0 / math.sqrt(dim)
        init_bias = torch.empty(num_classes).uniform_(-bound, bound)
        self.register_buffer("init_bias", init_bias.to(device), persistent=False)
        # Learned in prepare() or loaded from a run: persistent.
        self.register_buffer("weight", torch.zeros(num_classes, dim, device=device))
        self.register_buffer("bias", init_bias.clone().to(device))
        self.register_buffer("alpha", torch.zeros(num_classes, device=device))
        texts = [[self.config.template.format(name)] for name in self.classnames]
        text_features = class_text_features(backbone, texts).to(device)
        self.register_buffer("text_features", text_features, persistent=False)
        self.fit_info: LPPlusPlusFit | None = None

    def prepare(self, data: TrainingData) -> None:
        val_features, val_labels = data.require_validation(self.name)
        cfg = self.config
        device = self.weight.device
        features = data.train_features.detach().to(device, torch.float32)
        labels = data.train_labels.detach().to(device)
        val_features = val_features.detach().to(device, torch.float32)
        val_labels = val_labels.detach().to(device)
        weight, alpha0 = lp_plus_plus_init(features, labels, self.text_features, cfg.alpha_init_scale)
        val_text = val_features @ self.text_features.t()

        def val_accuracy(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
            logits = val_features @ w.t() + b + a * val_text
            return float((logits.argmax(-1) == val_labels).float().mean())

        result = train_lp_plus_plus(
            features, labels, self.text_features, weight, self.init_bias, torch.full_like(self.alpha, alpha0),
            val_accuracy, iterations=cfg.iterations, alpha_every=cfg.alpha_every, momentum=cfg.momentum,
            variant=cfg.variant,
        )
        with torch.no_grad():
            self.weight.copy_(result.weight)
            self.bias.copy_(result.bias)
            self.alpha.copy_(result.alpha)
        self.fit_info = result

    def forward(self, batch: Batch) -> torch.Tensor:
        if not bool(self.weight.any()):  # class sums are never all zero: the state was never set
            raise RuntimeError(f"{self.name}: not fitted; run prepare() on training data or load a saved "
                               "state")
        features = self.image_features(batch).to(self.weight.dtype)
        return features @ self.weight.t() + self.bias + self.alpha * (features @ self.text_features.t())
