"""Preprocessing equals open_clip; seeded augmentation is reproducible; images decode or fail clearly."""

import math

import numpy as np
import open_clip.transform
import pytest
import torch
from PIL import Image

from biomedap.data import (
    DASSL_AUGMENT,
    LP_AUGMENT,
    NO_AUGMENT,
    AugmentSpec,
    InvalidOptionError,
    PreprocessConfig,
    UnreadableImageError,
    apply_train_transform,
    augmented_view,
    build_eval_transform,
    build_train_transform,
    load_image,
    random_resized_crop_params,
    view_seed,
)


def _noise_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if channels == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels, mode=mode)


ODD_IMAGES = [
    _noise_image(97, 61, "RGB", 0),
    _noise_image(61, 203, "L", 1),
    _noise_image(130, 50, "RGBA", 2),
    _noise_image(31, 31, "RGB", 3),  # upsampled
    _noise_image(70, 33, "RGB", 7),  # odd padding in "longest" mode
]


@pytest.mark.parametrize("resize_mode,size", [("shortest", 224), ("squash", 48), ("longest", 48)])
def test_eval_transform_equals_open_clip_exactly(resize_mode, size):
    pre = PreprocessConfig(size=size, resize_mode=resize_mode, fill_color=0)
    ours = build_eval_transform(pre)
    theirs = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(
            size=size, mean=pre.mean, std=pre.std, interpolation="bicubic", resize_mode=resize_mode
        ),
        is_train=False,
    )
    for image in ODD_IMAGES:
        a, b = ours(image), theirs(image)
        assert a.shape == (3, size, size)
        difference = (a - b).abs().max().item()
        assert difference == 0.0, f"{resize_mode} differs on a {image.mode} {image.size} image"


def test_eval_transform_equals_open_clip_bilinear():
    pre = PreprocessConfig(size=40, interpolation="bilinear")
    theirs = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(size=40, interpolation="bilinear"), is_train=False
    )
    for image in ODD_IMAGES:
        assert torch.equal(build_eval_transform(pre)(image), theirs(image))


def test_preprocess_defaults_and_round_trip():
    pre = PreprocessConfig()
    assert pre.size == 224 and pre.interpolation == "bicubic" and pre.resize_mode == "shortest"
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073)
    assert pre.std == (0.26862954, 0.26130258, 0.27577711)
    assert PreprocessConfig.from_dict(pre.to_dict()) == pre
    # The fingerprint enters cache keys: it must never change for the same config.
    assert pre.fingerprint() == "68bbb52c0f4d0517"
    assert PreprocessConfig(size=256).fingerprint() != pre.fingerprint()


def test_preprocess_from_open_clip_cfg_dict():
    cfg = {"size": (224, 224), "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
           "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}
    pre = PreprocessConfig.from_dict(cfg)
    assert pre.size == 224 and pre.mean == (0.5, 0.5, 0.5) and pre.resize_mode == "squash"


@pytest.mark.parametrize(
    "kwargs,option",
    [({"size": 0}, "size"), ({"mean": (0.5, 0.5)}, "mean"), ({"std": (1, 0, 1)}, "std"),
     ({"interpolation": "nearest"}, "interpolation"), ({"resize_mode": "crop"}, "resize_mode")],
)
def test_preprocess_rejects_bad_values_naming_the_option(kwargs, option):
    with pytest.raises(InvalidOptionError, match=f"PreprocessConfig.{option}"):
        PreprocessConfig(**kwargs)


def test_preprocess_from_dict_rejects_unknown_keys_and_non_square():
    with pytest.raises(InvalidOptionError, match="sise"):
        PreprocessConfig.from_dict({"sise": 224})
    with pytest.raises(InvalidOptionError, match="square"):
        PreprocessConfig.from_dict({"size": (224, 256)})


def test_augment_presets():
    assert DASSL_AUGMENT == AugmentSpec("random_resized_crop", (0.08, 1.0), (3 / 4, 4 / 3), False, "bicubic")
    assert LP_AUGMENT.scale == (0.5, 1.0) and LP_AUGMENT.hflip is True
    assert NO_AUGMENT.kind == "none"
    fingerprints = {DASSL_AUGMENT.fingerprint(), LP_AUGMENT.fingerprint(), NO_AUGMENT.fingerprint()}
    assert len(fingerprints) == 3
    assert DASSL_AUGMENT.fingerprint() == "1e1b592a60f6dc3b"  # stable across versions (cache keys)
    assert AugmentSpec(kind="none", scale=(0.3, 1.0)).fingerprint() == NO_AUGMENT.fingerprint()
    for spec in (DASSL_AUGMENT, LP_AUGMENT, NO_AUGMENT):
        assert AugmentSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kwargs,match",
    [({"kind": "autoaugment"}, "AugmentSpec.kind"), ({"scale": (0.9, 0.1)}, "AugmentSpec.scale"),
     ({"ratio": (0, 1)}, "AugmentSpec.ratio"), ({"kind": "none", "hflip": True}, "hflip"),
     ({"hflip": 0.5}, "AugmentSpec.hflip")],
)
def test_augment_rejects_bad_values(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        AugmentSpec(**kwargs)


def test_augmented_view_is_reproducible_and_seed_dependent():
    pre = PreprocessConfig(size=32)
    image = ODD_IMAGES[0]
    a = augmented_view(image, DASSL_AUGMENT, pre, seed=11)
    b = augmented_view(image, DASSL_AUGMENT, pre, seed=11)
    c = augmented_view(image, DASSL_AUGMENT, pre, seed=12)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augmented_view_leaves_global_rng_alone():
    state = torch.get_rng_state()
    augmented_view(ODD_IMAGES[1], LP_AUGMENT, PreprocessConfig(size=32), seed=3)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("aug", [DASSL_AUGMENT, LP_AUGMENT], ids=["dassl", "lp"])
def test_augmented_view_equals_torchvision_under_the_same_seed(aug):
    """Our private-generator draws are torchvision's draws: same seed, same crop and flip."""
    pre = PreprocessConfig(size=32)
    pipeline = build_train_transform(aug, pre)
    for seed in range(12):
        for image in ODD_IMAGES[:3]:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                expected = pipeline(image)
            assert torch.equal(augmented_view(image, aug, pre, seed), expected)


def test_apply_train_transform_consumes_a_given_generator():
    pre = PreprocessConfig(size=32)
    generator = torch.Generator().manual_seed(5)
    first = apply_train_transform(ODD_IMAGES[0], DASSL_AUGMENT, pre, generator)
    second = apply_train_transform(ODD_IMAGES[0], DASSL_AUGMENT, pre, generator)
    assert not torch.equal(first, second)  # the stream moved on
    assert torch.equal(first, augmented_view(ODD_IMAGES[0], DASSL_AUGMENT, pre, 5))


def test_no_augment_is_the_eval_transform():
    pre = PreprocessConfig(size=32)
    image = ODD_IMAGES[2]
    expected = build_eval_transform(pre)(image)
    assert torch.equal(augmented_view(image, NO_AUGMENT, pre, 0), expected)
    assert torch.equal(build_train_transform(NO_AUGMENT, pre)(image), expected)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0), (0.3, 0.4)])
def test_random_resized_crop_respects_scale_and_ratio(scale):
    width, height = 300, 200
    ratio = (3 / 4, 4 / 3)
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_params(width, height, scale, ratio, generator)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fraction = h * w / (width * height)
        # Rounding of the side lengths moves the area by at most one pixel row/column.
        slack = (h + w + 1) / (width * height)
        assert scale[0] - slack <= fraction <= scale[1] + slack
        assert ratio[0] * (1 - 2 / min(h, w)) <= w / h <= ratio[1] * (1 + 2 / min(h, w))


def test_view_seed_is_stable_and_distinct():
    assert view_seed(1, 0, "abc") == 6168675239104665101
    assert view_seed(1, 0, 7) == 8209637962171198933
    seeds = {view_seed(s, v, i) for s in range(3) for v in range(5) for i in ("a", "b", 0, 1)}
    assert len(seeds) == 3 * 5 * 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_load_image_converts_to_rgb(tmp_path):
    gray = _noise_image(20, 10, "L", 4)
    gray.save(tmp_path / "gray.png")
    rgba = _noise_image(20, 10, "RGBA", 5)
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "gray.png")
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    array = np.asarray(loaded)
    assert (array[..., 0] == np.asarray(gray)).all() and (array[..., 0] == array[..., 2]).all()
    assert load_image(str(tmp_path / "rgba.png")).mode == "RGB"


def test_load_image_scales_16_bit_grayscale(tmp_path):
    pixels = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded[0, :, 0].tolist() == [0, 1, 255, 128]


def test_load_image_garbage_raises_with_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(UnreadableImageError) as info:
        load_image(bad)
    assert str(bad) in str(info.value)


def test_load_image_truncated_raises_with_path(tmp_path):
    good = tmp_path / "good.png"
    _noise_image(64, 64, "RGB", 6).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        load_image(cut)


def test_load_image_missing_raises_with_path(tmp_path):
    with pytest.raises(UnreadableImageError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


def test_train_transform_output_and_flip_matter():
    pre = PreprocessConfig(size=24)
    image = ODD_IMAGES[0]
    out = build_train_transform(LP_AUGMENT, pre)(image)
    assert out.shape == (3, 24, 24) and math.isfinite(out.abs().sum().item())
    # With hflip some seeds flip and some do not: views differ from the no-flip spec on some seed.
    no_flip = AugmentSpec(scale=LP_AUGMENT.scale, hflip=False)
    differs = [
        not torch.equal(augmented_view(image, LP_AUGMENT, pre, s), augmented_view(image, no_flip, pre, s))
        for s in range(8)
    ]
    assert any(differs) and not all(differs)


# ------------------------------------------------------------------ colour jitter and blur (BioVLM's strong view)

STRONG = AugmentSpec(hflip=True, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.8, blur_kernel=3, blur_p=0.5)


def test_new_photometric_fields_leave_existing_fingerprints_and_dicts_unchanged():
    # Pinned values computed before the photometric fields existed: cached features stay addressable.
    assert DASSL_AUGMENT.fingerprint() == "1e1b592a60f6dc3b"
    assert LP_AUGMENT.fingerprint() == "2c292a80ee9d8072"
    assert NO_AUGMENT.fingerprint() == "2ff9cdff091aef6f"
    assert AugmentSpec(scale=(0.3, 0.9), hflip=True, interpolation="bilinear").fingerprint() == "479b63e13b0a5433"
    assert set(LP_AUGMENT.to_dict()) == {"kind", "scale", "ratio", "hflip", "interpolation"}
    explicit_defaults = AugmentSpec(hflip=True, scale=(0.5, 1.0), color_jitter=None, color_jitter_p=1.0,
                                    blur_kernel=0, blur_sigma=(0.1, 2.0), blur_p=1.0)
    assert explicit_defaults == LP_AUGMENT and explicit_defaults.fingerprint() == LP_AUGMENT.fingerprint()


def test_photometric_fields_enter_fingerprint_and_round_trip():
    jitter_only = AugmentSpec(hflip=True, color_jitter=(0.4, 0.4, 0.4, 0.1))
    blur_only = AugmentSpec(hflip=True, blur_kernel=3)
    prints = {s.fingerprint() for s in (AugmentSpec(hflip=True), jitter_only, blur_only, STRONG,
                                        AugmentSpec(hflip=True, blur_kernel=3, blur_p=0.5))}
    assert len(prints) == 5
    assert STRONG.to_dict()["color_jitter"] == [0.4, 0.4, 0.4, 0.1]
    for spec in (STRONG, jitter_only, blur_only):
        again = AugmentSpec.from_dict(spec.to_dict())
        assert again == spec and again.fingerprint() == spec.fingerprint()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"color_jitter": (0.4, 0.4, 0.4)}, "color_jitter"), ({"color_jitter": (0.4, -0.1, 0.4, 0.1)}, "color_jitter"),
     ({"color_jitter": (0.4, 0.4, 0.4, 0.6)}, "hue"), ({"color_jitter_p": 1.5}, "color_jitter_p"),
     ({"blur_p": -0.1}, "blur_p"), ({"blur_kernel": 4}, "blur_kernel"), ({"blur_kernel": -3}, "blur_kernel"),
     ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"), ({"kind": "none", "blur_kernel": 3}, "kind='random_resized_crop'"),
     ({"kind": "none", "color_jitter": (0.1, 0.1, 0.1, 0.0)}, "kind='random_resized_crop'")],
)
def test_photometric_fields_are_validated(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        AugmentSpec(**kwargs)


def test_photometric_view_is_deterministic_per_seed_and_leaves_global_rng_alone():
    pre = PreprocessConfig(size=32)
    image = ODD_IMAGES[0]
    state = torch.get_rng_state()
    views = [augmented_view(image, STRONG, pre, seed) for seed in range(6)]
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(v, augmented_view(image, STRONG, pre, seed)) for seed, v in enumerate(views))
    assert len({v.sum().item() for v in views}) == 6


@pytest.mark.parametrize("spec", [STRONG, AugmentSpec(color_jitter=(0.4, 0.0, 0.4, 0.1), color_jitter_p=0.5),
                                  AugmentSpec(blur_kernel=5, blur_sigma=(0.5, 1.5))],
                         ids=["strong", "jitter", "blur"])
def test_photometric_view_equals_torchvision_under_the_same_seed(spec):
    pre = PreprocessConfig(size=32)
    pipeline = build_train_transform(spec, pre)
    for seed in range(10):
        for image in ODD_IMAGES[:3]:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                expected = pipeline(image)
            assert torch.equal(augmented_view(image, spec, pre, seed), expected)


def test_jitter_and_blur_change_pixels_only_when_they_fire():
    pre = PreprocessConfig(size=32)
    image = ODD_IMAGES[0]
    plain = AugmentSpec(hflip=True)
    # The crop and flip are drawn first, so a never-applied jitter (p = 0) leaves the view as it was.
    never = AugmentSpec(hflip=True, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.0)
    always = AugmentSpec(hflip=True, color_jitter=(0.4, 0.4, 0.4, 0.1))
    blurred = AugmentSpec(hflip=True, blur_kernel=3)
    for seed in range(5):
        base = augmented_view(image, plain, pre, seed)
        assert torch.equal(augmented_view(image, never, pre, seed), base)
        assert not torch.equal(augmented_view(image, always, pre, seed), base)
        assert not torch.equal(augmented_view(image, blurred, pre, seed), base)
    # With p = 0.8 the jitter fires on some seeds and not on others (where the view is the plain one).
    sometimes = AugmentSpec(hflip=True, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.8)
    fired = [not torch.equal(augmented_view(image, sometimes, pre, s), augmented_view(image, plain, pre, s))
             for s in range(20)]
    assert 10 <= sum(fired) < 20
