"""``fit`` and ``predict_logits``: batching, the Dassl schedule, optimiser, determinism, resume, views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.config import OptimConfig, lr_at
from biomedap.methods import Batch, CoOpConfig, build_method
from biomedap.train import FeatureTrainData, fit, make_optimizer, predict_logits, steps_per_epoch

CLASSNAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
C = len(CLASSNAMES)


def _features(backbone, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, backbone.embed_dim, generator=g), dim=-1)


def _data(backbone, n=12, views=1, seed=0):
    return FeatureTrainData(_features(backbone, views, n, seed=seed), torch.arange(n) % C)


def _coop(backbone, **config):
    return build_method("coop", backbone, CLASSNAMES, CoOpConfig(**config), seed=0)


def _optim(**kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("epochs", 3)
    return OptimConfig(**kwargs)


def _record(method):
    """Wrap ``method.train_step``: one dict per optimisation step with what the step saw."""
    steps = []
    original = method.train_step

    def train_step(batch, optimizer, grad_clip=None):
        steps.append({
            "lr": optimizer.param_groups[0]["lr"],
            "optimizer": optimizer,
            "features": batch.features.detach().clone(),
            "labels": batch.labels.clone(),
            "text_training": method.backbone.model.text.training,
            "method_training": method.training,
        })
        return original(batch, optimizer, grad_clip)

    method.train_step = train_step
    return steps


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "n, batch, policy, expected",
    [
        (64, 32, "auto", 2),
        (70, 32, "auto", 2),  # the partial batch of 6 is dropped: a full batch exists
        (20, 32, "auto", 1),  # no full batch: keep the partial one
        (70, 32, "never", 3),
        (64, 32, "never", 2),
        (70, 32, "always", 2),
        (20, 32, "always", 0),
    ],
)
def test_steps_per_epoch(n, batch, policy, expected):
    assert steps_per_epoch(n, OptimConfig(batch_size=batch, drop_last=policy)) == (expected, batch)


@pytest.mark.parametrize(
    "n, policy, sizes",
    [(20, "auto", [20]), (70, "auto", [32, 32]), (70, "never", [32, 32, 6]), (64, "auto", [32, 32])],
)
def test_fit_batch_sizes_follow_drop_last(tiny_backbone, n, policy, sizes):
    method = _coop(tiny_backbone)
    steps = _record(method)
    result = fit(method, _data(tiny_backbone, n=n), _optim(batch_size=32, epochs=1, warmup_epochs=0,
                                                          drop_last=policy))
    assert [len(s["labels"]) for s in steps] == sizes
    assert result.steps == len(sizes)
    # Within an epoch every sample appears at most once.
    seen = torch.cat([s["features"] for s in steps])
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]


def test_drop_last_always_with_too_few_samples_is_a_clear_error(tiny_backbone):
    method = _coop(tiny_backbone)
    with pytest.raises(ValueError, match=r"20 training samples cannot fill a batch of 32"):
        fit(method, _data(tiny_backbone, n=20), _optim(batch_size=32, epochs=2, drop_last="always"))


# --------------------------------------------------------------------------- schedule and optimiser


def test_epoch_schedule_is_dassl_and_is_what_the_optimizer_uses(tiny_backbone):
    optim = OptimConfig(lr=0.002, epochs=5, warmup_epochs=1, warmup_lr=1e-5, batch_size=4)
    method = _coop(tiny_backbone)
    steps = _record(method)
    result = fit(method, _data(tiny_backbone, n=12), optim)
    expected = [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(4)]
    assert expected[1] == 0.002
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3, 4]
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-12, abs=0)
    assert all(math.isfinite(row["loss"]) for row in result.history)
    # The optimizer really ran at that rate: 3 steps per epoch, constant within an epoch.
    assert result.steps == len(steps) == 15
    used = [s["lr"] for s in steps]
    assert used == pytest.approx([lr for lr in expected for _ in range(3)], rel=1e-12, abs=0)
    assert [lr_at(optim, e) for e in range(5)] == pytest.approx(expected, rel=1e-12, abs=0)


def test_iteration_schedule_changes_lr_within_an_epoch(tiny_backbone):
    optim = OptimConfig(lr=0.002, epochs=3, warmup_epochs=1, warmup_lr=1e-5, batch_size=4,
                        schedule_step="iteration")
    method = _coop(tiny_backbone)
    steps = _record(method)
    result = fit(method, _data(tiny_backbone, n=12), optim)
    used = [s["lr"] for s in steps]
    assert len(used) == 9  # 3 epochs x 3 steps
    expected = [lr_at(optim, e, s, 3) for e in range(3) for s in range(3)]
    assert used == pytest.approx(expected, rel=1e-12, abs=0)
    # The formula over the global iteration t, T = 9, warm-up = 3 iterations.
    by_hand = [1e-5 if t < 3 else 0.002 * 0.5 * (1 + math.cos(math.pi * (t - 3) / 9)) for t in range(9)]
    assert used == pytest.approx(by_hand, rel=1e-12, abs=0)
    assert len(set(used[3:6])) == 3 and len(set(used[6:9])) == 3, "lr must change within an epoch"
    assert result.history[-1]["lr"] == pytest.approx(used[-1], rel=1e-12)


def test_make_optimizer_sgd_defaults_are_dassl(tiny_backbone):
    params = _coop(tiny_backbone).trainable_parameters()
    optimizer = make_optimizer(OptimConfig(), params)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.002
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 5e-4
    assert group["dampening"] == 0 and group["nesterov"] is False
    assert group["params"] == params


def test_make_optimizer_adamw(tiny_backbone):
    params = _coop(tiny_backbone).trainable_parameters()
    optim = OptimConfig(optimizer="adamw", lr=1e-3, adam_betas=(0.8, 0.99), adam_eps=1e-4, weight_decay=0.01)
    optimizer = make_optimizer(optim, params)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.99)
    assert group["eps"] == 1e-4
    assert group["weight_decay"] == 0.01
    assert group["lr"] == 1e-3


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_fit_trains_with_the_configured_optimizer(tiny_backbone, name, cls):
    method = _coop(tiny_backbone)
    before = method.ctx.detach().clone()
    steps = _record(method)
    fit(method, _data(tiny_backbone), _optim(optimizer=name, epochs=2, adam_eps=1e-4))
    optimizer = steps[0]["optimizer"]
    assert type(optimizer) is cls
    assert all(s["optimizer"] is optimizer for s in steps), "one optimizer for the whole fit"
    group = optimizer.param_groups[0]
    if name == "sgd":
        assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)
    else:
        assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-4
    assert not torch.equal(method.ctx.detach(), before), "training did not change the context"


# --------------------------------------------------------------------------- determinism and resume


def test_same_seed_same_state_different_seed_different_state(tiny_backbone):
    data, optim = _data(tiny_backbone, n=12), _optim(epochs=3)
    states = []
    for seed in (3, 3, 4):
        method = _coop(tiny_backbone)
        fit(method, data, optim, seed=seed)
        states.append(method.learned_state())
    initial = _coop(tiny_backbone).learned_state()
    assert not _state_equal(states[0], initial)
    assert _state_equal(states[0], states[1])
    assert not _state_equal(states[0], states[2])


def test_same_seed_same_state_with_text_dropout(tiny_backbone):
    """Dropout in the frozen text tower draws random numbers: the run seed must still fix the result."""
    data, optim = _data(tiny_backbone, n=12), _optim(epochs=2)
    states = []
    for _ in range(2):
        method = _coop(tiny_backbone, text_dropout=True)
        torch.manual_seed(len(states))  # whatever the global RNG was before fit
        fit(method, data, optim, seed=3)
        states.append(method.learned_state())
    assert _state_equal(states[0], states[1])


def test_fit_leaves_the_global_rng_alone(tiny_backbone):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    fit(_coop(tiny_backbone, text_dropout=True), _data(tiny_backbone), _optim(epochs=2))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("every, resume_at, text_dropout", [(1, 3, False), (2, 2, False), (1, 3, True)])
def test_interrupted_fit_resumes_to_the_uninterrupted_state(
    tiny_backbone, tmp_path, every, resume_at, text_dropout
):
    data, optim = _data(tiny_backbone, n=12), _optim(epochs=6)

    def _coop(backbone):
        return build_method("coop", backbone, CLASSNAMES, CoOpConfig(text_dropout=text_dropout), seed=0)

    reference = _coop(tiny_backbone)
    full = fit(reference, data, optim, seed=2)

    checkpoint = tmp_path / "resume.pt"

    def stop_after_epoch_3(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    first = _coop(tiny_backbone)
    with pytest.raises(KeyboardInterrupt):
        fit(first, data, optim, seed=2, checkpoint_path=checkpoint, checkpoint_every=every,
            on_epoch_end=stop_after_epoch_3)
    assert checkpoint.is_file()
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert payload["next_epoch"] == resume_at
    assert set(payload["state"]) == set(first.learned_state())
    assert not list(tmp_path.glob(".*")), "temporary checkpoint files left behind"

    second = _coop(tiny_backbone)
    resumed = fit(second, data, optim, seed=2, checkpoint_path=checkpoint, checkpoint_every=every)
    assert resumed.resumed_from_epoch == resume_at
    assert [row["epoch"] for row in resumed.history] == list(range(resume_at, 6))
    assert resumed.steps == (6 - resume_at) * 3
    for got, want in zip(resumed.history, full.history[resume_at:]):
        assert got["lr"] == want["lr"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert _state_equal(second.learned_state(), reference.learned_state())
    assert torch.load(checkpoint, weights_only=True)["next_epoch"] == 6

    # A finished checkpoint: nothing left to train, the final state is restored.
    third = _coop(tiny_backbone)
    done = fit(third, data, optim, seed=2, checkpoint_path=checkpoint)
    assert done.resumed_from_epoch == 6 and done.steps == 0 and done.history == []
    assert _state_equal(third.learned_state(), reference.learned_state())


# --------------------------------------------------------------------------- views and failures


def test_epoch_e_uses_view_e_mod_v(tiny_backbone):
    n, v = 8, 3
    data = _data(tiny_backbone, n=n, views=v, seed=5)
    method = _coop(tiny_backbone)
    steps = _record(method)
    fit(method, data, _optim(epochs=5, batch_size=4))
    assert len(steps) == 5 * 2
    for epoch in range(5):
        rows = torch.cat([s["features"] for s in steps[2 * epoch:2 * epoch + 2]])
        labels = torch.cat([s["labels"] for s in steps[2 * epoch:2 * epoch + 2]])
        for row, label in zip(rows, labels):
            matches = [(w, i) for w in range(v) for i in range(n) if torch.equal(data.views[w, i], row)]
            assert len(matches) == 1
            (w, i), = matches
            assert w == epoch % v, f"epoch {epoch} used view {w}"
            assert data.labels[i] == label
        assert rows.shape[0] == n  # every sample once per epoch


def test_feature_train_data_accepts_one_view_and_checks_shapes(tiny_backbone):
    flat = FeatureTrainData(_features(tiny_backbone, 6), torch.arange(6) % C)
    assert flat.views.shape == (1, 6, tiny_backbone.embed_dim) and flat.num_samples == 6
    with pytest.raises(ValueError, match="labels"):
        FeatureTrainData(_features(tiny_backbone, 6), torch.arange(5))
    with pytest.raises(ValueError, match="empty"):
        FeatureTrainData(_features(tiny_backbone, 0), torch.arange(0))


@pytest.mark.parametrize("bad_view", [0, 2])
def test_non_finite_loss_names_the_epoch(tiny_backbone, bad_view):
    data = _data(tiny_backbone, n=8, views=3)
    data.views[bad_view] = float("nan")
    method = _coop(tiny_backbone, text_dropout=True)
    with pytest.raises(FloatingPointError, match=rf"at epoch {bad_view}\b"):
        fit(method, data, _optim(epochs=4))
    assert not method.training and not tiny_backbone.model.text.training


def test_fit_rejects_methods_without_trainable_parameters(tiny_backbone):
    method = build_method("zeroshot", tiny_backbone, CLASSNAMES)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(method, _data(tiny_backbone), _optim())


# --------------------------------------------------------------------------- text tower mode


@pytest.mark.parametrize("text_dropout", [True, False])
def test_text_tower_mode_follows_the_method_config(tiny_backbone, text_dropout):
    assert not tiny_backbone.model.text.training
    method = _coop(tiny_backbone, text_dropout=text_dropout)
    steps = _record(method)
    fit(method, _data(tiny_backbone), _optim(epochs=2))
    assert steps and all(s["text_training"] is text_dropout for s in steps)
    assert all(s["method_training"] for s in steps)
    assert tiny_backbone.model.text.training is False
    assert method.training is False
    # Also after an interrupted fit.
    method = _coop(tiny_backbone, text_dropout=text_dropout)

    def interrupt(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(method, _data(tiny_backbone), _optim(epochs=2), on_epoch_end=interrupt)
    assert tiny_backbone.model.text.training is False


# --------------------------------------------------------------------------- predict_logits


def test_predict_logits_matches_forward_chunks_and_handles_empty(tiny_backbone):
    method = _coop(tiny_backbone)
    fit(method, _data(tiny_backbone), _optim(epochs=1, warmup_epochs=0))
    features = _features(tiny_backbone, 10, seed=9)

    logits = predict_logits(method, features)
    assert logits.shape == (10, C)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
    assert not method.training
    with torch.no_grad():
        expected = method(Batch(features=features))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)

    for chunk in (1, 3, 10, 64):
        chunked = predict_logits(method, features, chunk_size=chunk)
        torch.testing.assert_close(chunked, logits, atol=1e-6, rtol=1e-6)

    empty = predict_logits(method, features[:0])
    assert empty.shape == (0, C)
    assert empty.device.type == "cpu"
