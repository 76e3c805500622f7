"""Image decoding, preprocessing and training augmentation.

Two small frozen dataclasses describe everything that changes pixels:

* :class:`PreprocessConfig` — the backbone's evaluation preprocessing (size, mean/std,
  interpolation, resize mode), built by the backbone module from open_clip's preprocess config.
* :class:`AugmentSpec` — a training augmentation (part of each method's preset). Its
  :meth:`~AugmentSpec.fingerprint` enters feature-cache keys.

Reproducible augmented views
----------------------------
``build_train_transform`` returns an ordinary torchvision pipeline that draws from torch's global
RNG, which is what a DataLoader wants. The feature cache instead needs the *same* view of an image
every time it is asked for view ``v`` under seed ``s``, in any process and any order. For that use::

    seed = view_seed(run_seed, view_index, image_id)   # image_id: e.g. the file's sha256
    pixels = augmented_view(image, aug, pre, seed)

``augmented_view`` draws the crop (and flip, colour jitter and blur) from a private
``torch.Generator`` seeded with ``seed`` and never touches the global RNG. It consumes the
generator exactly like torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
``RandomApply([ColorJitter])`` + ``RandomApply([GaussianBlur])`` consume the global one, so
``augmented_view(img, aug, pre, s)`` equals ``build_train_transform(aug, pre)(img)`` run right
after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .errors import InvalidOptionError, UnreadableImageError

__all__ = [
    "DASSL_AUGMENT",
    "LP_AUGMENT",
    "NO_AUGMENT",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AugmentSpec",
    "PreprocessConfig",
    "apply_train_transform",
    "augmented_view",
    "build_eval_transform",
    "build_train_transform",
    "load_image",
    "random_resized_crop_params",
    "view_seed",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
_AUGMENT_KINDS = ("random_resized_crop", "none")
HFLIP_PROBABILITY = 0.5


def _fingerprint(payload: Mapping[str, Any]) -> str:
    """Short, stable hash of a JSON-able mapping (sorted keys; float repr is round-trip exact)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _float_tuple(value: Any, length: int, owner: str, option: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{owner}.{option} must be {length} numbers, got {value!r}.") from None
    if len(out) != length:
        raise InvalidOptionError(f"{owner}.{option} must have {length} numbers, got {len(out)}: {value!r}.")
    return out


def _check_interpolation(value: str, owner: str) -> None:
    if value not in _INTERPOLATIONS:
        raise InvalidOptionError(
            f"{owner}.interpolation={value!r} is not supported; use one of {sorted(_INTERPOLATIONS)}."
        )


def _from_dict(cls: type, data: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - set(ignore))
    if unknown:
        raise InvalidOptionError(
            f"{cls.__name__}.from_dict: unknown option(s) {unknown}; expected a subset of {sorted(known)}."
        )
    return {k: v for k, v in data.items() if k in known}


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation preprocessing of a backbone (what open_clip's ``preprocess_cfg`` describes).

    Attributes:
        size: side of the square model input.
        mean, std: per-channel normalisation (OpenAI CLIP statistics by default, as BiomedCLIP).
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        resize_mode: ``"shortest"`` (resize the shorter side to ``size``, then center crop — the
            BiomedCLIP / Dassl test transform), ``"longest"`` (fit the longer side, then pad with
            ``fill_color``) or ``"squash"`` (resize to ``size`` × ``size`` ignoring aspect).
        fill_color: padding value, used by ``"longest"`` only.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        owner = "PreprocessConfig"
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise InvalidOptionError(f"{owner}.size must be a positive int, got {self.size!r}.")
        object.__setattr__(self, "mean", _float_tuple(self.mean, 3, owner, "mean"))
        std = _float_tuple(self.std, 3, owner, "std")
        if any(s <= 0 for s in std):
            raise InvalidOptionError(f"{owner}.std must be positive, got {std}.")
        object.__setattr__(self, "std", std)
        _check_interpolation(self.interpolation, owner)
        if self.resize_mode not in _RESIZE_MODES:
            raise InvalidOptionError(
                f"{owner}.resize_mode={self.resize_mode!r} is not supported; "
                f"use one of {list(_RESIZE_MODES)}."
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessConfig":
        """Build from :meth:`to_dict` output or from open_clip's ``preprocess_cfg`` dict.

        open_clip's ``mode`` key is accepted when it is ``"RGB"``; a ``size`` given as a square
        ``(h, w)`` pair becomes an int.
        """
        mode = data.get("mode", "RGB")
        if mode != "RGB":
            raise InvalidOptionError(f"PreprocessConfig: only mode 'RGB' is supported, got {mode!r}.")
        kwargs = _from_dict(cls, data, ignore=("mode",))
        size = kwargs.get("size", 224)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise InvalidOptionError(f"PreprocessConfig.size must be square, got {size!r}.")
            kwargs["size"] = int(size[0])
        return cls(**kwargs)

    def fingerprint(self) -> str:
        """16 hex characters that change whenever the preprocessing changes (cache keys)."""
        return _fingerprint(self.to_dict())


@dataclass(frozen=True)
class AugmentSpec:
    """A training augmentation, serialisable and hashable into cache keys.

    Attributes:
        kind: ``"random_resized_crop"`` or ``"none"`` (``"none"`` = the evaluation transform).
        scale: area fraction range of the random crop (torchvision ``RandomResizedCrop.scale``).
        ratio: aspect-ratio range of the crop.
        hflip: add a horizontal flip with probability 0.5 after the crop.
        interpolation: resampling of the crop, ``"bicubic"`` or ``"bilinear"``.
        color_jitter: ``(brightness, contrast, saturation, hue)`` of a torchvision ``ColorJitter``
            applied after the flip (on the PIL image), or ``None`` (off).
        color_jitter_p: probability of applying the colour jitter (``RandomApply``).
        blur_kernel: odd kernel size of a ``GaussianBlur`` applied after the jitter; 0 = off.
        blur_sigma: range the blur's standard deviation is drawn from (torchvision's default).
        blur_p: probability of applying the blur (``RandomApply``).

    The photometric fields were added later: a spec that leaves them at their defaults has the
    same :meth:`to_dict` and :meth:`fingerprint` as before they existed (feature-cache keys stay valid).
    """

    kind: str = "random_resized_crop"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = False
    interpolation: str = "bicubic"
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_p: float = 1.0
    blur_kernel: int = 0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 1.0

    def __post_init__(self) -> None:
        owner = "AugmentSpec"
        if self.kind not in _AUGMENT_KINDS:
            raise InvalidOptionError(
                f"{owner}.kind={self.kind!r} is not supported; use one of {list(_AUGMENT_KINDS)}."
            )
        scale = _float_tuple(self.scale, 2, owner, "scale")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise InvalidOptionError(f"{owner}.scale must satisfy 0 < low <= high <= 1, got {scale}.")
        ratio = _float_tuple(self.ratio, 2, owner, "ratio")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise InvalidOptionError(f"{owner}.ratio must satisfy 0 < low <= high, got {ratio}.")
        if not isinstance(self.hflip, bool):
            raise InvalidOptionError(f"{owner}.hflip must be True or False, got {self.hflip!r}.")
        if self.hflip and self.kind == "none":
            raise InvalidOptionError(
                f"{owner}: hflip=True needs kind='random_resized_crop' (kind 'none' is the eval transform)."
            )
        _check_interpolation(self.interpolation, owner)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        self._check_photometric(owner)

    def _check_photometric(self, owner: str) -> None:
        jitter = self.color_jitter
        if jitter is not None:
            jitter = _float_tuple(jitter, 4, owner, "color_jitter")
            if any(not math.isfinite(v) or v < 0 for v in jitter):
                raise InvalidOptionError(f"{owner}.color_jitter must be 4 non-negative numbers "
                                         f"(brightness, contrast, saturation, hue), got {jitter}.")
            if jitter[3] > 0.5:
                raise InvalidOptionError(f"{owner}.color_jitter hue must be ≤ 0.5, got {jitter[3]}.")
            object.__setattr__(self, "color_jitter", jitter)
        for option in ("color_jitter_p", "blur_p"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidOptionError(f"{owner}.{option} must be a probability in [0, 1], got {value!r}.")
            object.__setattr__(self, option, float(value))
        kernel = self.blur_kernel
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 0 or (kernel and kernel % 2 == 0):
            raise InvalidOptionError(f"{owner}.blur_kernel must be 0 (off) or an odd positive int, got {kernel!r}.")
        sigma = _float_tuple(self.blur_sigma, 2, owner, "blur_sigma")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise InvalidOptionError(f"{owner}.blur_sigma must satisfy 0 < low <= high, got {sigma}.")
        object.__setattr__(self, "blur_sigma", sigma)
        if self.kind == "none" and (jitter is not None or kernel):
            raise InvalidOptionError(
                f"{owner}: color_jitter / blur_kernel need kind='random_resized_crop' "
                "(kind 'none' is the eval transform)."
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields, except photometric ones left at their defaults (so older specs keep their keys)."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        for f in fields(self):
            if f.name in _PHOTOMETRIC_FIELDS and getattr(self, f.name) == f.default:
                del d[f.name]
        if "color_jitter" in d:
            d["color_jitter"] = list(self.color_jitter)
        if "blur_sigma" in d:
            d["blur_sigma"] = list(self.blur_sigma)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentSpec":
        return cls(**_from_dict(cls, data))

    def fingerprint(self) -> str:
        """16 hex characters identifying the augmentation (every ``kind='none'`` spec is the same)."""
        return _fingerprint({"kind": "none"} if self.kind == "none" else self.to_dict())


# Fields added after the first release of the cache format: they enter ``to_dict`` (and so the
# fingerprint) only when they differ from their defaults.
_PHOTOMETRIC_FIELDS = ("color_jitter", "color_jitter_p", "blur_kernel", "blur_sigma", "blur_p")


# Presets. Frozen dataclasses, so sharing them module-wide is safe.
DASSL_AUGMENT = AugmentSpec(kind="random_resized_crop", scale=(0.08, 1.0), hflip=False)
"""RandomResizedCrop(scale 0.08-1), no flip: the Dassl methods as published (CoOp ... BiomedAP)."""

LP_AUGMENT = AugmentSpec(kind="random_resized_crop", scale=(0.5, 1.0), hflip=True)
"""RandomResizedCrop(scale 0.5-1) + horizontal flip: the LP / LP++ / Tip-Adapter / CLIP-Adapter harness."""

NO_AUGMENT = AugmentSpec(kind="none")
"""No augmentation: training views are the evaluation transform."""


class ToRGB:
    """Convert a PIL image to RGB (grayscale replicated, alpha dropped); tensors pass through.

    A module-level class rather than a lambda so the pipeline pickles into DataLoader workers.
    """

    def __call__(self, image: Any) -> Any:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            return image.convert("RGB")
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ResizeLongestSide:
    """Resize so that the longer side equals ``size``, keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: InterpolationMode) -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        factor = max(height, width) / self.size
        return F.resize(image, [round(height / factor), round(width / factor)], self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


class PadToSquare:
    """Pad (centered, ``fill``) to at least ``size`` × ``size``, then center crop to exactly that."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.size, self.fill = size, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
        if pad_w or pad_h:
            # Odd padding puts the extra pixel on the right / bottom.
            image = F.pad(image, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=self.fill)
        return F.center_crop(image, [self.size, self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


def _to_normalized_tensor(pre: PreprocessConfig) -> list[Callable]:
    return [ToRGB(), T.ToTensor(), T.Normalize(mean=pre.mean, std=pre.std)]


def build_eval_transform(pre: PreprocessConfig) -> T.Compose:
    """Evaluation transform: resize → center crop → RGB → tensor → normalize.

    Pixel-identical to ``open_clip.image_transform_v2(cfg, is_train=False)`` for the same config;
    like open_clip, the RGB conversion happens after resizing.
    """
    interpolation = _INTERPOLATIONS[pre.interpolation]
    if pre.resize_mode == "shortest":
        geometry = [T.Resize(pre.size, interpolation=interpolation), T.CenterCrop(pre.size)]
    elif pre.resize_mode == "squash":
        geometry = [T.Resize((pre.size, pre.size), interpolation=interpolation)]
    else:
        geometry = [ResizeLongestSide(pre.size, interpolation), PadToSquare(pre.size, pre.fill_color)]
    return T.Compose(geometry + _to_normalized_tensor(pre))


def build_train_transform(aug: AugmentSpec, pre: PreprocessConfig) -> T.Compose:
    """Training transform drawing from torch's global RNG (for DataLoader pipelines).

    RandomResizedCrop(size, scale, ratio) [→ RandomHorizontalFlip(0.5)] [→ RandomApply(ColorJitter, p)]
    [→ RandomApply(GaussianBlur, p)] → RGB → tensor → normalize.
    ``kind="none"`` returns the evaluation transform. For reproducible views use :func:`augmented_view`.
    """
    if aug.kind == "none":
        return build_eval_transform(pre)
    steps: list[Callable] = [
        T.RandomResizedCrop(
            pre.size, scale=aug.scale, ratio=aug.ratio, interpolation=_INTERPOLATIONS[aug.interpolation]
        )
    ]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip(HFLIP_PROBABILITY))
    if aug.color_jitter is not None or aug.blur_kernel:
        steps.append(ToRGB())  # colour operations need RGB; a no-op for the RGB images load_image returns
    if aug.color_jitter is not None:
        steps.append(T.RandomApply([T.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_p))
    if aug.blur_kernel:
        steps.append(T.RandomApply([T.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)], p=aug.blur_p))
    return T.Compose(steps + _to_normalized_tensor(pre))


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, height, width)`` of a random resized crop, drawn from ``generator``.

    Same algorithm and the same draws as torchvision's ``RandomResizedCrop.get_params``: up to ten
    tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); a box that fits is placed
    uniformly; if none fits, fall back to the largest central box within the ratio range.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, like torchvision, so the draws match bit for bit
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def apply_train_transform(
    image: Image.Image, aug: AugmentSpec, pre: PreprocessConfig, generator: torch.Generator
) -> torch.Tensor:
    """Apply ``aug`` to a PIL image, drawing every random choice from ``generator``.

    The global torch RNG is not used. ``kind="none"`` gives the evaluation transform (no draws).
    """
    if aug.kind == "none":
        return build_eval_transform(pre)(image)
    width, height = image.size
    top, left, crop_h, crop_w = random_resized_crop_params(width, height, aug.scale, aug.ratio, generator)
    view = F.resized_crop(
        image, top, left, crop_h, crop_w, [pre.size, pre.size],
        interpolation=_INTERPOLATIONS[aug.interpolation], antialias=True,
    )
    if aug.hflip and torch.rand(1, generator=generator).item() < HFLIP_PROBABILITY:
        view = F.hflip(view)
    if aug.color_jitter is not None or aug.blur_kernel:
        view = ToRGB()(view)
    if aug.color_jitter is not None and _random_apply(aug.color_jitter_p, generator):
        view = _color_jitter(view, aug.color_jitter, generator)
    if aug.blur_kernel and _random_apply(aug.blur_p, generator):
        sigma = torch.empty(1).uniform_(aug.blur_sigma[0], aug.blur_sigma[1], generator=generator).item()
        view = F.gaussian_blur(view, [aug.blur_kernel, aug.blur_kernel], [sigma, sigma])
    return T.Compose(_to_normalized_tensor(pre))(view)


def _random_apply(p: float, generator: torch.Generator) -> bool:
    """torchvision ``RandomApply``'s draw: one uniform number, applied unless ``p < u``."""
    return not p < torch.rand(1, generator=generator).item()


def _color_jitter(image: Image.Image, strengths: tuple[float, ...], generator: torch.Generator) -> Image.Image:
    """torchvision ``ColorJitter(*strengths)`` with its draws (order, then factors) taken from ``generator``."""
    jitter = T.ColorJitter(*strengths)  # normalises the strengths to ranges (None = off) exactly as torchvision
    order = torch.randperm(4, generator=generator)
    factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=generator))
               for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)]
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for index in order.tolist():
        if factors[index] is not None:
            image = adjust[index](image, factors[index])
    return image


def augmented_view(image: Image.Image, aug: AugmentSpec, pre: PreprocessConfig, seed: int) -> torch.Tensor:
    """The augmented view of ``image`` determined by ``seed`` alone (see the module docstring).

    Derive ``seed`` with :func:`view_seed` so that each (run seed, view index, image) gets its own.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return apply_train_transform(image, aug, pre, generator)


def view_seed(seed: int, view_index: int, image_id: str | int) -> int:
    """A 63-bit seed for one augmented view, stable across processes, machines and Python versions.

    ``image_id`` should identify the image's content (e.g. the sha256 of its bytes, as the feature
    cache keys use) so that an image gets the same views whichever split or index it appears at;
    an integer index works too when the image list is fixed. Built from BLAKE2b, not ``hash()``,
    which is salted per process for strings.
    """
    text = f"{int(seed)}:{int(view_index)}:{image_id}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    # PIL clips 16-bit grayscale to 255 when converting, which turns most medical 16-bit PNGs
    # white; rescale the full 16-bit range to 8 bits instead.
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert an image to RGB (grayscale is replicated to 3 channels).

    16-bit grayscale is scaled to 8 bits (``value / 257``) rather than clipped.

    Raises:
        UnreadableImageError: the file is missing, truncated, corrupt or not an image; the message
            names the path.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that corrupt files fail here with their path
            return _to_rgb(image)
    except FileNotFoundError:
        raise UnreadableImageError(
            f"Image file not found: {path}. Check the data root, or regenerate the split that lists it."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(
            f"Cannot decode image {path}: {exc}. The file is corrupt, truncated or not an image; "
            "re-extract it from the dataset archive or remove it from the split."
        ) from exc
