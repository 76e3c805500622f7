"""LP++: closed-form step sizes and init against hand computations, the loop against a literal
autograd reimplementation (paper and released α updates), the ≥ selection rule, the method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biomedap.methods import Batch, LPPlusPlusConfig, TrainingData, build_method
from biomedap.methods.lp_plus_plus import lp_plus_plus_init, lp_plus_plus_step_sizes, train_lp_plus_plus

# Three unit-norm features in 2-d and two unit-norm class texts (float64: 0.6 is then as exact as it gets).
F3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
T2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
Y3 = torch.tensor([0, 1, 1])


def test_step_sizes_by_hand():
    # FᵀF = [[1 + 0.36, 0.48], [0.48, 1 + 0.64]] = [[1.36, 0.48], [0.48, 1.64]]:
    # trace 3, det 1.36·1.64 − 0.48² = 2.2304 − 0.2304 = 2 → λ = (3 ± √(9 − 8)) / 2 ∈ {2, 1}, λ_max = 2.
    # η_W = 4N / λ_max = 4·3 / 2 = 6.
    # Cosines ⟨f_i, t_c⟩: class 0 → (1, 0, 0.6), Σ² = 1.36; class 1 → (0.6, 0.8, 1), Σ² = 0.36 + 0.64 + 1 = 2.
    # η_α = N / (4 · max_c Σ_i⟨f_i, t_c⟩²) = 3 / (4·2) = 0.375.
    eta_w, eta_alpha = lp_plus_plus_step_sizes(F3, T2)
    assert eta_w == pytest.approx(6.0, rel=1e-12)
    assert eta_alpha == pytest.approx(0.375, rel=1e-12)


def test_step_sizes_with_more_dimensions_than_samples():
    # N = 2 < D = 3: FFᵀ = [[1, 0.6], [0.6, 1]] has λ_max = 1.6 (the same as FᵀF's) → η_W = 4·2 / 1.6 = 5.
    # Cosines with t = (0, 0, 1) are 0 for class 1 and (1, 0.6) for class 0 → max Σ² = 1.36 → η_α = 2 / 5.44.
    features = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], dtype=torch.float64)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    eta_w, eta_alpha = lp_plus_plus_step_sizes(features, texts)
    assert eta_w == pytest.approx(5.0, rel=1e-12)
    assert eta_alpha == pytest.approx(2 / 5.44, rel=1e-12)


def test_init_by_hand():
    # W_0 = f_0 = (1, 0); W_1 = f_1 + f_2 = (0.6, 1.8).
    # True-class cosines: class 0 → ⟨f_0, t_0⟩ = 1; class 1 → ⟨f_1, t_1⟩ = 0.8, ⟨f_2, t_1⟩ = 1 → mean 0.9.
    # α₀ = 250 · (1 + 0.9) / 2 = 237.5 (the mean over all images would give 250 · 2.8/3 ≈ 233.3).
    weight, alpha0 = lp_plus_plus_init(F3, Y3, T2)
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.0], [0.6, 1.8]], dtype=torch.float64))
    assert alpha0 == pytest.approx(237.5, rel=1e-12)
    with pytest.raises(ValueError, match="no training features"):
        lp_plus_plus_init(F3, torch.tensor([0, 0, 0]), T2)


def _tiny_problem(seed=0, n_per_class=4, classes=3, dim=6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    means = torch.randn(classes, dim, generator=g)
    features = F.normalize(means[labels] + 0.8 * torch.randn(len(labels), dim, generator=g), dim=-1)
    # Texts close to one another, as CLIP's are: the text term then neither dominates nor saturates.
    texts = F.normalize(torch.randn(dim, generator=g) + 0.05 * means, dim=-1)
    bias = torch.empty(classes).uniform_(-0.3, 0.3, generator=g)
    return features, labels, texts, bias


def _reference_loop(features, labels, texts, bias, iterations, zero_alpha_grad):
    """The published loop, literally: nn.Linear + torch.optim.SGD on W and b, α a leaf tensor whose
    gradient only ``zero_alpha_grad`` clears (the released code never does)."""
    eta_w, eta_alpha = lp_plus_plus_step_sizes(features, texts)
    weight, alpha0 = lp_plus_plus_init(features, labels, texts)
    linear = nn.Linear(features.shape[1], texts.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    alpha = torch.full((texts.shape[0],), alpha0, requires_grad=True)
    optimizer = torch.optim.SGD(linear.parameters(), lr=eta_w, momentum=0.9)
    text_logits = features @ texts.t()
    for iteration in range(1, iterations + 1):
        if zero_alpha_grad:
            alpha.grad = None
        loss = F.cross_entropy(linear(features) + alpha * text_logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % 10 == 0:
            with torch.no_grad():
                alpha -= eta_alpha * alpha.grad
    return linear.weight.detach(), linear.bias.detach(), alpha.detach()


def _ours(features, labels, texts, bias, iterations, variant, score=lambda w, b, a: 0.0):
    weight, alpha0 = lp_plus_plus_init(features, labels, texts)
    alpha = torch.full((texts.shape[0],), alpha0)
    return train_lp_plus_plus(features, labels, texts, weight, bias, alpha, score, iterations=iterations,
                              variant=variant)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_loop_matches_a_literal_autograd_reimplementation(variant):
    features, labels, texts, bias = _tiny_problem()
    # A constant score: every iteration ties, so the last one is kept (later ties win).
    fit = _ours(features, labels, texts, bias, 40, variant)
    assert fit.best_iteration == 40
    ref = _reference_loop(features, labels, texts, bias, 40, zero_alpha_grad=variant == "paper")
    for ours, theirs in zip((fit.weight, fit.bias, fit.alpha), ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_released_alpha_step_uses_the_cumulative_gradient():
    features, labels, texts, bias = _tiny_problem()
    paper9, released9 = (_ours(features, labels, texts, bias, 9, v) for v in ("paper", "released"))
    for name in ("weight", "bias", "alpha"):
        assert torch.equal(getattr(paper9, name), getattr(released9, name))  # no α step yet: identical
    paper, released = (_ours(features, labels, texts, bias, 10, v) for v in ("paper", "released"))
    assert torch.equal(paper.weight, released.weight)  # W, b steps do not depend on α's rule before α moves
    # The α-gradient at iterations 1..10, by autograd at the state each iteration starts from (α = α₀).
    weight0, alpha0 = lp_plus_plus_init(features, labels, texts)
    alpha = torch.full((3,), alpha0)
    grads = []
    for k in range(10):
        start = _ours(features, labels, texts, bias, k, "paper") if k else None
        w_k, b_k = (weight0, bias) if start is None else (start.weight, start.bias)
        a = alpha.clone().requires_grad_(True)
        F.cross_entropy(features @ w_k.t() + b_k + a * (features @ texts.t()), labels).backward()
        grads.append(a.grad)
    eta_alpha = paper.eta_alpha
    # paper: that iteration's gradient; released: the sum over iterations 1..10.
    torch.testing.assert_close(paper.alpha, alpha - eta_alpha * grads[-1], rtol=1e-6, atol=1e-6)
    cumulative = torch.stack(grads).sum(0)
    torch.testing.assert_close(released.alpha, alpha - eta_alpha * cumulative, rtol=1e-6, atol=1e-6)
    assert (paper.alpha - alpha).abs().max() > 1e-5  # α really moved, and differently
    assert (paper.alpha - released.alpha).abs().max() > 1e-3


def test_selection_keeps_the_last_iteration_with_the_best_score():
    features, labels, texts, bias = _tiny_problem()
    scripted = iter([0.5, 0.7, 0.7, 0.6, 0.7, 0.6, 0.25])
    fit = _ours(features, labels, texts, bias, 7, "paper", score=lambda w, b, a: next(scripted))
    assert fit.history == [0.5, 0.7, 0.7, 0.6, 0.7, 0.6, 0.25]
    assert fit.best_iteration == 5  # ≥: the last of the tied 0.7s, not the first (2)
    at_5 = _ours(features, labels, texts, bias, 5, "paper")  # constant score keeps iteration 5
    assert torch.equal(fit.weight, at_5.weight) and torch.equal(fit.bias, at_5.bias)
    assert torch.equal(fit.alpha, at_5.alpha)


def _training_data(backbone, seed=0, shots=4, val=2):
    g = torch.Generator().manual_seed(seed)
    classes, dim = 3, backbone.embed_dim
    means = torch.randn(classes, dim, generator=g)

    def sample(k):
        y = torch.arange(classes).repeat_interleave(k)
        return F.normalize(means[y] + torch.randn(len(y), dim, generator=g), dim=-1), y

    (x, y), (xv, yv) = sample(shots), sample(val)
    return TrainingData(x, y, val_features=xv, val_labels=yv)


NAMES = ["glioma tumor", "meningioma tumor", "normal brain"]


def test_method_init_alpha_and_selection(tiny_backbone):
    data = _training_data(tiny_backbone)
    # No α step within the run (alpha_every > iterations): α stays α₀, computed here by hand.
    method = build_method("lp_plus_plus", tiny_backbone, NAMES, LPPlusPlusConfig(iterations=5, alpha_every=6))
    method.prepare(data)
    t = method.text_features
    per_class = [float((data.train_features[data.train_labels == c] @ t[c]).mean()) for c in range(3)]
    assert torch.allclose(method.alpha, torch.full((3,), 250 * sum(per_class) / 3))
    assert t.shape == (3, tiny_backbone.embed_dim) and "text_features" not in method.state_dict()

    method = build_method("lp_plus_plus", tiny_backbone, NAMES, seed=3)
    method.prepare(data)
    history, best = method.fit_info.history, method.fit_info.best_iteration
    assert len(history) == 300
    assert best == max(i for i, acc in enumerate(history, 1) if acc == max(history))
    logits = method(Batch(features=data.val_features))
    accuracy = float((logits.argmax(-1) == data.val_labels).float().mean())
    assert accuracy == max(history)
    # The bias init is the seeded default Linear init: U(±1/√D), different per seed.
    other = build_method("lp_plus_plus", tiny_backbone, NAMES, seed=4)
    bound = 1 / math.sqrt(tiny_backbone.embed_dim)
    assert not torch.equal(other.init_bias, method.init_bias) and float(other.init_bias.abs().max()) <= bound
    assert not method.needs_fit()
    with pytest.raises(RuntimeError, match="not fitted"):
        other(Batch(features=data.val_features))
    with pytest.raises(ValueError, match="validation"):
        other.prepare(TrainingData(data.train_features, data.train_labels))


def test_logits_formula(tiny_backbone):
    data = _training_data(tiny_backbone)
    method = build_method("lp_plus_plus", tiny_backbone, NAMES, LPPlusPlusConfig(iterations=3))
    method.prepare(data)
    f = data.val_features
    expected = f @ method.weight.t() + method.bias + method.alpha * (f @ method.text_features.t())
    torch.testing.assert_close(method(Batch(features=f)), expected)
    assert set(method.state_dict()) == {"weight", "bias", "alpha"}


@pytest.mark.parametrize("option, value", [("template", "no slot"), ("iterations", 0), ("alpha_every", 0),
                                           ("momentum", 1.0), ("variant", "other")])
def test_config_errors_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        LPPlusPlusConfig(**{option: value})
