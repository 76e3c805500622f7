"""CoCoOp: meta-net shape and initialisation, per-image prompts against a hand computation, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, CoCoOpConfig, build_method
from biomedap.methods._prompting import insert_context

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _features(backbone, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)


def test_meta_net_shape_and_default_init(tiny_backbone):
    method = build_method("cocoop", tiny_backbone, NAMES, seed=3)
    first, relu, last = method.meta_net
    d, w = tiny_backbone.embed_dim, tiny_backbone.text.width
    assert isinstance(relu, torch.nn.ReLU)
    assert first.weight.shape == (d // 16, d) and first.bias is not None
    assert last.weight.shape == (w, d // 16) and last.bias is not None
    # PyTorch's default Linear init: every weight within ±1/sqrt(fan_in).
    assert first.weight.abs().max() <= 1 / math.sqrt(d)
    assert last.weight.abs().max() <= 1 / math.sqrt(d // 16)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}


def test_logits_match_a_hand_computation(tiny_backbone):
    method = build_method("cocoop", tiny_backbone, NAMES, {"text_chunk_images": 2}, seed=1)
    f = _features(tiny_backbone, 5)
    first, _, last = method.meta_net
    expected = torch.empty(5, len(NAMES))
    with torch.no_grad():
        for i in range(5):
            shift = torch.relu(f[i] @ first.weight.t() + first.bias) @ last.weight.t() + last.bias
            ctx = method.ctx + shift  # the same shift on each of the 4 context vectors
            embeds = insert_context(method.token_embeds, ctx, method.ctx_positions)
            text = F.normalize(tiny_backbone.encode_text_embeddings(embeds, method.attention_mask), dim=-1)
            expected[i] = tiny_backbone.logit_scale * text @ f[i]
        got = method(Batch(features=f))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The shift matters: the logits are not the unconditioned CoOp prompt's.
    with torch.no_grad():
        plain = tiny_backbone.logit_scale * f @ method.text_features().t()
    assert not torch.allclose(got, plain, atol=1e-4)


def test_zero_meta_net_output_is_coop(tiny_backbone):
    cocoop = build_method("cocoop", tiny_backbone, NAMES)
    coop = build_method("coop", tiny_backbone, NAMES)
    with torch.no_grad():
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
        f = _features(tiny_backbone, 4, seed=2)
        torch.testing.assert_close(cocoop(Batch(features=f)), coop(Batch(features=f)), atol=1e-5, rtol=1e-5)


def test_chunks_bound_the_text_calls_and_do_not_change_results(tiny_backbone):
    f = _features(tiny_backbone, 7, seed=4)
    results = {}
    for chunk in (1, 3, 16):
        method = build_method("cocoop", tiny_backbone, NAMES, {"text_chunk_images": chunk}, seed=0)
        rows: list[int] = []
        original = tiny_backbone.encode_text_embeddings

        def spy(embeds, mask, rows=rows, original=original, **kwargs):
            rows.append(embeds.shape[0])
            return original(embeds, mask, **kwargs)

        tiny_backbone.encode_text_embeddings = spy
        try:
            with torch.no_grad():
                results[chunk] = method(Batch(features=f))
        finally:
            tiny_backbone.encode_text_embeddings = original
        assert len(rows) == math.ceil(7 / chunk)
        assert max(rows) == min(chunk, 7) * len(NAMES)
    torch.testing.assert_close(results[1], results[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1], results[16], atol=1e-5, rtol=1e-5)


def test_config_refuses_csc_and_bad_chunk():
    with pytest.raises(ValueError, match="csc"):
        CoCoOpConfig(csc=True)
    with pytest.raises(ValueError, match="text_chunk_images"):
        CoCoOpConfig(text_chunk_images=0)


def test_unseen_classes_keep_the_learned_tensors(tiny_backbone):
    method = build_method("cocoop", tiny_backbone, NAMES)
    state = method.learned_state()
    method.set_classnames(["normal kidney", "kidney stone"])
    assert method(Batch(features=_features(tiny_backbone, 3))).shape == (3, 2)
    assert all(torch.equal(state[k], v) for k, v in method.learned_state().items())


def test_preset_holds_the_published_settings():
    from biomedap.config import resolve_run_config

    run = resolve_run_config("cocoop", dataset="btmri")
    assert (run.optim.lr, run.optim.epochs, run.optim.batch_size) == (0.001, 10, 1)
    assert run.method_config["ctx_init"] == "a photo of a" and run.method_config["n_ctx"] == 4
    assert run.data.augment == "dassl" and run.precision == "fp32" and run.optim.schedule_step == "epoch"
