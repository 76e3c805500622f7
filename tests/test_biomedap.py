"""BiomedAP: fusion at identity, image-dependent fused prompts, anchors, confidence weights, ablations,
equivalence with Biomed-DPT, the released variant against a hand-written re-statement, presets, CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, BiomedAPConfig, TrainingData, build_method
from biomedap.methods.biomedap import confidence_weights, default_fusion_layers, low_anchor

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
LAYERS = [2, 4]  # the tiny ViT has 6 blocks
# Small and deterministic: 4 descriptions per class, BERT dropout off (eval-mode text), the tiny model's layers.
FAST = {"n_prompts": 4, "text_dropout": False, "fusion_layers": LAYERS, "n_ctx": 5}
ALL_OFF = {"fusion": False, "lambda_low": 0.0, "confidence": "none", "lambda_align": 0.0}


def _pixels(backbone, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.preprocess.size
    return torch.randn(n, 3, size, size, generator=g)


def _batch(backbone, n=4, seed=0):
    return Batch(labels=torch.arange(n) % len(NAMES), pixels=_pixels(backbone, n, seed))


def _shots(backbone, seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)
    labels = torch.arange(n) % len(NAMES)
    return TrainingData(features, labels, train_eval_features=features)


def _build(backbone, config=None, seed=0, name="biomedap", prepare=True):
    base = FAST if name == "biomedap" else {}
    method = build_method(name, backbone, NAMES, {**base, **(config or {})}, seed=seed)
    if prepare:
        method.prepare(_shots(backbone))
    method.eval()  # dropout off everywhere: losses are deterministic
    return method


def _perturb(method, seed=1, scale=0.05):
    """Move every trainable tensor away from its initialisation (zero prompts, identity fusion)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return method


def _copy(src, dst):
    """Copy the learned tensors ``dst`` shares with ``src`` (same names)."""
    shared = {k: v for k, v in src.state_dict().items() if k in dst.state_dict()}
    dst.load_state_dict(shared, strict=False)
    return shared


def _losses(method, batch):
    with torch.no_grad():
        return {k: float(v) for k, v in method.training_step(batch).items()}


# ------------------------------------------------------------------------------------ fusion


def test_default_fusion_layers_and_prefix(tiny_backbone):
    assert default_fusion_layers(12) == (5, 8)  # BiomedCLIP's ViT-B/16: the published blocks
    assert default_fusion_layers(6) == (2, 4)
    method = build_method("biomedap", tiny_backbone, NAMES, {"n_prompts": 4})
    assert method.fusion_layers == (2, 4) and method.blocks == (2, 3, 4, 5) and method.prefix_block == 2
    assert method.prefix_fingerprint() == "plain" and method.prefix_hook() is None
    full = build_method("biomedap", tiny_backbone, NAMES, {**FAST, "prompt_start": 0})
    assert full.prefix_block == 0 and full.blocks == tuple(range(6))
    released = build_method("biomedap", tiny_backbone, NAMES, {**FAST, "variant": "released"})
    assert released.prefix_block == 2 and released.blocks == tuple(range(6))  # overwrite everywhere, cache to 2
    assert released.prefix_fingerprint() == "overwrite4"
    off = build_method("biomedap", tiny_backbone, NAMES, {**FAST, "variant": "released", "fusion": False})
    assert off.prefix_block == 6  # nothing learned in the image path: fully cached, like Biomed-DPT released


def test_gates_at_init_leave_the_streams_within_one_percent_and_every_parameter_learns(tiny_backbone):
    method = _build(tiny_backbone, {"lambda_align": 0.0})  # the text branch must learn through the prediction
    batch = _batch(tiny_backbone)
    with torch.no_grad():
        fused = method._run(batch)
    assert sorted(fused.records) == LAYERS
    for layer, (v, v_out, t_out) in fused.records.items():
        assert v.shape[1] == 1 + 4  # [CLS ; 4 prompt tokens]
        rel_v = float((v_out - v).norm() / v.norm())
        stream = fused.stream.detach()
        rel_t = float((t_out - stream).norm() / stream.norm())
        assert 0 < rel_v < 1e-2 and 0 < rel_t < 1e-2, (layer, rel_v, rel_t)
    method.train()
    method.training_step(batch)["loss"].backward()
    dead = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert dead == []
    # The gate bias is what keeps the start near the identity: open gates move the streams far more.
    opened = _build(tiny_backbone, {"fusion_gate_bias": 2.0})
    with torch.no_grad():
        v, v_out, _ = opened._run(batch).records[LAYERS[0]]
    assert float((v_out - v).norm() / v.norm()) > 1e-2


def test_fused_prompts_depend_on_the_image_and_released_ones_do_not(tiny_backbone):
    pixels = _pixels(tiny_backbone, n=2, seed=3)
    assert not torch.equal(pixels[0], pixels[1])
    for gate_bias in (-6.0, 0.0):  # at initialisation and with open gates
        method = _build(tiny_backbone, {"fusion_gate_bias": gate_bias})
        with torch.no_grad():
            fused = method.fused_visual_prompts(Batch(pixels=pixels))
        for layer, prompts in fused.items():
            assert prompts.shape == (2, 4, tiny_backbone.vision.width)
            assert float((prompts[0] - prompts[1]).abs().max()) > 1e-6, (gate_bias, layer)
    # Released: the fusion is fed the zero overwrite and the context, never the image.
    released = _perturb(_build(tiny_backbone, {"variant": "released"}))
    with torch.no_grad():
        fused = released.fused_visual_prompts(Batch(pixels=pixels))
        for layer, prompts in fused.items():
            assert prompts.shape == (2, 4, tiny_backbone.vision.width) and prompts.abs().max() > 1e-3
            torch.testing.assert_close(prompts[0], prompts[1], atol=1e-6, rtol=0)
        # Cached prefix (with the overwrite in blocks 0-1) and pixels agree.
        tokens = tiny_backbone.encode_image_prefix(pixels, released.prefix_block, hook=released.prefix_hook())
        torch.testing.assert_close(released(Batch(tokens=tokens)), released(Batch(pixels=pixels)), atol=1e-5, rtol=1e-5)


def test_fused_prompts_are_written_back_and_reach_the_output(tiny_backbone):
    method = _perturb(_build(tiny_backbone, {"fusion_gate_bias": 0.0}))
    batch = _batch(tiny_backbone)
    with torch.no_grad():
        with_fusion = method(batch)
        modules = method.fusion_modules
        method.fusion_modules = None  # the same prompts and text, no fusion
        without = method(batch)
        method.fusion_modules = modules
    assert float((with_fusion - without).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------ anchors and weights


def test_low_anchor_formula_on_hand_made_tensors():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    images = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])  # class 2 has no shots
    t = F.normalize(text, dim=-1)
    f = F.normalize(images, dim=-1)
    p0, p1 = (f[0] + f[1]) / 2, (f[2] + f[3]) / 2
    mu_img, mu_txt = (p0 + p1) / 2, t.mean(0)
    beta = 0.3
    expected = torch.stack([(1 - beta) * t[0] + beta * (p0 - mu_img + mu_txt),
                            (1 - beta) * t[1] + beta * (p1 - mu_img + mu_txt), t[2]])
    torch.testing.assert_close(low_anchor(text, images, labels, beta), F.normalize(expected, dim=-1))
    torch.testing.assert_close(low_anchor(text, images, labels, 0.0), t)  # β = 0: text only
    with pytest.raises(ValueError, match="frozen features"):
        low_anchor(text, beta=0.5)


def test_low_anchor_moves_with_the_shots_and_high_anchor_is_the_bank_centroid(tiny_backbone):
    from biomedap.prompts import resolve_descriptions

    method = build_method("biomedap", tiny_backbone, NAMES, FAST)
    a, b = _shots(tiny_backbone, seed=0), _shots(tiny_backbone, seed=1)
    method.prepare(a)
    low_a = method.low_anchor.clone()
    core = tiny_backbone.encode_text(NAMES, normalize=True)  # quality/minimal = the bare class name
    torch.testing.assert_close(low_a, low_anchor(core, a.train_eval_features, a.train_labels, 0.5), atol=1e-6, rtol=0)
    method.prepare(b)
    assert float((method.low_anchor - low_a).abs().max()) > 1e-3
    bank = resolve_descriptions("builtin", NAMES, limit=4)
    expected = torch.stack([F.normalize(tiny_backbone.encode_text(bank[n], normalize=True).mean(0), dim=0)
                            for n in NAMES])
    torch.testing.assert_close(method.high_anchor, expected, atol=1e-6, rtol=0)
    # β = 0: the text-only anchor, whatever the shots.
    text_only = build_method("biomedap", tiny_backbone, NAMES, {**FAST, "beta": 0.0})
    text_only.prepare(a)
    first = text_only.low_anchor.clone()
    text_only.prepare(b)
    torch.testing.assert_close(text_only.low_anchor, first)
    torch.testing.assert_close(first, core, atol=1e-6, rtol=0)
    # Anchors are teacher state: never saved, dropped for new classes.
    assert not any("anchor" in k for k in method.learned_state())
    method.set_classnames(["normal kidney", "kidney stone"])
    assert method.high_anchor is None and method.low_anchor is None


def test_confidence_weights_on_literal_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0], [1.0, 0.0, 0.0, 0.0]],
                          requires_grad=True)
    p = torch.softmax(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0)
    w2 = 1 - float(-(p * p.log()).sum()) / math.log(4)
    w = confidence_weights(logits, "anchor")
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, w2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(confidence_weights(logits, "task"), 1 - w)
    torch.testing.assert_close(confidence_weights(logits, "none"), torch.ones(3))
    with pytest.raises(ValueError, match="confidence"):
        confidence_weights(logits, "off")


# ------------------------------------------------------------------------------------ loss and ablations


def test_loss_matches_a_hand_computation(tiny_backbone):
    method = _perturb(_build(tiny_backbone, {"lambda_high": 3.0, "lambda_kl": 2.0, "lambda_low": 1.5,
                                             "lambda_align": 0.7, "fusion_gate_bias": 0.0}))
    batch = _batch(tiny_backbone)
    with torch.no_grad():
        losses = method.training_step(batch)
        fused = method._run(batch)
        f, t = fused.features, method.prompt_learner()
        s = tiny_backbone.logit_scale
        z, zt = s * f @ t.t(), s * f @ method.high_anchor.t()
        log_p, log_q = z.log_softmax(-1), zt.log_softmax(-1)
        w = 1 + (log_p.exp() * log_p).sum(-1) / math.log(4)
        ce = F.cross_entropy(z, batch.labels)
        high = 3.0 * w.mean() * (t - method.high_anchor).abs().mean()
        kl = 2.0 * (w * (log_q.exp() * (log_q - log_p)).sum(-1)).sum() / z.numel()
        low = 1.5 * w.mean() * (t - method.low_anchor).abs().mean()
        ctx_mean = method.prompt_learner.ctx.mean(0)
        align = 0.7 * sum(1 - F.cosine_similarity(t_out.mean(1), ctx_mean.expand_as(t_out.mean(1)), dim=-1).mean()
                          for _, _, t_out in fused.records.values()) / 2
    assert float(align) > 1e-4 and float(low) > 1e-4  # nothing here is trivially zero
    for name, value in dict(ce=ce, high=high, kl=kl, low=low, align=align, conf=w.mean()).items():
        torch.testing.assert_close(losses[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(losses["loss"], ce + high + kl + low + align, atol=1e-5, rtol=1e-4)


def test_each_ablation_switch_removes_exactly_its_component(tiny_backbone):
    on = {"lambda_low": 2.0, "lambda_align": 0.5, "fusion_gate_bias": 0.0}
    full = _perturb(_build(tiny_backbone, on))
    batch = _batch(tiny_backbone)
    ref = _losses(full, batch)
    assert min(ref["low"], ref["align"], ref["high"], ref["kl"]) > 1e-5

    def variant(**switch):
        method = _build(tiny_backbone, {**on, **switch})
        _copy(full, method)
        return _losses(method, batch)

    unchanged = ("ce", "high", "kl", "conf")
    # Low anchor off: the loss drops by exactly the low term.
    got = variant(lambda_low=0.0)
    assert got["low"] == 0 and got["loss"] == pytest.approx(ref["loss"] - ref["low"], abs=1e-5)
    assert all(got[k] == pytest.approx(ref[k], abs=1e-6) for k in (*unchanged, "align"))
    # Alignment off: exactly the align term.
    got = variant(lambda_align=0.0)
    assert got["align"] == 0 and got["loss"] == pytest.approx(ref["loss"] - ref["align"], abs=1e-5)
    assert all(got[k] == pytest.approx(ref[k], abs=1e-6) for k in (*unchanged, "low"))
    # No visual prototype (β = 0): only the low term changes, to the text-only anchor's.
    got = variant(beta=0.0)
    assert got["low"] != pytest.approx(ref["low"], abs=1e-6)
    assert all(got[k] == pytest.approx(ref[k], abs=1e-6) for k in (*unchanged, "align"))
    assert got["loss"] - got["low"] == pytest.approx(ref["loss"] - ref["low"], abs=1e-5)
    # Confidence off: CE and align unchanged; every anchor term is the weighted one divided by its weight.
    got = variant(confidence="none")
    assert got["conf"] == 1 and 0 < ref["conf"] < 1
    for k in ("ce", "align"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6)
    for k in ("high", "low"):
        assert ref[k] == pytest.approx(ref["conf"] * got[k], rel=1e-5)
    # The opposite direction weights with 1 − w.
    task = variant(confidence="task")
    assert task["conf"] == pytest.approx(1 - ref["conf"], abs=1e-6)
    assert task["high"] == pytest.approx(task["conf"] * got["high"], rel=1e-5)
    # Fusion off = fusion modules that return their inputs: same loss, no align term.
    got = variant(fusion=False)
    identity = _build(tiny_backbone, on)
    _copy(full, identity)
    for module in identity.fusion_modules.values():
        module.forward = lambda v, t: (v, t)
    same = _losses(identity, batch)
    assert got["align"] == 0 and same["align"] == pytest.approx(0, abs=1e-6)
    assert all(got[k] == pytest.approx(same[k], abs=1e-5) for k in ("loss", "ce", "high", "kl", "low"))
    assert got["ce"] != pytest.approx(ref["ce"], abs=1e-4)  # the fusion did change the prediction


def test_everything_off_is_biomeddpt(tiny_backbone):
    weights = {"n_prompts": 4, "text_dropout": False, "n_ctx": 5}
    batch = _batch(tiny_backbone, n=6, seed=2)
    for variant, dpt_extra in (("paper", {"prompt_start": 2}), ("released", {"class_token_position": "end"})):
        dpt = _perturb(_build(tiny_backbone, {**weights, **dpt_extra, "variant": variant, "lambda_l1": 7.0,
                                              "lambda_kl": 0.5}, name="biomeddpt"))
        ap = _build(tiny_backbone, {**ALL_OFF, "variant": variant, "lambda_high": 7.0, "lambda_kl": 0.5})
        copied = _copy(dpt, ap)
        assert set(copied) == set(ap.state_dict())  # the same learned tensors, nothing else
        assert ap.prefix_block == dpt.prefix_block and ap.prefix_fingerprint() == dpt.prefix_fingerprint()
        torch.testing.assert_close(ap.high_anchor, dpt.teacher_text)
        got, ref = _losses(ap, batch), _losses(dpt, batch)
        assert ref["l1"] > 1e-3 and ref["kl"] > 1e-5
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6, rel=1e-6), variant
        assert (got["ce"], got["high"], got["kl"]) == pytest.approx((ref["ce"], ref["l1"], ref["kl"]), abs=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(ap(batch), dpt(batch))


# ------------------------------------------------------------------------------------ inference options


def test_classwise_and_conditioned_text(tiny_backbone):
    batch = _batch(tiny_backbone)
    mean = _perturb(_build(tiny_backbone, {"fusion_gate_bias": 0.0}))
    classwise = _build(tiny_backbone, {"fusion_gate_bias": 0.0, "inference": "classwise"})
    _copy(mean, classwise)
    with torch.no_grad():
        features = classwise.image_features(batch)
        assert features.shape == (4, 4, tiny_backbone.embed_dim)
        # One fused pass per class: the class's stream [ctx ; e_c] changes that class's image features.
        assert float((features[:, 0] - features[:, 1]).abs().max()) > 1e-4
        expected = tiny_backbone.logit_scale * (features * classwise.prompt_learner().unsqueeze(0)).sum(-1)
        torch.testing.assert_close(classwise(batch), expected)
        assert classwise.training_step(batch)["align"] > 0
        classwise.set_classnames(["normal kidney", "kidney stone", "cyst kidney"])  # new class streams
        assert classwise(batch).shape == (4, 3) and classwise.name_embeds.shape[0] == 3
    # Without fusion the class streams play no role: classwise = mean.
    plain = [_build(tiny_backbone, {"fusion": False, "inference": mode}) for mode in ("mean", "classwise")]
    for method in plain:
        _copy(mean, method)
    with torch.no_grad():
        torch.testing.assert_close(plain[0](batch), plain[1](batch), atol=1e-5, rtol=1e-5)
    # Image-conditioned text: per-image class features; with identity fusion it is the plain classifier.
    conditioned = _build(tiny_backbone, {"fusion_gate_bias": 0.0, "conditioned_text": True})
    _copy(mean, conditioned)
    with torch.no_grad():
        logits = conditioned(batch)
        text = conditioned._conditioned_text(conditioned._run(batch))
        assert text.shape == (4, 4, tiny_backbone.embed_dim)
        assert float((text[0] - text[1]).abs().max()) > 1e-4
        for module in conditioned.fusion_modules.values():
            module.forward = lambda v, t: (v, t)
        plain_logits = tiny_backbone.logit_scale * conditioned.image_features(batch) @ conditioned.prompt_learner().t()
        torch.testing.assert_close(conditioned(batch), plain_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, plain_logits, atol=1e-4)


def test_config_validation_and_describe(tiny_backbone):
    with pytest.raises(ValueError, match="fusion_layers: block index 8"):
        build_method("biomedap", tiny_backbone, NAMES, {"fusion_layers": [5, 8]})
    with pytest.raises(ValueError, match="before the first prompted block"):
        build_method("biomedap", tiny_backbone, NAMES, {**FAST, "prompt_start": 3})
    with pytest.raises(ValueError, match="fusion_heads=3"):
        build_method("biomedap", tiny_backbone, NAMES, {**FAST, "fusion_heads": 3})
    for bad, match in (({"variant": "released", "fusion_patches": True}, "fusion_patches"),
                       ({"variant": "released", "conditioned_text": True}, "conditioned_text"),
                       ({"beta": 1.5}, "beta"), ({"fusion_layers": [2, 2]}, "listed twice"),
                       ({"lambda_low": -1}, "lambda_low"), ({"low_template": "{} and {}"}, "low_template")):
        with pytest.raises(ValueError, match=match):
            BiomedAPConfig(**bad)
    method = build_method("biomedap", tiny_backbone, NAMES, FAST)
    info = method.describe()
    parts = info["parameters"]
    assert sum(parts.values()) == info["trainable_parameters"] == sum(p.numel() for p in method.parameters())
    assert parts["context"] == 5 * 64 and parts["visual_prompts"] == 4 * 4 * 64
    assert sorted(info["fusion_parameters"]) == LAYERS and info["fusion_dim"] == 128 and info["prefix_block"] == 2
    released = build_method("biomedap", tiny_backbone, NAMES, {**FAST, "variant": "released"})
    info = released.describe()
    assert info["parameters"]["visual_prompts"] == 0 and info["fusion_dim"] == 64  # the ViT width, as released
    assert (info["beta"], info["confidence"]) == (0.0, "none")
    # At BiomedCLIP's width: the released module's 15.35 M parameters, ours 0.86 M.
    from biomedap.methods._fusion import GatedPromptFusion, ReleasedPromptFusion, branch_parameter_counts

    assert branch_parameter_counts(ReleasedPromptFusion(768, 768, heads=8))["total"] == 15_353_856
    assert branch_parameter_counts(GatedPromptFusion(768, 768, 128, heads=4))["total"] == 859_392


# ------------------------------------------------------------------------------------ released variant


def _mha(attn, q, k, v):
    """nn.MultiheadAttention (batch_first, no dropout) written out from its weights."""
    e, h = q.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (x @ w[i * e:(i + 1) * e].t() + b[i * e:(i + 1) * e] for i, x in enumerate((q, k, v)))

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], h, e // h).transpose(1, 2)

    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(e // h), dim=-1) @ heads(v)
    a = a.transpose(1, 2).reshape(q.shape[0], q.shape[1], e)
    return a @ attn.out_proj.weight.t() + attn.out_proj.bias


def _released_fuse(m, v, tc):
    """biomed-methods.md §5.3: gated mix, LayerNorm, residual FFN (768 = 768 here: no projections)."""
    def ffn(seq, x):
        return F.linear(F.gelu(F.linear(x, seq[0].weight, seq[0].bias)), seq[3].weight, seq[3].bias)

    a_v, a_t = _mha(m.attn_v, v, tc, tc), _mha(m.attn_t, tc, v, v)
    g_v = torch.sigmoid(F.linear(v, m.gate_v.weight, m.gate_v.bias))
    g_t = torch.sigmoid(F.linear(tc, m.gate_t.weight, m.gate_t.bias))
    vb = F.layer_norm(v + g_v * v + (1 - g_v) * a_v, v.shape[-1:], m.norm_v.weight, m.norm_v.bias)
    tb = F.layer_norm(tc + g_t * tc + (1 - g_t) * a_t, tc.shape[-1:], m.norm_t.weight, m.norm_t.bias)
    return vb + ffn(m.ffn_v, vb), tb + ffn(m.ffn_t, tb)


def test_released_variant_matches_a_hand_written_restatement(tiny_backbone):
    """§13.1 written out independently; only the module weights (and the frozen backbone) are shared."""
    from biomedap.prompts import resolve_descriptions

    lam_h, lam_kl, lam_l, n = 12.5, 0.25, 3.0, 5
    method = _perturb(build_method("biomedap", tiny_backbone, NAMES, {
        "variant": "released", "text_dropout": False, "fusion_layers": LAYERS, "n_ctx": n,
        "lambda_high": lam_h, "lambda_kl": lam_kl, "lambda_low": lam_l}), scale=0.2)
    method.prepare(_shots(tiny_backbone))
    method.eval()
    batch = _batch(tiny_backbone, n=4, seed=7)
    bb, trunk = tiny_backbone, tiny_backbone.vision.trunk
    with torch.no_grad():
        # Prompts: the template text of every class, word pieces 1..n replaced by ctx.
        tok = bb.tokenize([f"a MR photo of a {c} in the brain." for c in NAMES])
        prompts = bb.embed_tokens(tok.input_ids).clone()
        prompts[:, 1:1 + n] = method.prompt_learner.ctx
        tc = prompts[:, 1:1 + n]
        # Image: zero overwrite of tokens 1..4 after the embedding and before every block, fusion at 2 and 4.
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(batch.pixels)))).clone()
        x[:, 1:5] = 0
        cache = []
        for i, block in enumerate(trunk.blocks):
            x[:, 1:5] = 0
            if i in LAYERS:
                v_new, t_new = _released_fuse(method.fusion_modules[str(i)], x[:, 1:5], tc[batch.labels])
                x[:, 1:5] = v_new
                cache.append(t_new)
            x = block(x)
        f = F.normalize(bb.model.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(trunk.norm(x)[:, 0])))), dim=-1)
        t = F.normalize(bb.encode_text_embeddings(prompts, tok.attention_mask), dim=-1)
        bank = resolve_descriptions("builtin", NAMES, limit=40)
        h = F.normalize(torch.stack([bb.encode_text(bank[c], normalize=True).mean(0) for c in NAMES]), dim=-1)
        low = bb.encode_text(NAMES, normalize=True)
        s = bb.logit_scale
        z, zt = s * f @ t.t(), s * f @ h.t()
        p_t = zt.softmax(-1)
        loss = (F.cross_entropy(z, batch.labels) + lam_h * (t - h).abs().mean()
                + lam_kl * (p_t * (zt.log_softmax(-1) - z.log_softmax(-1))).sum() / z.numel()
                + lam_l * (t - low).abs().mean()
                + 0.1 * sum((1 - F.cosine_similarity(c.mean(1), tc[batch.labels].mean(1), dim=-1)).mean()
                            for c in cache) / len(cache))
        got = method.training_step(batch)
        assert float(got["align"]) > 1e-3
        torch.testing.assert_close(got["loss"], loss, atol=1e-5, rtol=1e-5)
        # Inference uses the class-mean context.
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(batch.pixels)))).clone()
        for i, block in enumerate(trunk.blocks):
            x[:, 1:5] = 0
            if i in LAYERS:
                mean_ctx = tc.mean(0, keepdim=True).expand(x.shape[0], -1, -1)
                x[:, 1:5] = _released_fuse(method.fusion_modules[str(i)], x[:, 1:5], mean_ctx)[0]
            x = block(x)
        f = F.normalize(bb.model.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(trunk.norm(x)[:, 0])))), dim=-1)
        torch.testing.assert_close(method(batch), s * f @ t.t(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ presets and CLI


def test_preset_tables_follow_the_published_configs():
    import yaml

    from biomedap.config import _find_preset, resolve_run_config

    paper = resolve_run_config("biomedap", dataset="btmri")
    mc = paper.method_config
    assert (mc["n_ctx"], mc["lambda_high"], mc["lambda_kl"], mc["lambda_low"]) == (5, 12.5, 0.25, 3.0)
    assert (mc["n_prompts"], mc["beta"], mc["confidence"], mc["fusion_dim"], mc["variant"]) == (40, 0.5, "anchor", 128,
                                                                                               "paper")
    assert (paper.optim.lr, paper.optim.batch_size, paper.optim.epochs) == (0.0025, 4, 100)
    released = resolve_run_config("biomedap", dataset="dermamnist", overrides=["method.variant=released"]).method_config
    assert (released["fusion_dim"], released["fusion_heads"], released["fusion_dropout"]) == (None, 8, 0.1)
    assert (released["beta"], released["confidence"], released["lambda_low"]) == (0.0, "none", 15.0)
    assert released["class_token_position"] is None  # few-shot: class name at the end
    b2n = resolve_run_config("biomedap", dataset="chmnist", overrides=["data.subsample=base",
                                                                       "method.variant=released"])
    mc = b2n.method_config
    assert (b2n.optim.epochs, mc["n_prompts"], mc["class_token_position"]) == (50, 50, "middle_released")
    assert (mc["lambda_high"], mc["lambda_kl"], mc["lambda_low"]) == (42.3, 0.7, 24.6)
    # Few-shot λ_high / λ_KL / N_CTX equal Biomed-DPT's for every dataset (biomed-methods.md §5.8).
    ap, dpt = (yaml.safe_load(_find_preset(m, None)[0].read_text()) for m in ("biomedap", "biomeddpt"))
    assert set(ap["datasets"]) == set(dpt["datasets"]) and len(ap["datasets"]) == 11
    for key, entry in ap["datasets"].items():
        a, d = entry["method_config"], dpt["datasets"][key]["method_config"]
        assert (a["n_ctx"], a["lambda_high"], a["lambda_kl"]) == (d["n_ctx"], d["lambda_l1"], d["lambda_kl"]), key


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_train_and_eval_from_the_command_line(variant, synthetic_root, tmp_path, capsys):
    from biomedap.cli import main

    args = ["train", "--method", "biomedap", "--dataset", str(synthetic_root / "SYNTH"), "--backbone", "tiny",
            "--shots", "2", "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--set", "optim.epochs=2", "data.views=1", "method.n_prompts=4",
            f"method.variant={variant}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = re.search(r"^run directory: (.+)$", out, flags=re.MULTILINE).group(1).strip()
    from pathlib import Path

    run_dir = Path(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    card = json.loads((run_dir / "card.json").read_text())
    assert result["method"] == "biomedap" and 0 <= result["metrics"]["test"]["accuracy"] <= 1
    assert card["describe"]["fusion_layers"] == LAYERS and card["describe"]["variant"] == variant
    assert main(["eval", "--run", str(run_dir), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["metrics"]["accuracy"]
    assert again == pytest.approx(result["metrics"]["test"]["accuracy"])
