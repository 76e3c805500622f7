"""ProGrad: the projection on literal numbers, the zero-shot teacher, the projected step, the released variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biomedap.methods import Batch, ProGradConfig, ZeroShotConfig, build_method
from biomedap.methods.prograd import project_conflicting

NAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def _features(backbone, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)


def _batch(backbone, n=8, seed=0):
    return Batch(labels=torch.arange(n) % len(NAMES), features=_features(backbone, n, seed))


# ------------------------------------------------------------------------------------ the projection


def test_projection_of_a_conflicting_gradient_literal():
    # ĝ = [-1, 1]/√2, ⟨g_ce, ĝ⟩ = -1/√2 < 0  ->  g = [1, 0] + (1/√2)·[-1, 1]/√2 = [0.5, 0.5]
    g = project_conflicting(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), 1.0)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.5]))
    # λ = 0.5 removes half of the conflicting component: [1, 0] + 0.5·0.5·[-1, 1] = [0.75, 0.25]
    g = project_conflicting(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), 0.5)
    torch.testing.assert_close(g, torch.tensor([0.75, 0.25]))
    # The length of g_kd does not matter, only its direction.
    g = project_conflicting(torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 3.0]), 1.0)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.5]))
    # Works on any tensor shape (a [2, 2] context): [[2, 0], [0, 0]] against [[-1, 0], [0, 1]]
    # ĝ = [[-1, 0], [0, 1]]/√2, ⟨g_ce, ĝ⟩ = -2/√2 -> g = g_ce + [[-1, 0], [0, 1]] = [[1, 0], [0, 1]]
    g = project_conflicting(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_projection_leaves_agreeing_orthogonal_and_zero_cases_unchanged():
    g_ce = torch.tensor([1.0, 0.0])
    for g_kd in ([1.0, 1.0], [0.0, 5.0], [0.0, 0.0]):  # agreeing, orthogonal, zero
        g = project_conflicting(g_ce, torch.tensor(g_kd), 1.0)
        assert torch.equal(g, g_ce), g_kd
    g = project_conflicting(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), 1.0)
    assert torch.isfinite(g).all() and torch.equal(g, torch.zeros(2))


# ------------------------------------------------------------------------------------ the teacher


def test_teacher_is_the_zero_shot_model_and_the_student_moves_away(tiny_backbone):
    method = build_method("prograd", tiny_backbone, NAMES, {"template": "a scan of a {}"})
    zeroshot = build_method("zeroshot", tiny_backbone, NAMES, ZeroShotConfig(templates=("a scan of a {}",)))
    f = _features(tiny_backbone, 6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_logits(f), zeroshot(Batch(features=f)), atol=1e-6, rtol=1e-6)
    method.train()
    method.train_step(_batch(tiny_backbone), torch.optim.SGD(method.trainable_parameters(), lr=1.0))
    method.eval()
    with torch.no_grad():
        student = method(Batch(features=f))
        teacher = method.teacher_logits(f)
    assert not torch.allclose(student, teacher, atol=1e-3)
    torch.testing.assert_close(teacher, zeroshot(Batch(features=f)), atol=1e-6, rtol=1e-6)  # fixed
    assert not any("zs_text" in k for k in method.learned_state())


def test_distillation_gradient_is_nonzero_and_is_the_gradient_of_l_kd(tiny_backbone):
    t = 2.0
    method = build_method("prograd", tiny_backbone, NAMES, {"ctx_init": None, "temperature": t}, seed=5)
    batch = _batch(tiny_backbone)
    losses, _, g_kd = method.gradients(batch)
    assert float(g_kd[0].norm()) > 1e-3
    # Against autograd of the formula written out: T² · mean_i Σ_c −p^t log p^s at temperature T.
    student = tiny_backbone.logit_scale * batch.features @ method.text_features().t()
    teacher = method.teacher_logits(batch.features)
    kd = t * t * (-(F.softmax(teacher / t, -1) * F.log_softmax(student / t, -1)).sum(-1)).mean()
    (expected,) = torch.autograd.grad(kd, [method.ctx])
    torch.testing.assert_close(losses["kd"], kd.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_kd[0], expected, atol=1e-6, rtol=1e-4)


def test_student_equal_to_teacher_gives_exactly_zero_distillation_gradient(tiny_backbone):
    """Context from 'a photo of a' = the teacher's prompt: g_kd is exactly 0, no projection, a CoOp step."""
    prograd = build_method("prograd", tiny_backbone, NAMES)
    coop = build_method("coop", tiny_backbone, NAMES)
    batch = _batch(tiny_backbone)
    _, _, g_kd = prograd.gradients(batch)
    assert torch.count_nonzero(g_kd[0]) == 0
    out = prograd.train_step(batch, torch.optim.SGD(prograd.trainable_parameters(), lr=1.0))
    coop.train_step(batch, torch.optim.SGD(coop.trainable_parameters(), lr=1.0))
    assert out["projected"] == 0.0 and torch.isfinite(prograd.ctx).all()
    assert torch.equal(prograd.ctx, coop.ctx)


# ------------------------------------------------------------------------------------ the step


def _setup(backbone, conflicting=True):
    """Random context; labels the teacher finds least likely (CE and distillation disagree: cos ≈ -0.7
    for this seed) or most likely (they agree)."""
    method = build_method("prograd", backbone, NAMES, {"ctx_init": None, "temperature": 1.0}, seed=3)
    f = _features(backbone, 8, seed=6)
    with torch.no_grad():
        teacher = method.teacher_logits(f)
    labels = teacher.argmin(-1) if conflicting else teacher.argmax(-1)
    return method, Batch(labels=labels, features=f)


def _hand_gradients(method, batch):
    student = method.logit_scale * batch.features @ method.text_features().t()
    teacher = method.logit_scale * batch.features @ method.zs_text_features.t()
    ce = F.cross_entropy(student, batch.labels)
    kd = -(F.softmax(teacher, -1) * F.log_softmax(student, -1)).sum(-1).mean()  # T = 1
    (g_ce,) = torch.autograd.grad(ce, [method.ctx], retain_graph=True)
    (g_kd,) = torch.autograd.grad(kd, [method.ctx])
    return g_ce, g_kd


def test_step_moves_the_context_by_minus_lr_times_the_projected_gradient(tiny_backbone):
    method, batch = _setup(tiny_backbone)
    g_ce, g_kd = _hand_gradients(method, batch)
    unit = g_kd / g_kd.norm()
    dot = (g_ce * unit).sum()
    assert dot < 0, "the set-up must produce conflicting gradients"
    g = g_ce - 1.0 * dot * unit  # λ = 1
    assert abs(float((g * unit).sum())) < 1e-5 * float(g_ce.norm())  # nothing left against g_kd

    before = method.ctx.detach().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)
    out = method.train_step(batch, optimizer)
    moved = method.ctx.detach() - before
    assert out["projected"] == 1.0
    torch.testing.assert_close(moved, -g, atol=1e-5 * float(g.abs().max()), rtol=1e-4)
    assert not torch.allclose(moved, -g_ce, atol=1e-3 * float(g_ce.abs().max()))  # the projection mattered


def test_agreeing_gradients_step_with_plain_ce(tiny_backbone):
    method, batch = _setup(tiny_backbone, conflicting=False)
    g_ce, g_kd = _hand_gradients(method, batch)
    assert (g_ce * g_kd).sum() > 0
    before = method.ctx.detach().clone()
    out = method.train_step(batch, torch.optim.SGD(method.trainable_parameters(), lr=1.0))
    assert out["projected"] == 0.0
    torch.testing.assert_close(method.ctx.detach() - before, -g_ce, atol=1e-6, rtol=1e-5)


def test_projection_weight_and_grad_clip_apply(tiny_backbone):
    method, batch = _setup(tiny_backbone)
    method.config.projection_weight = 0.5
    g_ce, g_kd = _hand_gradients(method, batch)
    unit = g_kd / g_kd.norm()
    g = g_ce - 0.5 * (g_ce * unit).sum() * unit
    before = method.ctx.detach().clone()
    clip = 0.1 * float(g.norm())
    method.train_step(batch, torch.optim.SGD(method.trainable_parameters(), lr=1.0), grad_clip=clip)
    moved = method.ctx.detach() - before
    # Clipping rescales the projected gradient to norm `clip`.
    torch.testing.assert_close(moved, -g * clip / g.norm(), atol=1e-5 * clip, rtol=1e-4)


def test_released_variant_is_exactly_the_coop_step(tiny_backbone):
    config = {"ctx_init": None, "n_ctx": 4}
    released = build_method("prograd", tiny_backbone, NAMES, {**config, "variant": "released", "temperature": 4.0},
                            seed=2)
    coop = build_method("coop", tiny_backbone, NAMES, config, seed=2)
    assert torch.equal(released.ctx, coop.ctx)
    batch = _batch(tiny_backbone, seed=9)
    for method in (released, coop):
        opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):  # two steps: momentum is exercised too
            out = method.train_step(batch, opt)
    assert torch.equal(released.ctx, coop.ctx)
    assert not torch.equal(released.ctx, build_method("coop", tiny_backbone, NAMES, config, seed=2).ctx)
    # The paper variant from the same state takes a different step (the projection fires here).
    paper = build_method("prograd", tiny_backbone, NAMES, {**config, "temperature": 4.0}, seed=2)
    paper.train_step(batch, torch.optim.SGD(paper.trainable_parameters(), lr=0.002, momentum=0.9,
                                            weight_decay=5e-4))
    released_once = build_method("prograd", tiny_backbone, NAMES, {**config, "variant": "released"}, seed=2)
    out = released_once.train_step(batch, torch.optim.SGD(released_once.trainable_parameters(), lr=0.002,
                                                           momentum=0.9, weight_decay=5e-4))
    assert out["projected"] == 0.0 and out["kd"] == 0.0
    assert set(out) == {"loss", "ce", "kd", "projected"}


def test_config_validation():
    for kwargs, option in (({"temperature": 0.0}, "temperature"), ({"projection_weight": -0.1}, "projection_weight"),
                           ({"template": "no slot"}, "template"), ({"variant": "other"}, "variant")):
        with pytest.raises(ValueError, match=option):
            ProGradConfig(**kwargs)


def test_preset_temperature_table_and_variant():
    from biomedap.config import load_preset, resolve_run_config

    published = {"BTMRI": 2.0, "BUSI": 0.25, "CHMNIST": 1.0, "COVID_19": 1.0, "CTKidney": 1.0, "DermaMNIST": 4.0,
                 "KneeXray": 1.0, "Kvasir": 1.0, "LungColon": 1.0, "OCTMNIST": 1.0, "RETINA": 1.0}
    for dataset, t in published.items():
        assert load_preset("prograd", dataset)["method_config"]["temperature"] == t, dataset
    run = resolve_run_config("prograd", dataset="dermamnist")
    assert (run.optim.lr, run.optim.epochs, run.optim.batch_size) == (0.002, 100, 128)
    assert run.method_config["variant"] == "paper" and run.method_config["projection_weight"] == 1.0
    released = resolve_run_config("prograd", dataset="busi", overrides=["method.variant=released"])
    assert released.method_config["variant"] == "released" and released.optim.batch_size == 128
    assert math.isclose(released.method_config["temperature"], 0.25)
