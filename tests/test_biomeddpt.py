"""Biomed-DPT: clinical prompts, deep visual prompts, the released zero overwrite, the loss, the presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, BiomedDPTConfig, TrainingData, build_method
from biomedap.methods._deep_prompts import (
    DeepVisualPrompts,
    kl_distillation,
    l1_anchor_loss,
    resolve_prompt_template,
    split_template,
)

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
COVID = ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"]
FAST = {"n_prompts": 4}  # teacher from 4 descriptions per class: fast, same code path


def _pixels(backbone, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.preprocess.size
    return torch.randn(n, 3, size, size, generator=g)


def _batch(backbone, n=4, seed=0):
    return Batch(labels=torch.arange(n) % len(NAMES), pixels=_pixels(backbone, n, seed))


def _prepared(backbone, config=None, names=NAMES, seed=0):
    method = build_method("biomeddpt", backbone, names, {**FAST, **(config or {})}, seed=seed)
    method.prepare(TrainingData(torch.zeros(1, backbone.embed_dim), torch.zeros(1, dtype=torch.long)))
    return method


def _tokens(backbone, ids):
    return backbone.text.tokenizer.convert_ids_to_tokens(ids)


# ------------------------------------------------------------------------------------ hand-written ViT forwards


def _embed(backbone, pixels):
    trunk = backbone.vision.trunk
    return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))


def _pool(backbone, x):
    """Final LayerNorm, CLS token, timm head, open_clip projection (BiomedCLIP's pooling)."""
    trunk = backbone.vision.trunk
    return backbone.model.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(trunk.norm(x)[:, 0]))))


def _inserted_prompts_forward(backbone, pixels, prompts: dict[int, torch.Tensor]):
    """VPT-deep by hand: before a prompted block, drop the previous prompt outputs and put the block's
    prompts right after CLS; unprompted blocks carry the previous outputs along; pool without them."""
    x = _embed(backbone, pixels)
    n_patches = backbone.vision.num_patches
    for i, block in enumerate(backbone.vision.trunk.blocks):
        if i in prompts:
            p = prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, -n_patches:]], dim=1)
        x = block(x)
    x = torch.cat([x[:, :1], x[:, -n_patches:]], dim=1)
    return F.normalize(_pool(backbone, x), dim=-1)


def _released_forward(backbone, pixels, overwrite=True):
    """biomed-methods.md §4.2, written out: x[:, 1:5] = 0 after the embedding and before every block."""
    x = _embed(backbone, pixels).clone()
    if overwrite:
        x[:, 1:5] = 0
    for block in backbone.vision.trunk.blocks:
        if overwrite:
            x[:, 1:5] = 0
        x = block(x)
    return F.normalize(_pool(backbone, x), dim=-1)


# ------------------------------------------------------------------------------------ templates and layouts


def test_clinical_template_comes_from_the_class_names():
    assert resolve_prompt_template("clinical", NAMES) == "a MR photo of a {} in the brain."
    assert resolve_prompt_template("clinical", NAMES[:2]) == "a MR photo of a {} in the brain."  # a B2N half
    assert resolve_prompt_template("clinical", COVID).startswith("a chest X-ray photo of a {}")
    assert resolve_prompt_template("clinical", ["cat", "dog"]) == "a photo of a {}."  # no catalog dataset
    assert resolve_prompt_template("clinical", NAMES, "builtin:kvasir") == "a endoscopic photo of a {} in the colon."
    assert resolve_prompt_template("clinical/retina", NAMES) == "a photo of a {} presented in image."
    assert resolve_prompt_template("an MRI of {}", NAMES) == "an MRI of {}"
    from biomedap.data.catalog import get_dataset_spec

    organs = get_dataset_spec("medmnist/organamnist").classnames
    with pytest.raises(ValueError, match="builtin:<dataset>"):
        resolve_prompt_template("clinical", organs)
    assert "coronal" in resolve_prompt_template("clinical", organs, "builtin:medmnist/organcmnist")


def test_published_ctx_init_is_the_clinical_templates_phrase():
    # §4.6: CTX_INIT per dataset; the preset relies on it being the template's text before "{}".
    published = {"btmri": "a MR photo of a", "busi": "a ultrasound photo of a",
                 "chmnist": "a histopathological photo of a", "covid": "a chest X-ray photo of a",
                 "ctkidney": "a CT photo of a", "dermamnist": "a dermatoscopy photo of a",
                 "kneexray": "a frontal X-ray photo of a", "kvasir": "a endoscopic photo of a",
                 "lungcolon": "a histopathological photo of a", "octmnist": "a OCT photo of a", "retina": "a photo of a"}
    from biomedap.prompts.templates import get_template

    for key, phrase in published.items():
        assert split_template(get_template(f"clinical/{key}"))[0] == phrase, key
        assert get_template(f"ctx_init/{key}") == phrase, key


def test_layouts_end_middle_and_the_published_middle(tiny_backbone):
    rows = {}
    for position in ("end", "middle", "middle_released"):
        method = build_method("biomeddpt", tiny_backbone, NAMES, {"class_token_position": position})
        learner = method.prompt_learner
        rows[position] = [_tokens(tiny_backbone, r) for r in learner.input_ids.tolist()]
        for row, slots in zip(learner.input_ids.tolist(), learner.ctx_positions.tolist()):
            assert all(row[s] == tiny_backbone.text.pad_id for s in slots)
    c = "[PAD]"  # context slots hold the pad id in input_ids
    tail = ["in", "the", "brain", ".", "[SEP]"]
    meningioma = ["meni", "##ngio", "##ma", "tumor"]
    assert rows["end"][1] == ["[CLS]", c, c, c, c, c, *meningioma, *tail]
    # Correct middle: the whole name between the halves ⌊5/2⌋ = 2 and 3.
    assert rows["middle"][1] == ["[CLS]", c, c, *meningioma, c, c, c, *tail]
    # Published middle (name length taken as 1): only the first piece moves.
    assert rows["middle_released"][1] == ["[CLS]", c, c, "meni", c, c, c, "##ngio", "##ma", "tumor", *tail]
    assert rows["middle_released"][0][:9] == ["[CLS]", c, c, "glioma", c, c, c, "tumor", "in"]

    # Fixed phrase pieces beyond n_ctx: "a chest x - ray photo" learned, "of a" fixed; released moves "of".
    method = build_method("biomeddpt", tiny_backbone, COVID, {"n_ctx": 6, "variant": "released"})
    row = _tokens(tiny_backbone, method.prompt_learner.input_ids[0].tolist())
    assert row[:11] == ["[CLS]", c, c, c, "of", c, c, c, "a", "covid", "lungs"]


def test_context_at_init_reproduces_the_template_text(tiny_backbone):
    for names, config in ((NAMES, {}), (NAMES, {"n_ctx": 3}), (COVID, {"n_ctx": 6})):
        method = build_method("biomeddpt", tiny_backbone, names, config)
        learner = method.prompt_learner
        method.eval()
        with torch.no_grad():
            expected = F.normalize(tiny_backbone.encode_text(learner.prompt_texts()), dim=-1)
            torch.testing.assert_close(learner(), expected, atol=1e-5, rtol=1e-5)
    # The published middle at init = the template's tokens with the first piece after the context moved.
    method = build_method("biomeddpt", tiny_backbone, NAMES, {"variant": "released"})
    ids = tiny_backbone.tokenize(method.prompt_learner.prompt_texts())
    order = [0, 1, 2, 6, 3, 4, 5, *range(7, ids.input_ids.shape[1])]
    with torch.no_grad():
        expected = tiny_backbone.encode_text_embeddings(tiny_backbone.embed_tokens(ids.input_ids[:, order]),
                                                        ids.attention_mask, normalize=True)
        torch.testing.assert_close(method.prompt_learner(), expected, atol=1e-5, rtol=1e-5)


def test_context_options_and_errors(tiny_backbone):
    with pytest.raises(ValueError, match="n_ctx=6 but the phrase 'a MR photo of a'"):
        build_method("biomeddpt", tiny_backbone, NAMES, {"n_ctx": 6})
    with pytest.raises(ValueError, match="no words before"):
        build_method("biomeddpt", tiny_backbone, NAMES, {"template": "{} in the brain"})
    other = build_method("biomeddpt", tiny_backbone, NAMES, {"ctx_init": "a CT photo of a"})
    expected = tiny_backbone.embed_tokens(torch.tensor(tiny_backbone.text.pieces("a CT photo of a")))
    torch.testing.assert_close(other.prompt_learner.ctx.detach(), expected)
    random = build_method("biomeddpt", tiny_backbone, NAMES, {"ctx_init": None, "init_std": 0.02}, seed=3)
    assert 0.005 < float(random.prompt_learner.ctx.detach().std()) < 0.05


# ------------------------------------------------------------------------------------ the image side


def test_zero_initialised_prompts_are_inserted_tokens_not_a_no_op(tiny_backbone):
    pixels = _pixels(tiny_backbone)
    for config, blocks in (({}, range(tiny_backbone.vision.depth)), ({"prompt_blocks": [3, 1]}, [1, 3])):
        method = build_method("biomeddpt", tiny_backbone, NAMES, config)
        assert method.visual_prompts.blocks == tuple(blocks)
        assert torch.equal(method.visual_prompts.tokens, torch.zeros_like(method.visual_prompts.tokens))
        with torch.no_grad():
            prompted = method.image_features(Batch(pixels=pixels))
            plain = tiny_backbone.encode_image(pixels, normalize=True)
            zeros = {b: torch.zeros(4, tiny_backbone.vision.width) for b in blocks}
            by_hand = _inserted_prompts_forward(tiny_backbone, pixels, zeros)
        # Zero tokens still take part in attention (as the LayerNorm bias): the features change...
        assert (prompted - plain).abs().max() > 1e-3
        # ...exactly as inserting zero tokens after CLS before every prompted block does.
        torch.testing.assert_close(prompted, by_hand, atol=1e-5, rtol=1e-5)


def test_trained_prompts_match_the_hand_forward_and_cached_tokens_agree(tiny_backbone):
    pixels = _pixels(tiny_backbone, seed=2)
    for config in ({}, {"prompt_start": 3}, {"variant": "released"}):
        method = _prepared(tiny_backbone, {**config, "text_dropout": False})
        method.train()
        method.train_step(_batch(tiny_backbone), torch.optim.SGD(method.trainable_parameters(), lr=0.5))
        method.eval()
        tokens = tiny_backbone.encode_image_prefix(pixels, method.prefix_block, hook=method.prefix_hook())
        with torch.no_grad():
            from_pixels = method(Batch(pixels=pixels))
            from_tokens = method(Batch(tokens=tokens))
        torch.testing.assert_close(from_tokens, from_pixels, atol=1e-5, rtol=1e-5)
        if method.visual_prompts is not None:
            assert method.visual_prompts.tokens.abs().max() > 0
            with torch.no_grad():
                by_hand = _inserted_prompts_forward(tiny_backbone, pixels, method.visual_prompts.prompts())
                torch.testing.assert_close(method.image_features(Batch(pixels=pixels)), by_hand, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not pooled features"):
        method(Batch(features=torch.zeros(2, tiny_backbone.embed_dim)))


def test_released_variant_is_the_published_zero_overwrite(tiny_backbone):
    pixels = _pixels(tiny_backbone, n=3, seed=4)
    with torch.no_grad():
        # The hand-written pooling is the stock model's: no overwrite = open_clip's own encode_image.
        stock = F.normalize(tiny_backbone.model.encode_image(pixels), dim=-1)
        torch.testing.assert_close(_released_forward(tiny_backbone, pixels, overwrite=False), stock,
                                   atol=1e-5, rtol=1e-5)
        expected = _released_forward(tiny_backbone, pixels)
    method = build_method("biomeddpt", tiny_backbone, NAMES, {"variant": "released"})
    depth = tiny_backbone.vision.depth
    assert method.prefix_block == depth and method.prefix_fingerprint() == "overwrite4"
    assert method.visual_prompts is None
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    cached = tiny_backbone.encode_image_prefix(pixels, depth, hook=method.prefix_hook())  # final block's output
    assert cached.shape == (3, tiny_backbone.vision.num_tokens, tiny_backbone.vision.width)
    with torch.no_grad():
        torch.testing.assert_close(method.image_features(Batch(pixels=pixels)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.image_features(Batch(tokens=cached)), expected, atol=1e-5, rtol=1e-5)
        assert (expected - stock).abs().max() > 1e-3  # the overwrite matters
        logits = method(Batch(tokens=cached))
        torch.testing.assert_close(logits, tiny_backbone.logit_scale * expected @ method.prompt_learner().t(),
                                   atol=1e-5, rtol=1e-5)
    partial = build_method("biomeddpt", tiny_backbone, NAMES, {"variant": "released", "prompt_blocks": [0, 2]})
    assert partial.prefix_fingerprint() == "overwrite4@0,2" and partial.prefix_block == depth


# ------------------------------------------------------------------------------------ losses


def test_loss_terms_on_literal_numbers():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    assert float(l1_anchor_loss(t, h)) == pytest.approx((0.5 + 0.5) / 4)
    # Teacher p = (0.75, 0.25), student p = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5, divided by B·C = 2.
    kl = kl_distillation(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))
    assert float(kl) == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    batchmean = F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="batchmean")
    torch.testing.assert_close(kl_distillation(zs, zt), batchmean / 3)  # C times smaller than batchmean
    assert float(kl_distillation(zt, zt)) == pytest.approx(0.0, abs=1e-7)


def test_training_step_matches_a_hand_computation(tiny_backbone):
    from biomedap.prompts.banks import load_bank

    l1_w, kl_w = 3.0, 2.0
    method = _prepared(tiny_backbone, {"lambda_l1": l1_w, "lambda_kl": kl_w, "prompt_start": 2})
    bank = load_bank("btmri")
    with torch.no_grad():
        g = torch.stack([F.normalize(tiny_backbone.encode_text(bank[n][:4]), dim=-1) for n in NAMES])
        h = F.normalize(g.mean(1), dim=-1)
    torch.testing.assert_close(method.teacher_text, h, atol=1e-6, rtol=1e-5)
    method.train()
    method.train_step(_batch(tiny_backbone), torch.optim.SGD(method.trainable_parameters(), lr=0.5))
    method.eval()  # no text dropout: the hand computation sees the same text features
    batch = _batch(tiny_backbone, n=6, seed=7)
    with torch.no_grad():
        f = _inserted_prompts_forward(tiny_backbone, batch.pixels, method.visual_prompts.prompts())
        t = F.normalize(tiny_backbone.encode_text_embeddings(method.prompt_learner.prompt_embeddings(),
                                                             method.prompt_learner.attention_mask), dim=-1)
        s = tiny_backbone.logit_scale
        z, zt = s * f @ t.t(), s * f @ h.t()
        ce = F.cross_entropy(z, batch.labels)
        l1 = l1_w * (t - h).abs().mean()
        pt = zt.softmax(-1)
        kl = kl_w * (pt * (pt.log() - z.log_softmax(-1))).sum() / z.numel()
        losses = method.training_step(batch)
    assert float(l1) > 1e-3 and float(kl) > 1e-5
    for key, value in (("ce", ce), ("l1", l1), ("kl", kl), ("loss", ce + l1 + kl)):
        torch.testing.assert_close(losses[key], value, atol=1e-5, rtol=1e-5)


def test_a_step_changes_the_context_and_every_visual_prompt_only(tiny_backbone):
    method = _prepared(tiny_backbone)
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert set(trainable) == {"prompt_learner.ctx", "visual_prompts.tokens"}
    assert set(method.learned_state()) == set(trainable)  # teacher, token rows: not saved
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen = {n: v.clone() for n, v in tiny_backbone.model.state_dict().items()}
    method.train()
    method.train_step(_batch(tiny_backbone), torch.optim.SGD(method.trainable_parameters(), lr=0.01))
    method.eval()
    assert not torch.equal(before["prompt_learner.ctx"], method.prompt_learner.ctx)
    changed = (before["visual_prompts.tokens"] != method.visual_prompts.tokens).flatten(1).any(1)
    assert changed.all(), f"visual prompts of blocks {(~changed).nonzero().flatten().tolist()} did not move"
    assert all(torch.equal(frozen[n], v) for n, v in tiny_backbone.model.state_dict().items())


def test_reload_predicts_without_the_teacher_and_new_classes_keep_the_template(tiny_backbone):
    method = _prepared(tiny_backbone, {"text_dropout": False})
    method.train()
    method.train_step(_batch(tiny_backbone), torch.optim.SGD(method.trainable_parameters(), lr=0.5))
    method.eval()
    other = build_method("biomeddpt", tiny_backbone, NAMES, seed=9)
    other.load_learned_state(method.learned_state())
    batch = _batch(tiny_backbone, seed=3)
    with torch.no_grad():
        assert torch.equal(method(batch), other(batch))
    novel = ["normal kidney", "kidney stone"]
    other.set_classnames(novel)
    assert other.prompt_learner.template == "a MR photo of a {} in the brain." and other.teacher_text is None
    with torch.no_grad():
        assert other(batch).shape == (4, 2)
    with pytest.raises(RuntimeError, match="prepare"):
        other.training_step(Batch(labels=torch.zeros(4, dtype=torch.long), pixels=batch.pixels))


def test_config_validation(tiny_backbone):
    for bad, match in (({"template": "a scan"}, "template"), ({"n_ctx": 0}, "n_ctx"), ({"ctx_init": " "}, "ctx_init"),
                       ({"n_visual_tokens": 0}, "n_visual_tokens"), ({"prompt_blocks": ()}, "prompt_blocks"),
                       ({"prompt_blocks": (1, 1)}, "prompt_blocks"), ({"lambda_l1": -1.0}, "lambda_l1"),
                       ({"lambda_kl": -1.0}, "lambda_kl"), ({"n_prompts": 0}, "n_prompts"),
                       ({"class_token_position": "left"}, "class_token_position"), ({"variant": "v2"}, "variant")):
        with pytest.raises(ValueError, match=match):
            BiomedDPTConfig(**bad)
    with pytest.raises(ValueError, match="prompt_blocks: block index 6"):
        build_method("biomeddpt", tiny_backbone, NAMES, {"prompt_blocks": [2, 6]})
    with pytest.raises(ValueError, match="prompt_start"):
        build_method("biomeddpt", tiny_backbone, NAMES, {"prompt_start": 6})
    method = build_method("biomeddpt", tiny_backbone, NAMES, {"prompt_blocks": [4, 2]})
    assert method.prefix_block == 2 and method.prefix_fingerprint() == "plain"
    prompts = DeepVisualPrompts(2, [5, 1], 8)
    assert prompts.blocks == (1, 5) and prompts.first_block == 1 and set(prompts.prompts()) == {1, 5}


# ------------------------------------------------------------------------------------ presets


FEW_SHOT = {"BTMRI": (5, 12.5, 0.25), "BUSI": (5, 18.75, 1.0), "CHMNIST": (5, 12.5, 0.5), "COVID_19": (6, 65.0, 2.5),
            "CTKidney": (5, 18.75, 0.25), "DermaMNIST": (5, 25.0, 20.0), "KneeXray": (6, 25.0, 10.0),
            "Kvasir": (5, 25.0, 0.75), "LungColon": (5, 12.5, 0.25), "OCTMNIST": (5, 12.5, 0.25),
            "RETINA": (4, 10.5, 0.25)}
BASE_TO_NOVEL = {"BTMRI": (25.0, 0.5), "BUSI": (18.75, 0.65), "CHMNIST": (23.0, 0.9), "COVID_19": (18.75, 0.5),
                 "CTKidney": (25.0, 1.0), "DermaMNIST": (11.5, 5.0), "KneeXray": (23.0, 4.5), "Kvasir": (10.0, 0.5),
                 "LungColon": (9.5, 0.3), "OCTMNIST": (12.5, 0.5), "RETINA": (22.0, 0.4)}


def test_preset_tables():
    from biomedap.config import resolve_run_config

    for dataset, (n_ctx, l1, kl) in FEW_SHOT.items():
        run = resolve_run_config("biomeddpt", dataset=dataset)
        mc = run.method_config
        assert (mc["n_ctx"], mc["lambda_l1"], mc["lambda_kl"]) == (n_ctx, l1, kl), dataset
        assert (mc["template"], mc["ctx_init"], mc["n_prompts"], mc["text_dropout"]) == ("clinical", "template", 50, True)
        assert (run.optim.lr, run.optim.batch_size, run.optim.epochs, run.optim.warmup_lr) == (0.0025, 4, 100, 1e-5)
        assert run.optim.schedule == "cosine" and run.precision == "fp32" and mc["variant"] == "paper"
        b2n = resolve_run_config("biomeddpt", dataset=dataset, overrides=["data.subsample=base"])
        mc = b2n.method_config
        assert (mc["n_ctx"], mc["lambda_l1"], mc["lambda_kl"]) == (n_ctx, *BASE_TO_NOVEL[dataset]), dataset
        assert b2n.optim.epochs == 50 and b2n.optim.lr == 0.0025
    released = resolve_run_config("biomeddpt", dataset="kvasir", overrides=["method.variant=released"])
    assert released.method_config["class_token_position"] == "middle_released"
    assert released.method_config["lambda_l1"] == 25.0 and released.optim.epochs == 100
