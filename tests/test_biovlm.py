"""BioVLM: low-entropy selection, the attribute teacher in label order, every loss term by hand, the views."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, BioVLMConfig, TrainingData, build_method
from biomedap.methods._prompting import insert_context
from biomedap.methods.biovlm import (
    STRONG_VIEW,
    WEAK_VIEW,
    BioVLM,
    attribute_texts,
    kl_sum,
    marginal_entropy,
    num_selected,
    select_low_entropy,
)
from biomedap.prompts import MissingBankError, attribute_sentences, load_attributes
from biomedap.train import FeatureTrainData, fit

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
SMALL = {"n_prompts_bank": 4, "n_attributes": 4}  # K = A = 4 keeps the hand computations short


def _features(backbone, n, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)


def _batch(backbone, n=6, seed=0, views=False):
    extra = {"weak": _features(backbone, n, seed + 100), "strong": _features(backbone, n, seed + 200)} if views else None
    return Batch(labels=torch.arange(n) % len(NAMES), features=_features(backbone, n, seed), extra=extra)


def _prepared(backbone, config=None, seed=0, names=NAMES):
    method = build_method("biovlm", backbone, names, {**SMALL, **(config or {})}, seed=seed)
    method.prepare(TrainingData(_features(backbone, 4, 9), torch.arange(4)))
    return method


# ------------------------------------------------------------------------------------ formulas on hand tensors


def _entropy(row):
    p = [math.exp(v) for v in row]
    total = sum(p)
    return -sum(q / total * math.log(q / total) for q in p)


def test_selection_keeps_the_lowest_entropy_half_of_hand_made_logits():
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [10.0, 0.0, 0.0]],  # lowest entropy: rows 3, 1
        [[0.0, 8.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0], [2.0, 2.0, 2.0]],  # rows 0, 2
    ], requires_grad=True)
    # The hand ranking agrees with the entropies written out.
    assert sorted(range(4), key=lambda j: _entropy(logits[0, j].tolist()))[:2] == [3, 1]
    assert sorted(range(4), key=lambda j: _entropy(logits[1, j].tolist()))[:2] == [0, 2]
    mean, kept = select_low_entropy(logits, 0.5)
    assert torch.equal(mean.detach(), torch.tensor([[7.5, 0.0, 0.0], [0.0, 4.0, 1.5]]))
    assert torch.equal(kept.detach(), torch.stack([logits[0, [3, 1]], logits[1, [0, 2]]]).detach())
    # Gradient reaches exactly the kept rows, each with weight 1/k.
    mean.sum().backward()
    expected = torch.zeros(2, 4, 3)
    expected[0, [3, 1]] = 0.5
    expected[1, [0, 2]] = 0.5
    assert torch.equal(logits.grad, expected)
    # Other ratios: round half up, at least one, at most all.
    assert [num_selected(10, r) for r in (0.5, 0.25, 0.01, 1.0)] == [5, 3, 1, 10]
    assert [num_selected(20, 0.5), num_selected(3, 0.5)] == [10, 2]
    top1, _ = select_low_entropy(logits.detach(), 0.1)
    assert torch.equal(top1, torch.stack([logits[0, 3], logits[1, 0]]).detach())


def test_marginal_entropy_and_kl_on_hand_tensors():
    kept = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    p1 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    p2 = [1 / (1 + math.e), math.e / (1 + math.e)]
    m = [(a + b) / 2 for a, b in zip(p1, p2)]
    assert marginal_entropy(kept).item() == pytest.approx(-sum(q * math.log(q) for q in m), abs=1e-6)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    pt = [[math.e / (1 + math.e), 1 / (1 + math.e)], [0.5, 0.5]]
    ps = [[1 / (1 + math.e), math.e / (1 + math.e)], [1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)]]
    hand = sum(pt[b][c] * (math.log(pt[b][c]) - math.log(ps[b][c])) for b in range(2) for c in range(2))
    assert kl_sum(teacher, student).item() == pytest.approx(hand, abs=1e-6)


# ------------------------------------------------------------------------------------ the method by hand


def _hand(method, backbone, batch, names=NAMES):
    """Every loss term re-computed from the definitions, prompt by prompt and image by image."""
    cfg = method.config
    s = float(backbone.logit_scale)
    with torch.no_grad():
        text = torch.stack([
            F.normalize(backbone.encode_text_embeddings(
                insert_context(method.token_embeds, method.ctx[j], method.ctx_positions), method.attention_mask), dim=-1)
            for j in range(cfg.n_prompts_bank)])  # [K, C, D]
        frame_table = load_attributes("btmri")
        sentences = [attribute_sentences(frame_table, name)[:cfg.n_attributes] for name in names]
        teacher = torch.stack([
            F.normalize(backbone.encode_text([sentences[c][j] for c in range(len(names))]), dim=-1)
            for j in range(cfg.n_attributes)])  # [A, C, D]

    def pick(rows):  # rows: list of [C] tensors; lowest-entropy half (ties to the lower index), mean
        k = num_selected(len(rows), cfg.selection_ratio)
        order = sorted(range(len(rows)), key=lambda j: (_entropy(rows[j].tolist()), j))[:k]
        return torch.stack([rows[j] for j in order]), order

    f = batch.features
    student, h_prompt = [], []
    for b in range(len(f)):
        kept, _ = pick([s * text[j] @ f[b] for j in range(cfg.n_prompts_bank)])
        student.append(kept.mean(0))
        mean_p = kept.softmax(-1).mean(0)
        h_prompt.append(-(mean_p * mean_p.log()).sum())
    student = torch.stack(student)
    zt = torch.stack([pick([s * teacher[j] @ f[b] for j in range(cfg.n_attributes)])[0].mean(0) for b in range(len(f))])
    n = len(f) * cfg.n_prompts_bank * len(names)

    def kl(t, z):
        pt, ps = t.softmax(-1), z.softmax(-1)
        return (pt * (pt.log() - ps.log())).sum()

    out = {"ce": F.cross_entropy(student, batch.labels), "kl": kl(zt, student) / n,
           "h_prompt": torch.stack(h_prompt).mean(),
           "cos": 1 - torch.stack([F.cosine_similarity(text[j], teacher[j], dim=-1) for j in range(4)]).mean()}
    if batch.extra:
        zta = []
        for b in range(len(f)):
            rows = ([s * teacher[j] @ batch.extra["strong"][b] for j in range(cfg.n_attributes)]
                    + [s * teacher[j] @ batch.extra["weak"][b] for j in range(cfg.n_attributes)])
            zta.append(pick(rows)[0].mean(0))
        out["kl_aug"] = kl(torch.stack(zta), student) / n
    return out, student, teacher


def test_every_loss_term_matches_a_hand_computation(tiny_backbone):
    weights = {"kl_weight": 1.3, "kl_aug_weight": 0.7, "cos_weight": 0.5, "entropy_weight": 0.4}
    method = _prepared(tiny_backbone, weights, seed=3)
    batch = _batch(tiny_backbone, seed=1, views=True)
    hand, student, teacher = _hand(method, tiny_backbone, batch)
    with torch.no_grad():
        losses = method.training_step(batch)
        logits = method(batch)
    torch.testing.assert_close(method.attribute_features, teacher, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, student, atol=1e-5, rtol=1e-5)  # inference = the same selection
    for key in ("ce", "kl", "kl_aug", "h_prompt", "cos"):
        assert float(hand[key]) > 1e-4, key  # no term passes as 0 == 0
        torch.testing.assert_close(losses[key], hand[key], atol=1e-6, rtol=1e-4, msg=key)
    total = (hand["ce"] + 1.3 * hand["kl"] + 0.7 * hand["kl_aug"] + 0.5 * hand["cos"] + 0.4 * hand["h_prompt"])
    torch.testing.assert_close(losses["loss"], total, atol=1e-5, rtol=1e-5)


def test_kl_is_divided_by_batch_times_bank_times_classes(tiny_backbone):
    method = _prepared(tiny_backbone, seed=2)
    batch = _batch(tiny_backbone, n=5, seed=4)
    with torch.no_grad():
        losses = method.training_step(batch)
        student = method(batch)
        teacher, _ = select_low_entropy(method.teacher_logits(batch.features), 0.5)
    # N = B·K·C = 5·4·4, not the B of a batch-mean KL nor the B·C of BiomedCoOp's.
    assert float(losses["kl"]) == pytest.approx(float(kl_sum(teacher, student)) / (5 * 4 * 4), rel=1e-5)


def test_entropy_term_carries_gradient_to_the_context(tiny_backbone):
    method = _prepared(tiny_backbone, seed=5)
    batch = _batch(tiny_backbone, seed=2)
    losses = method.training_step(batch)
    (grad,) = torch.autograd.grad(losses["h_prompt"], method.ctx, retain_graph=True)
    assert grad.abs().sum() > 0  # the release's entropy terms were detached constants
    # Its weight enters the objective's gradient: λ_H = 0.5 vs 0 differ by exactly 0.5 · ∇H.
    (with_h,) = torch.autograd.grad(losses["loss"], method.ctx)
    other = _prepared(tiny_backbone, {"entropy_weight": 0.0}, seed=5)
    (without_h,) = torch.autograd.grad(other.training_step(batch)["loss"], other.ctx)
    torch.testing.assert_close(with_h - without_h, 0.5 * grad, atol=1e-3 * float(grad.abs().max()), rtol=1e-3)
    # The attribute-bank entropies depend on frozen features only: logged, without a graph.
    assert not losses["h_desc"].requires_grad and float(losses["h_desc"]) > 0


# ------------------------------------------------------------------------------------ the attribute teacher


def test_attribute_features_follow_label_order_not_file_order(tiny_backbone, tmp_path):
    frame, table = load_attributes("btmri")
    shuffled = {name: table[name] for name in [NAMES[2], NAMES[0], NAMES[3], NAMES[1]]}
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"frame": {"prefix": frame.prefix, "suffix": frame.suffix}, "attributes": shuffled}))
    builtin = _prepared(tiny_backbone).attribute_features
    from_file = _prepared(tiny_backbone, {"attributes": str(path)}).attribute_features
    named = _prepared(tiny_backbone, {"attributes": "builtin:btmri"}).attribute_features
    torch.testing.assert_close(from_file, builtin, atol=0, rtol=0)
    torch.testing.assert_close(named, builtin, atol=0, rtol=0)
    # Column c is class c (label order): attribute j of NAMES[c].
    with torch.no_grad():
        expected = F.normalize(tiny_backbone.encode_text([attribute_sentences((frame, table), NAMES[1])[2]]), dim=-1)
    torch.testing.assert_close(builtin[2, 1], expected[0], atol=1e-6, rtol=1e-5)
    # A base-to-novel half finds its dataset's list too; class order is the given one.
    half = attribute_texts("builtin", [NAMES[3], NAMES[0]], 10)
    assert half[0][0].startswith(f"{frame.prefix} {NAMES[3]}, which ") and len(half[1]) == 10


def test_attribute_errors_name_the_problem(tiny_backbone, tmp_path):
    with pytest.raises(MissingBankError, match="no built-in attribute list"):
        attribute_texts("builtin", ["class one", "class two"], 10)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"frame": {"prefix": "an MRI of", "suffix": ""},
                                   "attributes": {NAMES[0]: ["shows a rim"] * 10}}))
    with pytest.raises(MissingBankError, match="meningioma tumor"):
        attribute_texts(partial, NAMES[:2], 10)
    with pytest.raises(ValueError, match="n_attributes"):
        attribute_texts(partial, NAMES[:1], 11)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        attribute_texts(tmp_path / "nowhere.json", NAMES, 10)


def test_teacher_is_never_saved_and_a_reloaded_bank_predicts_without_it(tiny_backbone):
    method = _prepared(tiny_backbone, seed=1)
    assert set(method.learned_state()) == {"ctx"} and method.ctx.shape == (4, 4, tiny_backbone.text.width)
    other = build_method("biovlm", tiny_backbone, NAMES, SMALL, seed=8)
    other.load_learned_state(method.learned_state())
    batch = _batch(tiny_backbone, seed=3)
    with torch.no_grad():
        assert torch.equal(other(batch), method(batch))
    assert other.attribute_features is None
    method.set_classnames(["normal kidney", "kidney stone"])
    assert method.attribute_features is None and method(batch).shape == (6, 2)


# ------------------------------------------------------------------------------------ strong / weak views


def test_strong_and_weak_views_change_the_loss_only_through_their_term(tiny_backbone):
    method = _prepared(tiny_backbone, seed=4)
    plain, viewed = _batch(tiny_backbone, seed=6), _batch(tiny_backbone, seed=6, views=True)
    with torch.no_grad():
        without, with_views = method.training_step(plain), method.training_step(viewed)
    assert float(without["kl_aug"]) == 0.0  # no views in the batch: the term is skipped
    assert float(with_views["kl_aug"]) > 1e-4
    assert float(with_views["loss"]) == pytest.approx(float(without["loss"]) + float(with_views["kl_aug"]), rel=1e-6)
    for key in ("ce", "kl", "cos", "h_prompt"):
        assert torch.equal(with_views[key], without[key])
    # Different views, different consistency target.
    other = Batch(labels=viewed.labels, features=viewed.features,
                  extra={"weak": viewed.extra["strong"], "strong": _features(tiny_backbone, 6, 77)})
    with torch.no_grad():
        assert float(method.training_step(other)["kl_aug"]) != pytest.approx(float(with_views["kl_aug"]))
    # Switched off: views ignored, none requested from the runner.
    off = _prepared(tiny_backbone, {"consistency": False}, seed=4)
    with torch.no_grad():
        assert float(off.training_step(viewed)["kl_aug"]) == 0.0
    assert BioVLM.extra_views(off.config) == {}


def test_extra_views_are_the_published_augmentations():
    views = BioVLM.extra_views(BioVLMConfig())
    assert views == {"weak": WEAK_VIEW, "strong": STRONG_VIEW}
    assert WEAK_VIEW.hflip and WEAK_VIEW.color_jitter is None and WEAK_VIEW.blur_kernel == 0
    assert STRONG_VIEW.hflip and STRONG_VIEW.color_jitter == (0.4, 0.4, 0.4, 0.1)
    assert (STRONG_VIEW.color_jitter_p, STRONG_VIEW.blur_kernel, STRONG_VIEW.blur_p) == (0.8, 3, 0.5)
    assert len({WEAK_VIEW.fingerprint(), STRONG_VIEW.fingerprint()}) == 2


def test_fit_passes_the_extra_views_to_the_consistency_term(tiny_backbone):
    from biomedap.config import OptimConfig

    method = _prepared(tiny_backbone, seed=0)
    x = _features(tiny_backbone, 8, 1)
    y = torch.arange(8) % 4
    extra = {"weak": torch.stack([_features(tiny_backbone, 8, 2)]), "strong": torch.stack([_features(tiny_backbone, 8, 3)])}
    optim = OptimConfig(epochs=1, batch_size=8, lr=0.01, warmup_epochs=0)
    result = fit(method, FeatureTrainData(x, y, extra=extra), optim, seed=0, progress=False)
    assert result.history[-1]["kl_aug"] > 0


# ------------------------------------------------------------------------------------ options and preset


def test_context_initialisation(tiny_backbone):
    random_bank = build_method("biovlm", tiny_backbone, NAMES, seed=0)
    assert random_bank.ctx.shape == (10, 4, tiny_backbone.text.width)
    assert 0.01 < float(random_bank.ctx.detach().std()) < 0.03
    phrase = build_method("biovlm", tiny_backbone, NAMES, {"ctx_init": "a photo of a", "init_std": 0.001}, seed=0)
    with torch.no_grad():
        words = tiny_backbone.embed_tokens(torch.tensor(tiny_backbone.text.pieces("a photo of a")))
    assert (phrase.ctx - words).abs().max() < 0.01  # every prompt starts at the phrase ...
    assert not torch.equal(phrase.ctx[0], phrase.ctx[1])  # ... and the prompts differ


@pytest.mark.parametrize("kwargs,option", [
    ({"n_prompts_bank": 0}, "n_prompts_bank"), ({"n_ctx": 0}, "n_ctx"), ({"n_attributes": 0}, "n_attributes"),
    ({"selection_ratio": 0.0}, "selection_ratio"), ({"selection_ratio": 1.5}, "selection_ratio"),
    ({"kl_weight": -1.0}, "kl_weight"), ({"entropy_weight": float("nan")}, "entropy_weight"),
    ({"init_std": 0.0}, "init_std"), ({"attributes": " "}, "attributes"),
])
def test_config_validation(kwargs, option):
    with pytest.raises(ValueError, match=option):
        BioVLMConfig(**kwargs)


def test_preset_is_the_published_config():
    from biomedap.config import resolve_run_config

    run = resolve_run_config("biovlm")
    assert (run.optim.optimizer, run.optim.lr, run.optim.batch_size, run.optim.epochs) == ("sgd", 0.002, 32, 50)
    assert (run.optim.schedule, run.optim.warmup_epochs, run.optim.warmup_lr) == ("cosine", 1, 1e-5)
    assert run.data.augment == "dassl" and run.precision == "fp32"
    config = run.method_config
    assert (config["n_prompts_bank"], config["n_ctx"], config["ctx_init"], config["selection_ratio"]) == (10, 4, None, 0.5)
    assert (config["kl_weight"], config["kl_aug_weight"], config["cos_weight"], config["entropy_weight"]) == (1, 1, 0.5, 0.5)
    assert config["text_dropout"] is False
    assert resolve_run_config("biovlm", overrides=["data.subsample=base"]).optim.epochs == 50
