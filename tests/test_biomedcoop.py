"""BiomedCoOp: the prompt selection and both losses against hand computations, the degenerate-statistics
guard, one teacher encoding per backbone and one image pass per batch, reload without the teacher, presets."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, BiomedCoOpConfig, TrainingData, build_method
from biomedap.methods.biomedcoop import kdsp_loss, select_prompts

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _features(backbone, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)


def _batch(backbone, n=8, seed=0):
    return Batch(labels=torch.arange(n) % len(NAMES), features=_features(backbone, n, seed))


def _method(backbone, **config):
    method = build_method("biomedcoop", backbone, NAMES, {"text_dropout": False, **config})
    method.eval()
    return method


# ------------------------------------------------------------------------------------ the selection rule


def test_selection_on_literal_scores():
    # S = [1, 2, 3, 4, 10]: median 3, MAD = median[2, 1, 0, 1, 7] = 1, z = [-2, -1, 0, 1, 7], mean z = 1,
    # std z = sqrt((9 + 4 + 1 + 0 + 36) / 4) = sqrt(12.5) = 3.536 -> |z-score| = [0.85, 0.57, 0.28, 0, 1.70].
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    assert select_prompts(scores, 1.5).tolist() == [True, True, True, True, False]
    assert select_prompts(scores, 1.75).all()
    assert select_prompts(scores, 0.5).tolist() == [False, False, True, True, False]
    # The median/MAD normalisation is affine with positive slope: it cancels (any scale, any shift).
    assert torch.equal(select_prompts(85.0 * scores - 3.0, 1.5), select_prompts(scores, 1.5))


def test_degenerate_statistics_never_give_nan_or_an_empty_selection():
    # MAD = 0 (four of five scores equal the median): the published code divides by 0. The rule here skips
    # the MAD division: z = S - 1 = [0, 0, 0, 0, 4], mean 0.8, std sqrt((4·0.64 + 10.24) / 4) = 1.789
    # -> |z-score| = [0.447 ×4, 1.789]: the odd prompt is dropped at τ = 1.5, as a plain z-score drops it.
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    assert float((scores - scores.median()).abs().median()) == 0.0
    assert select_prompts(scores, 1.5).tolist() == [True, True, True, True, False]
    assert select_prompts(scores, 1.8).all()
    # std = 0 (all scores equal), a single prompt, an empty selection (τ < 1: [0, 1] gives |z| = 0.707 each),
    # and non-finite scores: every prompt is kept.
    assert select_prompts(torch.full((6,), 2.5), 1.5).all()
    assert select_prompts(torch.tensor([3.0]), 1.5).tolist() == [True]
    assert select_prompts(torch.tensor([0.0, 1.0]), 0.5).tolist() == [True, True]
    assert select_prompts(torch.tensor([0.0, 1.0, float("nan")]), 1.5).all()


# ------------------------------------------------------------------------------------ losses by hand


def _hand_terms(method, teacher, f, labels, sccm_weight, kdsp_weight, tau):
    """Every quantity of one step written out with loops and explicit softmax (independent of the code)."""
    s = float(method.logit_scale)
    C, P, _ = teacher.shape
    B = f.shape[0]
    g = teacher / teacher.norm(dim=-1, keepdim=True)
    scores = torch.tensor([sum(max(s * float(f[b] @ g[c, i]) for c in range(C)) for b in range(B)) / B
                           for i in range(P)])
    # MAD normalisation cancels (see test_selection_on_literal_scores): the plain z-score decides.
    mean, std = scores.mean(), scores.std()
    keep = [abs(float((scores[i] - mean) / std)) <= tau for i in range(P)]
    kept = [i for i in range(P) if keep[i]]
    h_sel = torch.stack([sum(g[c, i] for i in kept) / len(kept) for c in range(C)])
    h_sel = h_sel / h_sel.norm(dim=-1, keepdim=True)
    h_all = g.mean(1) / g.mean(1).norm(dim=-1, keepdim=True)
    t = method.text_features()
    z = s * f @ t.t()
    ce = -torch.log(torch.softmax(z, -1)[torch.arange(B), labels]).mean()
    sccm = sccm_weight * ((t - h_all) ** 2).sum() / (C * t.shape[1])
    p_s, p_t = torch.softmax(z, -1), torch.softmax(s * f @ h_sel.t(), -1)
    kdsp = kdsp_weight * (p_t * (p_t.log() - p_s.log())).sum() / (B * C)
    return dict(scores=scores, keep=keep, h_sel=h_sel, h_all=h_all, ce=ce, sccm=sccm, kdsp=kdsp)


def test_scores_selection_centroids_and_losses_match_a_hand_computation(tiny_backbone):
    sccm_weight, kdsp_weight, tau = 0.75, 2.0, 1.5
    method = _method(tiny_backbone, sccm_weight=sccm_weight, kdsp_weight=kdsp_weight, tau=tau, ctx_init=None)
    batch = _batch(tiny_backbone, n=6, seed=1)
    f = batch.features
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(len(NAMES), 8, tiny_backbone.embed_dim, generator=g)
    teacher[:, 7] = f.mean(0) * 5.0  # prompt 7 scores far above the others: an outlier to drop
    method.set_teacher(teacher)
    with torch.no_grad():
        hand = _hand_terms(method, teacher, f, batch.labels, sccm_weight, kdsp_weight, tau)
        out = method.teacher_outputs(f)
        losses = method.training_step(batch)
    assert hand["keep"][7] is False and sum(hand["keep"]) == 7  # the selection is not trivially "all"
    torch.testing.assert_close(out["scores"], hand["scores"], atol=1e-4, rtol=1e-5)
    assert out["keep"].tolist() == hand["keep"]
    torch.testing.assert_close(out["h_sel"], hand["h_sel"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(method.teacher_centroid, hand["h_all"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(hand["h_sel"], hand["h_all"], atol=1e-3)  # dropping prompt 7 matters
    assert float(hand["sccm"]) > 1e-3 and float(hand["kdsp"]) > 1e-3  # not 0 == 0
    for key in ("ce", "sccm", "kdsp"):
        torch.testing.assert_close(losses[key], hand[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["loss"], hand["ce"] + hand["sccm"] + hand["kdsp"], atol=1e-5, rtol=1e-5)
    assert float(losses["kept"]) == 7.0


def test_kdsp_is_zero_when_student_equals_teacher(tiny_backbone):
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert float(kdsp_loss(z, z.clone())) == 0.0
    # Different logits: KL(teacher ‖ student) summed over the 6 logits / 6.
    other = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    p_t = torch.softmax(other, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(z, -1))).sum() / 6
    assert float(expected) > 0.1
    torch.testing.assert_close(kdsp_loss(z, other), expected)
    # In the method: a teacher whose every description is the student's own text feature gives teacher
    # logits = student logits (and h_all = t), so both regularisers vanish and loss = CE.
    method = _method(tiny_backbone, sccm_weight=5.0, kdsp_weight=20.0)
    with torch.no_grad():
        text = method.text_features()
    method.set_teacher(text[:, None, :].expand(-1, 5, -1))
    with torch.no_grad():
        losses = method.training_step(_batch(tiny_backbone))
    assert float(losses["kdsp"]) <= 1e-6 and float(losses["sccm"]) <= 1e-6
    torch.testing.assert_close(losses["loss"], losses["ce"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ encoding and reload


def _count(backbone, attr, calls):
    original = getattr(backbone, attr)
    setattr(backbone, attr, lambda *a, **k: calls.append(attr) or original(*a, **k))
    return original


def test_teacher_text_is_encoded_once_per_backbone_and_images_once_per_batch(tiny_backbone, feature_cache):
    data = TrainingData(_features(tiny_backbone, 8), torch.arange(8) % 4, cache=feature_cache)
    calls: list[str] = []
    first, second = _method(tiny_backbone, n_prompts=10), _method(tiny_backbone, n_prompts=10)
    originals = {attr: _count(tiny_backbone, attr, calls) for attr in ("encode_text", "encode_image")}
    try:
        first.prepare(data)
        assert calls.count("encode_text") >= 1
        calls.clear()
        second.prepare(data)  # same sentences, same backbone, same cache: nothing encoded
        assert calls == []
        # A training step encodes no teacher text, and pixels go through the frozen ViT once (student and
        # teacher logits share the features; the reference ran a second, identical ViT).
        size = tiny_backbone.preprocess.size
        pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            second.training_step(Batch(labels=torch.arange(4), pixels=pixels))
        assert calls == ["encode_image"]
    finally:
        for attr in originals:  # drop the instance attributes: the class methods show through again
            delattr(tiny_backbone, attr)
    assert first.teacher_features.shape == (4, 10, tiny_backbone.embed_dim)
    torch.testing.assert_close(first.teacher_features, second.teacher_features, atol=0, rtol=0)
    assert sum(v["entries"] for v in feature_cache.stats().values()) == 40  # 4 classes × 10 sentences


def test_training_needs_prepare_but_prediction_does_not(tiny_backbone):
    method = _method(tiny_backbone)
    with pytest.raises(RuntimeError, match="prepare"):
        method.training_step(_batch(tiny_backbone))
    assert method(_batch(tiny_backbone)).shape == (8, 4)
    method.set_teacher(torch.randn(4, 3, tiny_backbone.embed_dim))
    assert not any("teacher" in key for key in method.learned_state())
    method.set_classnames(["normal kidney", "kidney stone", "cyst kidney"])  # the teacher is for the old classes
    assert method.teacher_features is None and method.teacher_centroid is None
    with pytest.raises(ValueError, match="teacher features"):
        method.set_teacher(torch.randn(4, 3, tiny_backbone.embed_dim))


def test_cli_run_logs_the_terms_and_reloads_without_the_teacher(synthetic_root, tmp_path, capsys, tiny_backbone):
    from safetensors.torch import load_file

    from biomedap.cli import main
    from biomedap.features import FeatureCache, encode_samples
    from biomedap.runs import load_run

    code = main(["train", "--method", "biomedcoop", "--dataset", str(synthetic_root / "SYNTH"), "--backbone", "tiny",
                 "--shots", "2", "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--set", "optim.epochs=2", "data.views=1", "method.n_prompts=5"])
    out = capsys.readouterr().out
    assert code == 0
    run_dir = Path(re.search(r"^run directory: (.+)$", out, flags=re.MULTILINE).group(1).strip())
    log = (run_dir / "log.txt").read_text()
    epochs = [line for line in log.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 2 and all(all(f" {k} " in line for k in ("ce", "sccm", "kdsp", "kept")) for line in epochs)
    kept = [float(re.search(r" kept (\S+)", line).group(1)) for line in epochs]
    assert all(1 <= k <= 5 for k in kept)
    card = json.loads((run_dir / "card.json").read_text())
    assert card["method_config"]["text_dropout"] is True and card["method_config"]["tau"] == 1.5

    method, _ = load_run(run_dir, backbone=tiny_backbone)  # no prepare(): no teacher, still predicts
    assert method.teacher_features is None
    from biomedap.data import load_dataset

    test = load_dataset(synthetic_root / "SYNTH").split("test")
    features = encode_samples(tiny_backbone, test, cache=FeatureCache(tmp_path / "cache"))
    with torch.no_grad():
        logits = method(Batch(features=features))
    torch.testing.assert_close(logits, load_file(str(run_dir / "test_logits.safetensors"))["logits"],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ config and presets


def test_config_validation_and_short_banks(tiny_backbone):
    for bad, option in [({"tau": 0.0}, "tau"), ({"n_prompts": 0}, "n_prompts"), ({"sccm_weight": -1.0}, "sccm_weight"),
                        ({"kdsp_weight": math.nan}, "kdsp_weight"), ({"descriptions": " "}, "descriptions")]:
        with pytest.raises(ValueError, match=option):
            BiomedCoOpConfig(**bad)
    assert BiomedCoOpConfig().text_dropout is True  # as published
    method = _method(tiny_backbone, n_prompts=60)  # the built-in BTMRI bank has 53-54 per class
    with pytest.raises(ValueError, match="n_prompts"):
        method.prepare(TrainingData(_features(tiny_backbone), torch.arange(8) % 4))


FEW_SHOT = {"BTMRI": (0.5, 0.25, 1.5), "BUSI": (0.75, 0.75, 1.5), "CHMNIST": (0.25, 0.25, 1.5),
            "COVID_19": (0.5, 2.0, 1.5), "CTKidney": (1.0, 0.5, 1.5), "DermaMNIST": (5.0, 20.0, 1.5),
            "KneeXray": (5.0, 20.0, 1.75), "Kvasir": (0.75, 0.75, 1.5), "LungColon": (0.5, 0.5, 1.5),
            "OCTMNIST": (1.0, 0.75, 1.5), "RETINA": (0.25, 0.25, 1.5)}
BASE2NOVEL = {"BTMRI": (0.5, 0.5, 1.25), "CHMNIST": (10.0, 1.0, 1.5), "COVID_19": (20.0, 1.0, 1.25),
              "CTKidney": (10.0, 0.25, 1.25), "DermaMNIST": (2.0, 0.5, 1.5), "KneeXray": (0.25, 3.0, 1.25),
              "Kvasir": (1.0, 1.0, 1.25), "LungColon": (0.25, 0.75, 1.25), "OCTMNIST": (0.75, 0.5, 1.5),
              "RETINA": (5.0, 1.0, 2.0), "BUSI": (1.0, 1.0, 1.5)}  # BUSI: no published B2N -> defaults


def _weights(run):
    mc = run.method_config
    return mc["sccm_weight"], mc["kdsp_weight"], mc["tau"]


def test_preset_tables_resolve_per_dataset_and_for_base2novel():
    from biomedap.config import load_preset, resolve_run_config

    for dataset, expected in FEW_SHOT.items():
        mc = load_preset("biomedcoop", dataset)["method_config"]
        assert (mc["sccm_weight"], mc["kdsp_weight"], mc["tau"]) == expected, dataset
    run = resolve_run_config("biomedcoop", dataset="kvasir")
    assert _weights(run) == (0.75, 0.75, 1.5)
    assert (run.optim.lr, run.optim.epochs, run.optim.batch_size, run.optim.warmup_lr) == (0.0025, 100, 4, 1e-5)
    assert run.method_config["text_dropout"] is True and run.method_config["n_prompts"] == 50
    assert run.precision == "fp32" and run.data.augment == "dassl"
    for dataset, expected in BASE2NOVEL.items():
        run = resolve_run_config("biomedcoop", dataset=dataset.lower(), overrides=["data.subsample=base"])
        assert _weights(run) == expected and run.optim.epochs == 50, dataset
    run = resolve_run_config("biomedcoop", dataset="kvasir", overrides=["data.subsample=base"])
    assert (run.optim.lr, run.optim.batch_size) == (0.0025, 4)
    assert _weights(resolve_run_config("biomedcoop")) == (1.0, 1.0, 1.5)  # datasets outside the tables
    # --set still wins over both tables.
    run = resolve_run_config("biomedcoop", dataset="kvasir", overrides=["data.subsample=base", "method.tau=1.0"])
    assert run.method_config["tau"] == 1.0
