"""The feature cache, proven by counting the images that actually go through the image tower."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from biomedap.data.transforms import DASSL_AUGMENT, AugmentSpec, build_eval_transform, load_image
from biomedap.features import FeatureCache, ViewSpec, encode_samples, train_views

N = 10  # images used by most tests (train split of the synthetic dataset)


class EncodeCounter:
    """Counts the images passed to ``backbone.encode_image``; can simulate a crash after k batches."""

    def __init__(self):
        self.batches: list[int] = []
        self.fail_after: int | None = None

    @property
    def images(self) -> int:
        return sum(self.batches)

    def reset(self) -> None:
        self.batches.clear()
        self.fail_after = None


@contextlib.contextmanager
def counting(backbone):
    """Wrap ``backbone.encode_image`` for the duration of the block; always restored."""
    counter = EncodeCounter()
    assert "encode_image" not in vars(backbone), "encode_image is already wrapped"
    original = backbone.encode_image

    def wrapped(pixels=None, *args, **kwargs):
        if counter.fail_after is not None and len(counter.batches) >= counter.fail_after:
            raise RuntimeError("simulated crash inside the image tower")
        counter.batches.append(int(pixels.shape[0]))
        return original(pixels, *args, **kwargs)

    backbone.encode_image = wrapped
    try:
        yield counter
    finally:
        del backbone.encode_image


@pytest.fixture
def count(tiny_backbone):
    with counting(tiny_backbone) as counter:
        yield counter


@pytest.fixture(scope="module")
def other_backbone():
    """Same architecture, different weights (seed 1): a different backbone fingerprint."""
    from biomedap.backbone import build_tiny_backbone

    return build_tiny_backbone(seed=1)


@pytest.fixture
def paths(synthetic_splits):
    return [s.path for s in synthetic_splits.train[:N]]


@pytest.fixture
def image_copies(synthetic_splits, tmp_path):
    """Private copies of a few images (the session dataset must not be modified)."""
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for k, sample in enumerate(synthetic_splits.train[:4]):
        out.append(Path(shutil.copy(sample.path, folder / f"img{k}.png")))
    return out


def _namespace_files(cache: FeatureCache, backbone) -> list[str]:
    namespace = cache.namespace(backbone, ViewSpec())
    return sorted(p.name for p in namespace.iterdir()) if namespace.is_dir() else []


def _manifests(cache: FeatureCache, backbone) -> list[Path]:
    return sorted(cache.namespace(backbone, ViewSpec()).glob("shard-*.json"))


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --------------------------------------------------------------------------- one pass per image


def test_second_call_and_new_cache_object_encode_nothing(tiny_backbone, feature_cache, paths, count):
    first = encode_samples(tiny_backbone, paths, cache=feature_cache, batch_size=4)
    assert count.images == N
    assert first.shape == (N, tiny_backbone.embed_dim)

    count.reset()
    again = encode_samples(tiny_backbone, paths, cache=feature_cache, batch_size=4)
    assert count.images == 0
    assert torch.equal(again, first)

    # Another process: a fresh FeatureCache object on the same root, no in-memory state.
    other = FeatureCache(feature_cache.root)
    from_disk = encode_samples(tiny_backbone, paths, cache=other, batch_size=4)
    assert count.images == 0
    assert torch.equal(from_disk, first)


def test_samples_and_paths_are_interchangeable(tiny_backbone, feature_cache, synthetic_splits, count):
    samples = synthetic_splits.train[:N]
    by_sample = encode_samples(tiny_backbone, samples, cache=feature_cache)
    by_path = encode_samples(tiny_backbone, [Path(s.path) for s in samples], cache=feature_cache)
    assert count.images == N
    assert torch.equal(by_sample, by_path)


def test_an_image_listed_twice_is_encoded_once(tiny_backbone, feature_cache, paths, count):
    features = encode_samples(tiny_backbone, [paths[0], paths[1], paths[0]], cache=feature_cache)
    assert count.images == 2
    assert torch.equal(features[0], features[2])
    count.reset()
    no_cache = encode_samples(tiny_backbone, [paths[0], paths[0]], cache=None)
    assert count.images == 1
    torch.testing.assert_close(no_cache[0], features[0], atol=1e-6, rtol=1e-6)  # other batch size


def test_bf16_request_on_cpu_shares_the_fp32_entries(tiny_backbone, feature_cache, paths, count):
    fp32 = encode_samples(tiny_backbone, paths[:2], cache=feature_cache)
    count.reset()
    bf16 = encode_samples(tiny_backbone, paths[:2], cache=feature_cache, precision="bf16")
    assert count.images == 0 and torch.equal(bf16, fp32)


# --------------------------------------------------------------------------- interruption


def test_interrupted_extraction_keeps_finished_shards_and_resumes(tiny_backbone, tmp_path, paths, count):
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    count.fail_after = 3  # batches of 2: the 4 images of batches 1-2 form a shard, batch 3 is lost
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_samples(tiny_backbone, paths, cache=cache, batch_size=2)
    assert count.images == 6

    # Exactly one committed shard (data + manifest) and nothing else: no temp files, no orphan data.
    files = _namespace_files(cache, tiny_backbone)
    assert len(files) == 2, files
    manifest = _manifests(cache, tiny_backbone)
    assert [m.name for m in manifest] == [f for f in files if f.endswith(".json")]
    assert manifest[0].with_suffix(".safetensors").name in files
    assert not any(f.startswith(".") or f.endswith(".tmp") for f in files)

    # The finished shard is readable and holds the first four images, and only those.
    namespace = cache.namespace(tiny_backbone, ViewSpec())
    keys = [cache.image_sha256(p) for p in paths]
    found = cache.lookup(namespace, keys)
    assert set(found) == set(keys[:4])
    assert json.loads(manifest[0].read_text())["count"] == 4

    # The rerun encodes exactly what is missing ...
    count.reset()
    resumed = encode_samples(tiny_backbone, paths, cache=FeatureCache(cache.root, shard_size=4), batch_size=2)
    assert count.images == N - 4

    # ... and ends where an uninterrupted extraction into a fresh cache ends.
    count.reset()
    clean = encode_samples(tiny_backbone, paths, cache=FeatureCache(tmp_path / "clean", shard_size=4),
                           batch_size=2)
    assert count.images == N
    assert torch.equal(resumed, clean)
    for k in range(4):  # the stored raw features of the finished shard are the clean ones too
        raw = encode_samples(tiny_backbone, paths[k:k + 1], cache=None, normalize=False)[0]
        torch.testing.assert_close(found[keys[k]], raw, atol=1e-6, rtol=0)


def test_crash_between_shard_data_and_manifest_hides_the_shard(tiny_backbone, tmp_path, paths, count):
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    reference = encode_samples(tiny_backbone, paths, cache=cache, batch_size=2)
    manifests = _manifests(cache, tiny_backbone)
    assert sorted(json.loads(m.read_text())["count"] for m in manifests) == [2, 4, 4]

    # The process died after writing the .safetensors but before its manifest (the commit point).
    lost = manifests[0]
    lost_keys = json.loads(lost.read_text())["keys"]
    lost.unlink()
    assert lost.with_suffix(".safetensors").is_file()

    fresh = FeatureCache(cache.root, shard_size=4)
    namespace = fresh.namespace(tiny_backbone, ViewSpec())
    assert not set(fresh.lookup(namespace, lost_keys)), "an uncommitted shard must not be visible"
    assert fresh.stats()[tiny_backbone.identity.fingerprint]["entries"] == N - len(lost_keys)

    count.reset()
    again = encode_samples(tiny_backbone, paths, cache=fresh, batch_size=2)
    assert count.images == len(lost_keys)
    assert torch.equal(again, reference)
    count.reset()
    encode_samples(tiny_backbone, paths, cache=FeatureCache(cache.root), batch_size=2)
    assert count.images == 0


def test_failed_shard_write_leaves_no_partial_file(tiny_backbone, tmp_path, paths, count, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    saves = []

    def flaky_save(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 2:  # the second shard: half a file, then the disk fills up
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError("No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky_save)
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    with pytest.raises(OSError, match="No space"):
        encode_samples(tiny_backbone, paths, cache=cache, batch_size=2)
    files = _namespace_files(cache, tiny_backbone)
    assert len(files) == 2 and not any(f.startswith(".") or f.endswith(".tmp") for f in files), files

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    count.reset()
    encode_samples(tiny_backbone, paths, cache=FeatureCache(cache.root, shard_size=4), batch_size=2)
    assert count.images == N - 4


# --------------------------------------------------------------------------- storage format


def test_stored_fp32_returned_normalised_or_raw(tiny_backbone, feature_cache, paths):
    from safetensors import safe_open

    normalised = encode_samples(tiny_backbone, paths, cache=feature_cache)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised.norm(dim=-1), torch.ones(N), atol=1e-6, rtol=0)

    raw = encode_samples(tiny_backbone, paths, cache=feature_cache, normalize=False)
    assert raw.dtype == torch.float32
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(N), atol=1e-3), "raw features are not unit norm"
    torch.testing.assert_close(F.normalize(raw, dim=-1), normalised, atol=1e-7, rtol=0)

    shards = sorted(feature_cache.namespace(tiny_backbone, ViewSpec()).glob("shard-*.safetensors"))
    assert shards
    stored = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                stored[key] = handle.get_tensor(key)
    assert len(stored) == N
    assert all(t.dtype == torch.float32 and t.shape == (tiny_backbone.embed_dim,) for t in stored.values())
    keys = [feature_cache.image_sha256(p) for p in paths]
    assert torch.equal(torch.stack([stored[k] for k in keys]), raw)  # the cache keeps raw features


# --------------------------------------------------------------------------- keys: bytes, not paths


def test_copied_file_hits_and_changed_pixel_misses(
    tiny_backbone, feature_cache, image_copies, tmp_path, count
):
    first = encode_samples(tiny_backbone, image_copies, cache=feature_cache)
    assert count.images == len(image_copies)

    # Same bytes under another folder and name: a hit.
    elsewhere = tmp_path / "moved" / "renamed-copy.png"
    elsewhere.parent.mkdir()
    shutil.copy(image_copies[1], elsewhere)
    count.reset()
    moved = encode_samples(tiny_backbone, [elsewhere], cache=feature_cache)
    assert count.images == 0
    assert torch.equal(moved[0], first[1])
    moved_fresh = encode_samples(tiny_backbone, [elsewhere], cache=FeatureCache(feature_cache.root))
    assert count.images == 0
    assert torch.equal(moved_fresh[0], first[1])

    # One pixel changed, file rewritten in place: a miss, with the same cache object and a new one.
    target = image_copies[2]
    with Image.open(target) as image:
        image.load()
        edited = image.copy()
    x, y = 5, 7
    value = edited.getpixel((x, y))
    edited.putpixel((x, y), tuple(255 - c for c in value) if isinstance(value, tuple) else 255 - value)
    edited.save(target)
    count.reset()
    changed = encode_samples(tiny_backbone, image_copies, cache=feature_cache)
    assert count.images == 1
    assert not torch.equal(changed[2], first[2])
    for k in (0, 1, 3):
        assert torch.equal(changed[k], first[k])
    count.reset()
    changed_fresh = encode_samples(tiny_backbone, image_copies, cache=FeatureCache(feature_cache.root))
    assert count.images == 0
    assert torch.equal(changed_fresh, changed)


@pytest.mark.parametrize("racy_window", ["default", "none"])
def test_rewrite_with_same_size_and_mtime_is_not_served_stale(
    tiny_backbone, feature_cache, image_copies, count, monkeypatch, racy_window
):
    """A rewrite keeping size and mtime (same timestamp tick, ``cp -p``, ``rsync -a``) is still a miss.

    ``racy_window="none"`` disables the "recently modified, do not memoise" rule so that the memo
    itself is exercised (as for files older than a few seconds).
    """
    import biomedap.features as features_module

    if racy_window == "none":
        monkeypatch.setattr(features_module, "_RACY_NS", -(10**18))
    target = image_copies[0]
    first = encode_samples(tiny_backbone, [target], cache=feature_cache)
    before = os.stat(target)
    data = target.read_bytes()
    # Change one pixel, trying values until the re-encoded PNG has exactly the old size.
    with Image.open(target) as image:
        image.load()
        original = image.copy()
    rewritten = None
    for delta in range(1, 256):
        candidate = original.copy()
        value = candidate.getpixel((3, 3))
        new = tuple((c + delta) % 256 for c in value) if isinstance(value, tuple) else (value + delta) % 256
        candidate.putpixel((3, 3), new)
        candidate.save(target)
        if target.stat().st_size == len(data):
            rewritten = candidate
            break
    if rewritten is None:
        pytest.skip("could not produce a same-size PNG rewrite")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # same tick as the first write
    assert target.read_bytes() != data
    count.reset()
    again = encode_samples(tiny_backbone, [target], cache=feature_cache)
    assert count.images == 1, "stale memoised hash: the edited image was served from the cache"
    assert not torch.equal(again, first)


def test_image_hash_is_memoised_for_unchanged_files(tiny_backbone, feature_cache, paths, monkeypatch):
    import biomedap.features as features_module

    monkeypatch.setattr(features_module, "_RACY_NS", -(10**18))
    hashed = []
    real = features_module.bytes_sha256
    monkeypatch.setattr(features_module, "bytes_sha256", lambda data: hashed.append(1) or real(data))
    first = [feature_cache.image_sha256(p) for p in paths]
    assert len(hashed) == N
    assert [feature_cache.image_sha256(p) for p in paths] == first
    assert len(hashed) == N, "unchanged files were hashed again"


# --------------------------------------------------------------------------- keys: transform and backbone


def test_transform_view_and_backbone_change_the_key(
    tiny_backbone, other_backbone, feature_cache, paths, count
):
    n = 4
    imgs = paths[:n]
    eval_features = encode_samples(tiny_backbone, imgs, cache=feature_cache)
    assert count.images == n

    base = ViewSpec(DASSL_AUGMENT, seed=0, index=0)
    variants = {
        "augmented vs eval": base,
        "different augment scale": ViewSpec(AugmentSpec(scale=(0.5, 1.0)), seed=0, index=0),
        "different view index": ViewSpec(DASSL_AUGMENT, seed=0, index=1),
        "different seed": ViewSpec(DASSL_AUGMENT, seed=1, index=0),
    }
    results = {"eval": eval_features}
    for label, view in variants.items():
        count.reset()
        results[label] = encode_samples(tiny_backbone, imgs, view, cache=feature_cache)
        assert count.images == n, f"{label}: expected a miss"
    labels = list(results)
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            assert not torch.equal(results[labels[a]], results[labels[b]]), (labels[a], labels[b])

    # kind="none" is the eval transform: the same entries.
    count.reset()
    none_view = encode_samples(tiny_backbone, imgs, ViewSpec(AugmentSpec(kind="none"), seed=3, index=2),
                               cache=feature_cache)
    assert count.images == 0
    assert torch.equal(none_view, eval_features)

    # Another backbone (other weights): a miss, and other features.
    with counting(other_backbone) as other_count:
        other = encode_samples(other_backbone, imgs, cache=feature_cache)
        assert other_count.images == n
        assert count.images == 0
        assert not torch.equal(other, eval_features)
        encode_samples(other_backbone, imgs, cache=FeatureCache(feature_cache.root))
        assert other_count.images == n
    assert tiny_backbone.identity.fingerprint != other_backbone.identity.fingerprint
    assert set(FeatureCache(feature_cache.root).stats()) == {tiny_backbone.identity.fingerprint,
                                                           other_backbone.identity.fingerprint}


def test_same_augmented_view_is_identical_across_calls_and_positions(
    tiny_backbone, feature_cache, paths, count
):
    n = 4
    imgs = paths[:n]
    view = ViewSpec(DASSL_AUGMENT, seed=5, index=2)
    first = encode_samples(tiny_backbone, imgs, view, cache=feature_cache)
    assert count.images == n

    count.reset()
    again = encode_samples(tiny_backbone, imgs, ViewSpec(DASSL_AUGMENT, seed=5, index=2), cache=feature_cache)
    assert count.images == 0
    assert torch.equal(again, first)

    reordered = list(reversed(imgs))
    shuffled = encode_samples(tiny_backbone, reordered, view, cache=feature_cache)
    assert count.images == 0
    assert torch.equal(shuffled, first.flip(0))

    # The crop depends on the image content, not its position: recomputed without the cache,
    # at other positions and next to other images, the view is the same.
    recomputed = encode_samples(tiny_backbone, [paths[-1]] + reordered, view, cache=None)
    assert count.images == n + 1
    torch.testing.assert_close(recomputed[1:], first.flip(0), atol=1e-6, rtol=0)


def test_multi_view_shape_and_distinct_views(tiny_backbone, feature_cache, paths, count):
    views = [ViewSpec(DASSL_AUGMENT, 7, i) for i in range(3)]
    assert train_views(DASSL_AUGMENT, 7, 3) == views
    stacked = encode_samples(tiny_backbone, paths, views, cache=feature_cache)
    assert stacked.shape == (3, N, tiny_backbone.embed_dim)
    assert count.images == 3 * N
    eval_features = encode_samples(tiny_backbone, paths, cache=feature_cache)
    assert count.images == 4 * N
    for a in range(3):
        assert not torch.equal(stacked[a], eval_features)
        assert (stacked[a] - eval_features).norm(dim=-1).min() > 0  # every image's view differs
        for b in range(a + 1, 3):
            assert (stacked[a] - stacked[b]).norm(dim=-1).min() > 0

    # Each slice is the single-view result, served from the cache.
    count.reset()
    for i, view in enumerate(train_views(DASSL_AUGMENT, 7, 3)):
        assert torch.equal(encode_samples(tiny_backbone, paths, view, cache=feature_cache), stacked[i])
    also = encode_samples(tiny_backbone, paths, train_views(DASSL_AUGMENT, 7, 3),
                          cache=FeatureCache(feature_cache.root))
    assert count.images == 0
    assert torch.equal(also, stacked)


# --------------------------------------------------------------------------- stats, clear, no cache


def test_stats_and_clear(tiny_backbone, feature_cache, paths, count):
    assert feature_cache.stats() == {}
    encode_samples(tiny_backbone, paths, cache=feature_cache)
    encode_samples(tiny_backbone, paths[:3], ViewSpec(DASSL_AUGMENT, 0, 0), cache=feature_cache)
    stats = feature_cache.stats()
    fingerprint = tiny_backbone.identity.fingerprint
    assert set(stats) == {fingerprint}
    assert stats[fingerprint]["entries"] == N + 3
    assert stats[fingerprint]["bytes"] > (N + 3) * tiny_backbone.embed_dim * 4

    feature_cache.clear()
    assert feature_cache.stats() == {}
    assert _all_files(feature_cache.root) == []
    count.reset()
    encode_samples(tiny_backbone, paths, cache=feature_cache)
    assert count.images == N


def test_no_cache_stores_nothing_and_returns_the_same_features(
    tiny_backbone, feature_cache, paths, tmp_path, monkeypatch, count
):
    default_dir = tmp_path / "default-cache"
    monkeypatch.setenv("BIOMEDAP_CACHE", str(default_dir))
    uncached = encode_samples(tiny_backbone, paths, cache=None)
    uncached_again = encode_samples(tiny_backbone, paths, cache=None)
    assert count.images == 2 * N  # nothing is kept between calls
    assert _all_files(feature_cache.root) == []
    assert not default_dir.exists(), "cache=None must not fall back to the default cache"
    assert torch.equal(uncached, uncached_again)

    cached = encode_samples(tiny_backbone, paths, cache=feature_cache)
    from_disk = encode_samples(tiny_backbone, paths, cache=FeatureCache(feature_cache.root))
    torch.testing.assert_close(cached, uncached, atol=1e-7, rtol=0)
    torch.testing.assert_close(from_disk, uncached, atol=1e-7, rtol=0)


def test_cached_features_match_the_pixel_path(tiny_backbone, feature_cache, paths, count):
    encode_samples(tiny_backbone, paths, cache=feature_cache, batch_size=3)
    count.reset()
    cached = encode_samples(tiny_backbone, paths, cache=FeatureCache(feature_cache.root))
    assert count.images == 0
    transform = build_eval_transform(tiny_backbone.preprocess)
    with torch.no_grad():
        direct = torch.cat([tiny_backbone.encode_image(transform(load_image(p)).unsqueeze(0)) for p in paths])
    torch.testing.assert_close(cached, F.normalize(direct, dim=-1), atol=1e-6, rtol=0)


def test_clear_refuses_a_folder_that_is_not_a_cache(tmp_path):
    folder = tmp_path / "not-a-cache"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="does not look like a biomedap feature cache"):
        FeatureCache(folder).clear()
    assert (folder / "sub" / "thesis.tex").read_text() == "precious"


def test_worker_processes_give_the_same_features(tiny_backbone, tmp_path, paths):
    from biomedap.data.transforms import DASSL_AUGMENT

    views = [ViewSpec(), ViewSpec(DASSL_AUGMENT, 1, 0)]
    in_process = encode_samples(tiny_backbone, paths[:4], views, cache=None, batch_size=2)
    workers = encode_samples(tiny_backbone, paths[:4], views, cache=None, batch_size=2, num_workers=2)
    assert torch.equal(in_process, workers)
