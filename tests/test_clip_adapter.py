"""CLIP-Adapter: variant defaults, the residual formula by hand, re-targeting, released schedule, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.config import OptimConfig, config_from_dict, lr_at, resolve_run_config
from biomedap.methods import Batch, ClipAdapterConfig, build_method
from biomedap.train import FeatureTrainData, fit, steps_per_epoch

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _features(dim, n, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_variant_defaults_and_explicit_values():
    paper = ClipAdapterConfig()
    assert (paper.ratio, paper.renormalize, paper.reduction) == (0.2, True, 4)
    released = ClipAdapterConfig(variant="released")
    assert (released.ratio, released.renormalize) == (0.5, False)
    explicit = ClipAdapterConfig(variant="released", ratio=0.3, renormalize=True)
    assert (explicit.ratio, explicit.renormalize) == (0.3, True)
    # Resolved values survive a round trip through a config dict (run cards, reloads).
    again = config_from_dict(ClipAdapterConfig, {"variant": "released", "ratio": None, "renormalize": None})
    assert (again.ratio, again.renormalize) == (0.5, False)
    with pytest.raises(ValueError, match="ratio"):
        ClipAdapterConfig(ratio=1.5)
    with pytest.raises(ValueError, match="reduction"):
        ClipAdapterConfig(reduction=0)
    with pytest.raises(ValueError, match="variant"):
        ClipAdapterConfig(variant="other")


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_logits_match_the_formula(tiny_backbone, variant):
    method = build_method("clip_adapter", tiny_backbone, NAMES, {"variant": variant}, seed=3)
    dim = tiny_backbone.embed_dim
    assert method.adapter.fc[0].weight.shape == (dim // 4, dim) and method.adapter.fc[0].bias is None
    assert method.adapter.fc[2].weight.shape == (dim, dim // 4) and method.adapter.fc[2].bias is None
    w1, w2 = method.adapter.fc[0].weight.detach(), method.adapter.fc[2].weight.detach()
    f = _features(dim, 5, seed=1)
    ratio = {"paper": 0.2, "released": 0.5}[variant]
    adapted = ratio * torch.relu(torch.relu(f @ w1.t()) @ w2.t()) + (1 - ratio) * f
    if variant == "paper":
        adapted = adapted / adapted.norm(dim=-1, keepdim=True)
    expected = tiny_backbone.logit_scale * adapted @ method.text_features.t()
    with torch.no_grad():
        torch.testing.assert_close(method(Batch(features=f)), expected, atol=1e-5, rtol=1e-5)


def test_paper_variant_is_scale_invariant_like_the_raw_feature_original(tiny_backbone):
    """The adapter is positively homogeneous, so with re-normalisation it does not matter whether it sees the
    raw or the normalised image feature (the original used the raw one); without it, it does."""
    f = _features(tiny_backbone.embed_dim, 4, seed=2)
    paper = build_method("clip_adapter", tiny_backbone, NAMES, seed=1)
    released = build_method("clip_adapter", tiny_backbone, NAMES, {"variant": "released"}, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(paper(Batch(features=3.7 * f)), paper(Batch(features=f)),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(released(Batch(features=3.7 * f)), released(Batch(features=f)))


def test_retargets_to_new_class_names_keeping_the_adapter(tiny_backbone):
    method = build_method("clip_adapter", tiny_backbone, NAMES, seed=1)
    adapter = {k: v.clone() for k, v in method.adapter.state_dict().items()}
    novel = ["normal kidney", "kidney stone", "cyst kidney"]
    method.set_classnames(novel)
    zeroshot = build_method("zeroshot", tiny_backbone, novel)
    torch.testing.assert_close(method.text_features, zeroshot.text_features)
    assert all(torch.equal(adapter[k], v) for k, v in method.adapter.state_dict().items())
    assert method(Batch(features=_features(tiny_backbone.embed_dim, 2))).shape == (2, 3)
    assert set(method.learned_state()) == {"adapter.fc.0.weight", "adapter.fc.2.weight"}


def test_presets_paper_and_released_schedule():
    paper = resolve_run_config("clip_adapter")
    o = paper.optim
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.002, 0.9, 5e-4)
    assert (o.epochs, o.batch_size) == (20, 32)
    assert (o.schedule_step, o.warmup_epochs) == ("epoch", 1)
    assert (paper.data.augment, paper.data.split_seed, paper.precision) == ("lp", 1, "fp32")
    assert config_from_dict(ClipAdapterConfig, paper.method_config).ratio == 0.2

    released = resolve_run_config("clip_adapter", overrides=["method.variant=released"])
    cfg = config_from_dict(ClipAdapterConfig, released.method_config)
    assert (cfg.ratio, cfg.renormalize) == (0.5, False)
    o = released.optim
    assert (o.lr, o.momentum, o.weight_decay, o.epochs, o.batch_size) == (0.01, 0.0, 0.0, 20, 32)
    # 16 shots × 4 classes = 64 images: 2 iterations per epoch, 40 in all.  Iteration 0 at 1e-5, then
    # 0.005·(1 + cos(π(k − 1)/20)): zero at k = 21, back up to ≈ 0.01 at the end (period 20 iterations).
    steps, _ = steps_per_epoch(64, o)
    assert steps == 2
    lrs = [lr_at(o, k // steps, k % steps, steps) for k in range(40)]
    assert lrs[0] == 1e-5
    for k in range(1, 40):
        assert lrs[k] == pytest.approx(0.005 * (1 + math.cos(math.pi * (k - 1) / 20)), abs=1e-12)
    assert lrs[21] == pytest.approx(0.0, abs=1e-12) and lrs[39] > 0.009


def test_training_lowers_the_loss_and_moves_only_the_adapter(tiny_backbone):
    dim = tiny_backbone.embed_dim
    centres = _features(dim, 4, seed=7)
    labels = torch.arange(4).repeat(8)
    views = torch.stack([F.normalize(centres[labels] + 0.3 * _features(dim, 32, seed=10 + v), dim=-1)
                         for v in range(3)])
    method = build_method("clip_adapter", tiny_backbone, NAMES, {"variant": "released"}, seed=1)

    def loss():
        with torch.no_grad():
            return float(F.cross_entropy(method(Batch(features=views[0])), labels))

    before, weights = loss(), [p.detach().clone() for p in method.trainable_parameters()]
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.0, epochs=12, batch_size=16, warmup_epochs=0)
    fit(method, FeatureTrainData(views, labels), optim, seed=1)
    after = loss()
    assert after < 0.5 * before
    params = method.trainable_parameters()
    assert all(not torch.equal(w, p.detach()) for w, p in zip(weights, params, strict=True))
