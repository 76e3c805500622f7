"""CoOp and zero-shot: token layouts, initialisation, ensembling, and that CoOp learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, CoOpConfig, ZeroShotConfig, build_method
from biomedap.methods._prompting import insert_context

NAMES = ["glioma tumor", "meningioma tumor", "normal brain"]


def _ids(backbone, text):
    return backbone.text.pieces(text)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_layout_for_multi_piece_names(tiny_backbone, position):
    text = tiny_backbone.text
    name_pieces = text.pieces("meningioma tumor")
    assert len(name_pieces) >= 3, "the tiny vocabulary must split this class name into several pieces"
    method = build_method("coop", tiny_backbone, NAMES,
                          CoOpConfig(n_ctx=4, ctx_init=None, class_token_position=position))
    row = 1  # "meningioma tumor"
    length = int(method.attention_mask[row].sum())
    ids = method.input_ids[row, :length].tolist()
    slots = method.ctx_positions[row].tolist()
    dot = text.pieces(".")
    ctx = ["ctx"] * 4
    layout = {
        "end": ctx + name_pieces,
        "middle": ctx[:2] + name_pieces + ctx[2:],
        "front": name_pieces + ctx,
    }[position]
    expected = [text.bos_id] + layout + dot + [text.eos_id]
    got = ["ctx" if i in slots else tok for i, tok in enumerate(ids)]
    assert got == expected
    # The learned vectors land exactly in the slots, in order.
    embeds = insert_context(method.token_embeds, method.ctx, method.ctx_positions)
    for k, slot in enumerate(slots):
        assert torch.equal(embeds[row, slot], method.ctx[k])
    # Padding beyond the row is masked out.
    assert int(method.attention_mask[row].sum()) == len(expected)


def test_ctx_init_uses_word_embeddings_and_keeps_extra_pieces_as_text(tiny_backbone):
    phrase = "a photo of a"
    pieces = tiny_backbone.text.pieces(phrase)
    method = build_method("coop", tiny_backbone, NAMES, CoOpConfig(n_ctx=2, ctx_init=phrase))
    expected = tiny_backbone.word_embeddings.weight[pieces[:2]]
    assert torch.equal(method.ctx.detach(), expected)
    # The two pieces not learned stay as fixed text right after the context.
    row = method.input_ids[0].tolist()
    assert row[3:3 + len(pieces) - 2] == pieces[2:]


def test_n_ctx_larger_than_init_phrase_is_an_error(tiny_backbone):
    with pytest.raises(ValueError, match="n_ctx"):
        build_method("coop", tiny_backbone, NAMES, CoOpConfig(n_ctx=12, ctx_init="a photo"))


def test_random_init_depends_on_seed_and_csc_shapes(tiny_backbone):
    a = build_method("coop", tiny_backbone, NAMES, CoOpConfig(n_ctx=4, ctx_init=None), seed=1)
    b = build_method("coop", tiny_backbone, NAMES, CoOpConfig(n_ctx=4, ctx_init=None), seed=2)
    c = build_method("coop", tiny_backbone, NAMES, CoOpConfig(n_ctx=4, ctx_init=None), seed=1)
    assert not torch.equal(a.ctx, b.ctx) and torch.equal(a.ctx, c.ctx)
    assert abs(float(a.ctx.detach().std()) - 0.02) < 0.01
    csc = build_method("coop", tiny_backbone, NAMES, {"csc": True})
    assert csc.ctx.shape == (len(NAMES), 4, tiny_backbone.text.width)
    with pytest.raises(ValueError, match="cannot name other classes"):
        csc.set_classnames(["a", "b"])


def test_coop_text_features_match_plain_prompt_at_init(tiny_backbone):
    """Initialised from 'a photo of a', CoOp's class features equal the zero-shot prompt's."""
    method = build_method("coop", tiny_backbone, NAMES)
    zeroshot = build_method("zeroshot", tiny_backbone, NAMES, ZeroShotConfig(templates=("a photo of a {}.",)))
    with torch.no_grad():
        torch.testing.assert_close(method.text_features(), zeroshot.text_features, atol=1e-5, rtol=1e-5)


def test_zeroshot_averages_normalised_template_features(tiny_backbone):
    templates = ("a photo of a {}.", "a mri scan of a {}", "{}")
    method = build_method("zeroshot", tiny_backbone, NAMES, ZeroShotConfig(templates=templates))
    with torch.no_grad():
        manual = []
        for name in NAMES:
            feats = tiny_backbone.encode_text([t.format(name) for t in templates], normalize=True)
            manual.append(F.normalize(feats.mean(0), dim=-1))
    torch.testing.assert_close(method.text_features, torch.stack(manual), atol=1e-6, rtol=1e-6)
    features = F.normalize(torch.randn(5, tiny_backbone.embed_dim), dim=-1)
    expected = tiny_backbone.logit_scale * features @ torch.stack(manual).t()
    torch.testing.assert_close(method(Batch(features=features)), expected, atol=1e-5, rtol=1e-5)


def test_zeroshot_template_needs_one_placeholder():
    with pytest.raises(ValueError, match="templates"):
        ZeroShotConfig(templates=("no placeholder",))


def test_coop_learns_a_separable_generated_set(tiny_backbone, synthetic_splits, feature_cache):
    """Trained on generated images of 4 visually distinct classes, CoOp gains ≥ 30 points."""
    from biomedap.config import OptimConfig
    from biomedap.features import encode_samples
    from biomedap.train import FeatureTrainData, fit, predict_logits

    train, test = synthetic_splits.train, synthetic_splits.test
    train_x = encode_samples(tiny_backbone, train, cache=feature_cache)
    test_x = encode_samples(tiny_backbone, test, cache=feature_cache)
    train_y = torch.tensor([s.label for s in train])
    test_y = torch.tensor([s.label for s in test])
    method = build_method("coop", tiny_backbone, synthetic_splits.classnames, {"ctx_init": None, "n_ctx": 4}, seed=1)
    before = (predict_logits(method, test_x).argmax(1) == test_y).float().mean().item()
    optim = OptimConfig(lr=0.05, epochs=60, batch_size=16, warmup_epochs=1)
    fit(method, FeatureTrainData(train_x, train_y), optim, seed=1)
    after = (predict_logits(method, test_x).argmax(1) == test_y).float().mean().item()
    assert after - before >= 0.30, f"CoOp went from {before:.2f} to {after:.2f}"


def test_zeroshot_with_a_description_bank(tiny_backbone, tmp_path):
    import json

    bank = {name: [f"a scan showing {name}", f"{name} seen on imaging", f"a third line on {name}"] for name in NAMES}
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(bank))
    method = build_method("zeroshot", tiny_backbone, NAMES, {"descriptions": str(path), "max_descriptions": 2})
    with torch.no_grad():
        manual = torch.stack([
            F.normalize(tiny_backbone.encode_text(bank[name][:2], normalize=True).mean(0), dim=-1) for name in NAMES
        ])
    torch.testing.assert_close(method.text_features, manual, atol=1e-6, rtol=1e-6)
    del bank[NAMES[1]]
    path.write_text(json.dumps(bank))
    with pytest.raises(ValueError, match="meningioma tumor"):
        build_method("zeroshot", tiny_backbone, NAMES, {"descriptions": str(path)})
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_method("zeroshot", tiny_backbone, NAMES, {"descriptions": str(tmp_path / "nope.json")})
