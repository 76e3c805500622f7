"""Small synthetic image datasets for tests and the offline demo.

Each class gets its own colour, background brightness and shape or texture (disc, stripes,
checkerboard, ring, cross, square, diagonal stripes, triangle), so that even a randomly initialised
ViT separates the classes; position, size, phase and pixel noise are jittered per image so that no
two samples are identical. Output is byte-for-byte deterministic for a given seed (numpy
``Generator`` + PIL, no global RNG).
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import InvalidOptionError
from .sources import SPLITS

__all__ = ["DEFAULT_SYNTHETIC_CLASSNAMES", "LAYOUTS", "make_synthetic_dataset", "render_synthetic_image"]

# Multi-word names with rare words on purpose: they exercise tokenisation and the class-name
# handling (spaces vs underscores) the way real biomedical class names do.
DEFAULT_SYNTHETIC_CLASSNAMES: tuple[str, ...] = (
    "glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain",
)
LAYOUTS = ("split-json", "imagefolder", "csv")
_NUM_PATTERNS = 8


def _class_colour(index: int) -> np.ndarray:
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring hues far apart
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95), dtype=np.float64) * 255.0


def _pattern_mask(pattern: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(0.35, 0.65, size=2) * size
    radius = rng.uniform(0.2, 0.32) * size
    period = rng.uniform(0.12, 0.18) * size
    phase = rng.uniform(0.0, period)
    distance = np.hypot(xx - cx, yy - cy)
    if pattern == 0:  # disc
        return distance < radius
    if pattern == 1:  # horizontal stripes
        return ((yy + phase) // (period / 2)) % 2 == 0
    if pattern == 2:  # checkerboard
        return (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    if pattern == 3:  # ring
        return (distance < radius) & (distance > 0.55 * radius)
    if pattern == 4:  # cross
        arm = 0.3 * radius
        inside = (np.abs(xx - cx) < radius) & (np.abs(yy - cy) < radius)
        return inside & ((np.abs(xx - cx) < arm) | (np.abs(yy - cy) < arm))
    if pattern == 5:  # filled square
        return (np.abs(xx - cx) < 0.8 * radius) & (np.abs(yy - cy) < 0.8 * radius)
    if pattern == 6:  # diagonal stripes
        return ((xx + yy + phase) // (period / 2)) % 2 == 0
    # triangle pointing up
    top = cy - radius
    return (yy > top) & (yy < cy + radius) & (np.abs(xx - cx) < (yy - top) / 2)


def render_synthetic_image(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``class_index``, drawing its jitter from ``rng``."""
    mask = _pattern_mask(class_index % _NUM_PATTERNS, size, rng)[..., None]
    # Classes beyond the 8 patterns still differ by colour and background brightness.
    background = np.full(3, 25.0 + 35.0 * (class_index % 3))
    foreground = _class_colour(class_index)
    pixels = np.where(mask, foreground, background) + rng.normal(0.0, 8.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_synthetic_dataset(
    root: str | os.PathLike,
    name: str = "SYNTH",
    classnames: Sequence[str] | None = None,
    layout: str = "split-json",
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 8,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset under ``root`` and return the path to pass to ``load_dataset``.

    Layouts (counts are per class):

    * ``"split-json"``: ``root/<name>/<name>/<class_folder>/<split>_<i>.png`` and
      ``root/<name>/split_<name>.json`` in the published format; returns ``root/<name>``.
    * ``"imagefolder"``: ``root/<name>/{train,val,test}/<class_folder>/<i>.png``; returns ``root/<name>``.
    * ``"csv"``: ``root/<name>/images/<class_folder>/<split>_<i>.png`` and ``root/<name>/labels.csv``
      with ``path,label,split`` columns (label = class name); returns the CSV path.

    Existing files with the same names are overwritten; nothing else is deleted.
    """
    classnames = list(DEFAULT_SYNTHETIC_CLASSNAMES if classnames is None else classnames)
    if layout not in LAYOUTS:
        raise InvalidOptionError(f"make_synthetic_dataset: layout={layout!r}; use one of {list(LAYOUTS)}.")
    if not classnames or len(set(classnames)) != len(classnames) or not all(c.strip() for c in classnames):
        raise InvalidOptionError(
            f"make_synthetic_dataset: classnames must be distinct non-empty names, got {classnames}."
        )
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if n_train < 1 or n_val < 0 or n_test < 0 or image_size < 8:
        raise InvalidOptionError(
            "make_synthetic_dataset: need n_train >= 1, n_val >= 0, n_test >= 0 and image_size >= 8, "
            f"got {counts} and image_size={image_size}."
        )
    rng = np.random.default_rng(seed)
    dataset_dir = Path(root) / name
    image_dir = {
        "split-json": dataset_dir / name, "imagefolder": dataset_dir, "csv": dataset_dir / "images",
    }[layout]

    split_entries: dict[str, list[list]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for label, classname in enumerate(classnames):
            folder = classname.replace(" ", "_")
            for i in range(counts[split]):
                image = render_synthetic_image(label, image_size, rng)
                if layout == "imagefolder":
                    relpath = f"{split}/{folder}/{i:04d}.png"
                else:
                    relpath = f"{folder}/{split}_{i:04d}.png"
                target = image_dir / relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_png_bytes(image))
                split_entries[split].append([relpath, label, classname])
        # Interleave classes, as real split files do, so that label first-appearance order is not sorted.
        order = rng.permutation(len(split_entries[split]))
        split_entries[split] = [split_entries[split][i] for i in order]

    if layout == "split-json":
        split_file = dataset_dir / f"split_{name}.json"
        split_file.write_text(json.dumps(split_entries) + "\n", encoding="utf-8")
        return dataset_dir
    if layout == "imagefolder":
        return dataset_dir
    csv_path = dataset_dir / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for split in SPLITS:
            for relpath, _, classname in split_entries[split]:
                writer.writerow([f"images/{relpath}", classname, split])
    return csv_path
