"""One matrix over the method registry: every method passes the same contract checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from biomedap.methods import Batch, TrainingData, build_method, get_method, list_methods

CLASSNAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
METHOD_NAMES = [cls.name for cls in list_methods()]


def _features(backbone, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)


def _pixels(backbone, n, seed):
    g = torch.Generator().manual_seed(seed)
    size = backbone.preprocess.size
    return torch.randn(n, 3, size, size, generator=g)


def _batch(backbone, n=8, seed=0, name=None):
    """Features for feature-space methods; pixels for token-space methods (``name`` decides)."""
    labels = torch.arange(n) % len(CLASSNAMES)
    if name is not None and get_method(name).input_kind == "tokens":
        return Batch(labels=labels, pixels=_pixels(backbone, n, seed))
    return Batch(labels=labels, features=_features(backbone, n, seed))


def _training_data(backbone):
    from biomedap.config import OptimConfig

    train = _batch(backbone, n=16, seed=123)
    val = _batch(backbone, n=8, seed=321)
    views = torch.stack([train.features, _features(backbone, 16, seed=124)])
    return TrainingData(train.features, train.labels, views=views, val_features=val.features,
                        val_labels=val.labels, optim=OptimConfig(epochs=2, batch_size=8), seed=0,
                        train_eval_features=train.features)


def _prepared(name, backbone, seed=0):
    """A method set up as a run would: prepare(), then finalize() (no gradient training here)."""
    method = build_method(name, backbone, CLASSNAMES, seed=seed)
    data = _training_data(backbone)
    method.prepare(data)
    method.finalize(data)
    return method


def test_registry_is_not_empty_and_names_are_unique():
    assert {"zeroshot", "coop"} <= set(METHOD_NAMES)
    assert len(METHOD_NAMES) == len(set(METHOD_NAMES))
    for cls in list_methods():
        assert cls.summary, f"{cls.name} has no summary"
        assert cls.input_kind in ("features", "tokens")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_forward_shape_and_finite_loss(name, tiny_backbone):
    method = _prepared(name, tiny_backbone)
    batch = _batch(tiny_backbone, name=name)
    logits = method(batch)
    assert logits.shape == (len(batch), len(CLASSNAMES))
    assert torch.isfinite(logits).all()
    losses = method.training_step(batch)
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_backbone_stays_frozen(name, tiny_backbone):
    build_method(name, tiny_backbone, CLASSNAMES)
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_step_changes_only_trainable_tensors(name, tiny_backbone):
    method = _prepared(name, tiny_backbone)
    if not method.trainable:
        assert method.trainable_parameters() == []
        return
    trainable = dict((n, p) for n, p in method.named_parameters() if p.requires_grad)
    assert trainable, f"{name} declares itself trainable but has no trainable tensors"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen_before = {n: v.detach().clone() for n, v in tiny_backbone.model.state_dict().items()}
    method.train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1.0)
    method.train_step(_batch(tiny_backbone, name=name), optimizer)
    method.eval()
    for n, p in trainable.items():
        assert not torch.equal(before[n], p.detach()), f"{name}: trainable tensor {n} did not change"
    for n, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(frozen_before[n], v), f"{name}: backbone tensor {n} changed"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_save_load_identical_logits_and_exact_keys(name, tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    method = _prepared(name, tiny_backbone, seed=0)
    if method.trainable:  # move away from the initialisation so a reload cannot pass by accident
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
        method.train()
        method.train_step(_batch(tiny_backbone, name=name), optimizer)
        method.eval()
    state = method.learned_state()
    declared = {n for n, p in method.named_parameters() if p.requires_grad}
    declared |= {n for n, _ in method.named_buffers() if n in method.state_dict()}
    assert set(state) == declared
    save_file(state, tmp_path / "state.safetensors")

    other = build_method(name, tiny_backbone, CLASSNAMES, seed=99)
    other.load_learned_state(load_file(tmp_path / "state.safetensors"))
    other.eval()
    batch = _batch(tiny_backbone, seed=5, name=name)
    with torch.no_grad():
        assert torch.equal(method(batch), other(batch))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_unseen_classes(name, tiny_backbone):
    method = _prepared(name, tiny_backbone)
    novel = ["normal kidney", "kidney stone", "cyst kidney"]
    if method.supports_unseen_classes:
        method.set_classnames(novel)
        assert method(_batch(tiny_backbone, name=name)).shape == (8, 3)
    else:
        with pytest.raises(ValueError, match="cannot"):
            method.set_classnames(novel)


@pytest.fixture(scope="module")
def cache_from_other_process(tmp_path_factory, synthetic_splits):
    """Test-split features written by a separate Python process into a fresh cache."""
    cache_dir = tmp_path_factory.mktemp("xproc-cache")
    paths = [s.path for s in synthetic_splits.test[:6]]
    script = textwrap.dedent(f"""
        import json, sys
        from biomedap.backbone import build_tiny_backbone
        from biomedap.features import FeatureCache, encode_samples
        paths = json.loads(sys.argv[1])
        encode_samples(build_tiny_backbone(seed=0), paths, cache=FeatureCache({str(cache_dir)!r}))
    """)
    subprocess.run([sys.executable, "-c", script, json.dumps(paths)], check=True, timeout=300)
    return cache_dir, paths


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_cached_and_pixel_paths_agree(name, tiny_backbone, cache_from_other_process):
    from biomedap.data.transforms import build_eval_transform, load_image
    from biomedap.features import FeatureCache, encode_samples

    cache_dir, paths = cache_from_other_process
    cache = FeatureCache(cache_dir)
    calls = []
    original = tiny_backbone.encode_image
    tiny_backbone.encode_image = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        features = encode_samples(tiny_backbone, paths, cache=cache)
    finally:
        del tiny_backbone.encode_image  # drop the instance attribute: the class method shows through again
    assert calls == [], "the cache built by the other process was not used"

    transform = build_eval_transform(tiny_backbone.preprocess)
    pixels = torch.stack([transform(load_image(p)) for p in paths])
    method = _prepared(name, tiny_backbone)
    method.eval()
    cached = Batch(features=features)
    if method.input_kind == "tokens":  # tokens entering the method's first learned block, via the cache
        from biomedap.features import TokenPrefix

        prefix = TokenPrefix(method.prefix_block, method.prefix_fingerprint(), method.prefix_hook())
        encode_samples(tiny_backbone, paths, cache=cache, prefix=prefix)
        tiny_backbone.encode_image_prefix, original_prefix = (
            lambda *a, **k: calls.append(1) or original_prefix(*a, **k)), tiny_backbone.encode_image_prefix
        try:
            cached = Batch(tokens=encode_samples(tiny_backbone, paths, cache=cache, prefix=prefix))
        finally:
            del tiny_backbone.encode_image_prefix
        assert calls == [], "cached tokens were encoded again"
    with torch.no_grad():
        from_cache = method(cached)
        from_pixels = method(Batch(pixels=pixels))
    torch.testing.assert_close(from_cache, from_pixels, atol=1e-5, rtol=1e-5)
