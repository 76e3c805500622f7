"""KgCoOp: the knowledge-guided regulariser against a hand computation, its anchor, the W table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, KgCoOpConfig, build_method
from biomedap.methods._prompting import insert_context

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _batch(backbone, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)
    return Batch(labels=torch.arange(n) % len(NAMES), features=features)


def test_regulariser_is_zero_at_init_and_positive_after_a_step(tiny_backbone):
    method = build_method("kgcoop", tiny_backbone, NAMES, {"kg_weight": 8.0, "template": "a photo of a {}."})
    batch = _batch(tiny_backbone)
    with torch.no_grad():
        losses = method.training_step(batch)
    # Context from "a photo of a" + template "a photo of a {}." = the same prompt: nothing to pull back.
    assert abs(float(losses["kg"])) <= 1e-6
    method.train()
    out = method.train_step(batch, torch.optim.SGD(method.trainable_parameters(), lr=0.5))
    method.eval()
    assert abs(out["loss"] - out["ce"] - out["kg"]) < 1e-6
    assert float(method.training_step(batch)["kg"].detach()) > 1e-6


def test_loss_matches_a_hand_computation_on_random_context(tiny_backbone):
    w = 3.0
    template = "a scan of a {}"
    method = build_method("kgcoop", tiny_backbone, NAMES, {"ctx_init": None, "kg_weight": w, "template": template},
                          seed=7)
    batch = _batch(tiny_backbone, seed=1)
    with torch.no_grad():
        embeds = insert_context(method.token_embeds, method.ctx, method.ctx_positions)
        student = tiny_backbone.encode_text_embeddings(embeds, method.attention_mask)
        student = student / student.norm(dim=-1, keepdim=True)
        teacher = tiny_backbone.encode_text([template.format(n) for n in NAMES])
        teacher = teacher / teacher.norm(dim=-1, keepdim=True)
        cos = (student * teacher).sum(-1)
        kg = w * (1 - cos.mean())
        ce = F.cross_entropy(tiny_backbone.logit_scale * batch.features @ student.t(), batch.labels)
        losses = method.training_step(batch)
    assert float(kg) > 0.01  # random context: far from the anchor, so the check is not 0 == 0
    torch.testing.assert_close(losses["kg"], kg, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses["ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["loss"], ce + kg, atol=1e-5, rtol=1e-5)


def test_anchor_is_rebuilt_for_new_classes_and_never_saved(tiny_backbone):
    method = build_method("kgcoop", tiny_backbone, NAMES)
    assert not any("zs_text" in k for k in method.learned_state())
    novel = ["normal kidney", "kidney stone", "cyst kidney"]
    method.set_classnames(novel)
    with torch.no_grad():
        expected = F.normalize(tiny_backbone.encode_text([f"a photo of a {n}." for n in novel]), dim=-1)
    torch.testing.assert_close(method.zs_text_features, expected, atol=1e-6, rtol=1e-6)
    assert float(method.training_step(_batch(tiny_backbone, n=3))["kg"].detach()) <= 1e-6


def test_config_validation():
    with pytest.raises(ValueError, match="kg_weight"):
        KgCoOpConfig(kg_weight=-1.0)
    with pytest.raises(ValueError, match="template"):
        KgCoOpConfig(template="a photo of a")
    assert "W/2" in KgCoOpConfig.__dataclass_fields__["kg_weight"].metadata["help"]


def test_preset_w_table():
    from biomedap.config import load_preset, resolve_run_config

    published = {"BTMRI": 2.0, "BUSI": 10.0, "CHMNIST": 1.0, "COVID_19": 1.0, "CTKidney": 8.0, "DermaMNIST": 8.0,
                 "KneeXray": 4.0, "Kvasir": 6.0, "LungColon": 8.0, "OCTMNIST": 1.0, "RETINA": 1.0}
    for dataset, w in published.items():
        assert load_preset("kgcoop", dataset)["method_config"]["kg_weight"] == w, dataset
    run = resolve_run_config("kgcoop", dataset="kvasir")
    assert (run.optim.lr, run.optim.epochs, run.optim.batch_size) == (0.002, 100, 128)
    assert run.method_config["kg_weight"] == 6.0
    b2n = resolve_run_config("kgcoop", dataset="kvasir", overrides=["method.kg_weight=8.0", "optim.epochs=50"])
    assert b2n.method_config["kg_weight"] == 8.0 and b2n.optim.epochs == 50
