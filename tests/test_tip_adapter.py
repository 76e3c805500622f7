"""Tip-Adapter and Tip-Adapter-F: the cache formula, the (β, α) search, state round trips, key training."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from biomedap.config import OptimConfig, config_from_dict, resolve_run_config
from biomedap.methods import Batch, TipAdapterConfig, TipAdapterFConfig, TrainingData, build_method
from biomedap.methods.tip_adapter import search_cache_weights, search_grid
from biomedap.train import FeatureTrainData, fit

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _clusters(dim, n_per_class, num_classes=4, noise=0.35, seed=0, centre_seed=7):
    """Normalised features around one random centre per class; labels 0..C−1 repeated."""
    centre_gen = torch.Generator().manual_seed(centre_seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=centre_gen), dim=-1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(n_per_class)
    x = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g) / dim ** 0.5, dim=-1)
    return x, labels


def _data(backbone, n_train=4, n_val=2, views=2, optim=None, seed=0):
    dim = backbone.embed_dim
    train_x, train_y = _clusters(dim, n_train, seed=seed)
    val_x, val_y = _clusters(dim, n_val, seed=seed + 100)
    extra = [_clusters(dim, n_train, seed=seed + 1 + v)[0] for v in range(views - 1)]
    all_views = torch.stack([train_x, *extra])
    # Tip-Adapter-F's published optimiser, shortened (3 epochs, batch 8) and with a larger step.
    optim = optim or OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.01, adam_eps=1e-4, epochs=3,
                                 batch_size=8, schedule_step="iteration", warmup_epochs=0, drop_last="never")
    return TrainingData(train_x, train_y, views=all_views, val_features=val_x, val_labels=val_y,
                        optim=optim, seed=1)


# ------------------------------------------------------------------------------------------ Tip-Adapter


def test_logits_match_the_formula_with_literal_alpha_beta(tiny_backbone):
    method = build_method("tip_adapter", tiny_backbone, NAMES)
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(5, tiny_backbone.embed_dim, generator=g), dim=-1)
    values = F.one_hot(torch.tensor([0, 2, 1, 3, 2]), 4).float()
    method.load_learned_state({"keys": keys, "values": values, "alpha": torch.tensor(2.5),
                               "beta": torch.tensor(3.0)})
    f = F.normalize(torch.randn(6, tiny_backbone.embed_dim, generator=g), dim=-1)
    s = tiny_backbone.logit_scale
    expected = s * f @ method.text_features.t() + 2.5 * torch.exp(-3.0 * (1 - f @ keys.t())) @ values
    with torch.no_grad():
        torch.testing.assert_close(method(Batch(features=f)), expected, atol=1e-5, rtol=1e-5)
    # The cache term really contributes (a zero α gives the zero-shot logits).
    assert not torch.allclose(expected, s * f @ method.text_features.t(), atol=1e-3)


def test_grid_is_the_reference_list():
    grid = search_grid(50, 200)
    assert grid.shape == (200,)
    assert grid[0].item() == pytest.approx(0.1)
    assert grid[1].item() == pytest.approx(0.1 + 49.9 / 200)
    assert grid[-1].item() == pytest.approx(0.1 + 199 * 49.9 / 200)  # 49.7505: the end 50 is excluded


def test_search_picks_the_first_best_pair_in_beta_outer_order():
    """One val image, zero-shot wrong by 1.2; key 0 (affinity 1) votes for the true class, key 1 (affinity
    1 − ln 2) for the wrong one, so the cache margin is α·(1 − 2^−β): correct pairs are (β=1, α=3),
    (β=2, α=2) and (β=2, α=3).  β-outer order must pick (1, 3) (α-outer would give (2, 2), last-best
    (2, 3))."""
    clip = torch.tensor([[1.2, 0.0]])
    affinity = torch.tensor([[1.0, 1.0 - torch.log(torch.tensor(2.0)).item()]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1])
    betas, alphas = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    result = search_cache_weights(clip, affinity, values, labels, betas, alphas)
    assert (result.beta, result.alpha, result.correct) == (1.0, 3.0, 1)
    # Chunking over β (one β per chunk) keeps the order and the strict ">".
    chunked = search_cache_weights(clip, affinity, values, labels, betas, alphas, max_elements=1)
    assert (chunked.beta, chunked.alpha) == (1.0, 3.0)
    # A full tie (every pair equally good) picks the very first pair.
    tie = search_cache_weights(torch.tensor([[0.0, 5.0]]), affinity, values, labels, betas, alphas)
    assert (tie.beta, tie.alpha, tie.correct) == (1.0, 1.0, 1)


def test_prepare_search_equals_a_brute_force_loop_over_forward(tiny_backbone):
    cfg = TipAdapterConfig(search_scale=(8.0, 4.0), search_step=(12, 12))
    data = _data(tiny_backbone, n_train=3, n_val=3)
    method = build_method("tip_adapter", tiny_backbone, NAMES, cfg)
    method.prepare(data)
    torch.testing.assert_close(method.keys, data.train_features)
    assert torch.equal(method.values, F.one_hot(data.train_labels, 4).float())
    best = None
    with torch.no_grad():
        for beta in search_grid(8.0, 12):
            for alpha in search_grid(4.0, 12):
                method.beta.fill_(beta)
                method.alpha.fill_(alpha)
                correct = int((method(Batch(features=data.val_features)).argmax(1) == data.val_labels).sum())
                if best is None or correct > best[0]:
                    best = (correct, float(beta), float(alpha))
    assert method.search_result.correct == best[0]
    assert (method.search_result.beta, method.search_result.alpha) == (best[1], best[2])


def test_default_grid_search_is_fast(tiny_backbone):
    data = _data(tiny_backbone, n_train=16, n_val=4)  # 64 keys, 16 val images, 40,000 pairs
    method = build_method("tip_adapter", tiny_backbone, NAMES)
    start = time.perf_counter()
    method.prepare(data)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"the 200 × 200 search took {elapsed:.2f} s"
    assert 0.1 <= float(method.beta) <= 49.8 and 0.1 <= float(method.alpha) <= 49.8


def test_state_round_trip_and_refusals(tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    method = build_method("tip_adapter", tiny_backbone, NAMES)
    method.prepare(_data(tiny_backbone))
    save_file(method.learned_state(), tmp_path / "state.safetensors")
    state = load_file(tmp_path / "state.safetensors")
    assert set(state) == {"keys", "values", "alpha", "beta"}
    assert state["keys"].shape == (16, tiny_backbone.embed_dim) and state["alpha"].shape == ()
    fresh = build_method("tip_adapter", tiny_backbone, NAMES, seed=5)
    assert fresh.keys.shape[0] == 0  # an unprepared cache is empty: zero-shot
    fresh.load_learned_state(state)
    f = _clusters(tiny_backbone.embed_dim, 2, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(method(Batch(features=f)), fresh(Batch(features=f)))
    assert float(fresh.alpha) == float(method.alpha) and float(fresh.beta) == float(method.beta)
    with pytest.raises(ValueError, match="cannot"):
        fresh.set_classnames(["a", "b"])
    no_val = TrainingData(f, torch.arange(8) % 4)
    with pytest.raises(ValueError, match="validation"):
        build_method("tip_adapter", tiny_backbone, NAMES).prepare(no_val)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="search_step"):
        TipAdapterConfig(search_step=(0, 200))
    with pytest.raises(ValueError, match="search_scale"):
        TipAdapterConfig(search_scale=(0.05, 50.0))
    with pytest.raises(ValueError, match="init_alpha_scale"):
        TipAdapterFConfig(init_alpha_scale=0)
    run = resolve_run_config("tip_adapter")
    cfg = config_from_dict(TipAdapterConfig, run.method_config)
    assert cfg.search_scale == (50.0, 50.0) and cfg.search_step == (200, 200)
    assert (run.data.augment, run.data.split_seed, run.precision) == ("lp", 1, "fp32")
    run = resolve_run_config("tip_adapter_f")
    o = run.optim
    assert (o.optimizer, o.lr, o.adam_eps, o.weight_decay) == ("adamw", 0.001, 1e-4, 0.01)
    assert (o.epochs, o.batch_size, o.drop_last) == (20, 256, "never")
    assert (o.schedule_step, o.warmup_epochs) == ("iteration", 0)
    released = resolve_run_config("tip_adapter_f", overrides=["method.variant=released"])
    assert config_from_dict(TipAdapterFConfig, released.method_config).variant == "released"
    assert released.optim == run.optim


# ------------------------------------------------------------------------------------------ Tip-Adapter-F


def test_tip_f_initial_logits_equal_tip_adapter(tiny_backbone):
    data = _data(tiny_backbone)
    cfg = TipAdapterFConfig(init_beta=2.0, init_alpha=3.0)
    tip_f = build_method("tip_adapter_f", tiny_backbone, NAMES, cfg)
    tip_f.prepare(data)
    assert [n for n, _ in tip_f.named_parameters()] == ["keys"]
    assert tip_f.trainable_parameters() == [tip_f.keys] and tip_f.keys.shape == (16, tiny_backbone.embed_dim)
    assert tip_f.needs_fit()
    tip = build_method("tip_adapter", tiny_backbone, NAMES)
    tip.load_learned_state({"keys": data.train_features, "values": F.one_hot(data.train_labels, 4).float(),
                            "alpha": torch.tensor(3.0), "beta": torch.tensor(2.0)})
    f = _clusters(tiny_backbone.embed_dim, 3, seed=11)[0]
    with torch.no_grad():
        torch.testing.assert_close(tip_f(Batch(features=f)), tip(Batch(features=f)), atol=1e-6, rtol=1e-6)


def _train_loss(method, data):
    with torch.no_grad():
        return float(F.cross_entropy(method(Batch(features=data.train_features)), data.train_labels))


def test_tip_f_training_changes_keys_and_lowers_loss_then_searches(tiny_backbone):
    data = _data(tiny_backbone, views=3)
    method = build_method("tip_adapter_f", tiny_backbone, NAMES)
    method.prepare(data)
    keys0, loss0 = method.keys.detach().clone(), _train_loss(method, data)
    optim = OptimConfig(optimizer="adamw", lr=0.01, adam_eps=1e-4, weight_decay=0.01, epochs=15, batch_size=8,
                        schedule_step="iteration", warmup_epochs=0, drop_last="never")
    fit(method, FeatureTrainData(data.views, data.train_labels), optim, seed=1)
    assert not torch.equal(method.keys.detach(), keys0)
    assert _train_loss(method, data) < loss0 - 0.05
    trained = method.keys.detach().clone()
    method.finalize(data)  # the search changes (β, α), never the keys
    assert torch.equal(method.keys.detach(), trained)
    assert method.search_result is not None
    assert method.describe()["val_accuracy"] == method.search_result.accuracy


def test_tip_f_state_round_trip(tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    data = _data(tiny_backbone)
    method = build_method("tip_adapter_f", tiny_backbone, NAMES)
    method.prepare(data)
    fit(method, FeatureTrainData(data.views, data.train_labels), data.optim, seed=1)
    method.finalize(data)
    save_file(method.learned_state(), tmp_path / "state.safetensors")
    fresh = build_method("tip_adapter_f", tiny_backbone, NAMES, seed=3)
    assert fresh.keys.shape == (0, tiny_backbone.embed_dim)
    fresh.load_learned_state(load_file(tmp_path / "state.safetensors"))
    assert fresh.keys.requires_grad and fresh.keys.shape == (16, tiny_backbone.embed_dim)
    f = _clusters(tiny_backbone.embed_dim, 2, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(method(Batch(features=f)), fresh(Batch(features=f)))


@pytest.mark.parametrize("adversarial", [False, True])
def test_released_variant_picks_init_alpha_on_val(tiny_backbone, adversarial):
    """Released: one training run per α₀, the best on val (first on ties) is kept and not trained further.

    Checked against independent paper-variant runs at α = α₀.  With ``adversarial`` the training images sit
    on the class text features but carry the next class's label, and the val images are the text features:
    zero-shot is right, the cache votes for the wrong class, and α₀ = 0 must win.
    """
    data = _data(tiny_backbone)
    if adversarial:
        text = build_method("zeroshot", tiny_backbone, NAMES).text_features
        labels = data.train_labels
        views = F.normalize(text[labels] + 0.05 * data.views, dim=-1)
        data = TrainingData(views[0], (labels + 1) % 4, views=views, val_features=text,
                            val_labels=torch.arange(4), optim=data.optim, seed=data.seed)
    cfg = {"variant": "released", "init_alpha_scale": 4}
    method = build_method("tip_adapter_f", tiny_backbone, NAMES, cfg)
    method.prepare(data)
    assert not method.needs_fit()

    runs = []
    for alpha0 in range(4):
        ref_cfg = {"init_alpha": float(alpha0), "init_beta": 1.0}
        ref = build_method("tip_adapter_f", tiny_backbone, NAMES, ref_cfg)
        ref.prepare(data)
        fit(ref, FeatureTrainData(data.views, data.train_labels), data.optim, seed=data.seed)
        with torch.no_grad():
            correct = int((ref(Batch(features=data.val_features)).argmax(1) == data.val_labels).sum())
        runs.append((correct, ref.keys.detach().clone()))
    scores = [c for c, _ in runs]
    expected = scores.index(max(scores))
    assert len(set(scores)) > 1, f"the case does not discriminate between α₀ values: {scores}"
    assert method.selected_init_alpha == expected
    if adversarial:
        assert expected == 0
    assert torch.equal(method.keys.detach(), runs[expected][1])
    assert float(method.alpha) == expected and float(method.beta) == 1.0
    method.finalize(data)
    assert method.describe()["selected_init_alpha"] == expected
