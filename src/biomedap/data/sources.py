"""Read labelled image datasets into train / val / test lists of :class:`Sample`.

Three on-disk forms are understood, plus catalog names:

* **split-json** — the BiomedCoOp layout ``ROOT/<NAME>/<NAME>/<class_folder>/<image>`` with
  ``ROOT/<NAME>/split_<NAME>.json`` = ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``
  (:func:`load_split_json`).
* **ImageFolder** — ``path/<class>/<image>`` or ``path/{train,val,test}/<class>/<image>``
  (:func:`load_image_folder`).
* **CSV** — a file with ``path,label`` columns and optionally ``split`` and ``classname``
  (:func:`load_csv`).

:func:`load_dataset` picks the right one. Loaders only check that images *exist* (one directory
listing per folder); decoding errors surface later, with the path, from
:func:`biomedap.data.transforms.load_image`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .catalog import DatasetSpec, _unknown_dataset_error, get_dataset_spec
from .errors import (
    ClassnameMismatchError,
    DatasetRootNotFoundError,
    EmptyDatasetError,
    InvalidOptionError,
    LabelMismatchError,
    MissingImageError,
    SplitFileNotFoundError,
    SplitFormatError,
    UnknownDatasetError,
)

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetSplits",
    "Sample",
    "get_split",
    "load_csv",
    "load_dataset",
    "load_image_folder",
    "load_split_json",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# Per-class fractions used when a folder or CSV has no split of its own: 50 / 20 / 30, the same
# proportions as the fallback split of the published (Dassl) code.
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.3

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_MAX_LISTED = 5


def get_split(holder: Any, name: str, what: str) -> list[Sample]:
    """``holder.<name>`` for a split name, with an error that names ``what`` and the valid splits."""
    if name not in SPLITS:
        raise InvalidOptionError(f"Unknown split {name!r} for {what}; use one of {list(SPLITS)}.")
    return getattr(holder, name)



@dataclass(frozen=True)
class Sample:
    """One labelled image: absolute ``path``, integer ``label`` and its ``classname``."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset with its full train / val / test splits.

    Attributes:
        name: dataset name (catalog name for catalog datasets).
        classnames: class names in label order (``classnames[label]``).
        image_root: folder that sample paths are stored relative to in saved few-shot splits.
        train, val, test: the samples of each split.
        source: what was read, e.g. ``"split-json /data/BTMRI/split_BTMRI.json"``.
        source_sha256: hash of the split file / CSV, or of the sorted file listing for an
            ImageFolder; derived splits also hash their fractions and seed, so equal hashes mean
            equal splits.
    """

    name: str
    classnames: list[str]
    image_root: Path
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    source: str
    source_sha256: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        return get_split(self, name, f"dataset {self.name!r}")

    def summary(self) -> dict[str, dict[str, int]]:
        """Image counts ``{split: {classname: n}}``, classes in label order (zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            counts = Counter(s.label for s in self.split(split))
            out[split] = {name: counts.get(label, 0) for label, name in enumerate(self.classnames)}
        return out

    def summary_text(self) -> str:
        """:meth:`summary` as an aligned plain-text table."""
        table = self.summary()
        width = max([len(c) for c in self.classnames] + [5])
        lines = [f"{self.name}: {self.num_classes} classes ({self.source})",
                 f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS)]
        for name in self.classnames:
            lines.append(f"{name:<{width}}  " + "  ".join(f"{table[s][name]:>6}" for s in SPLITS))
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{len(self.split(s)):>6}" for s in SPLITS))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# shared helpers


def _display_name(raw: str) -> str:
    """Class names use spaces where folders and split files may use underscores."""
    return raw.replace("_", " ").strip()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise InvalidOptionError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to "
            "less than 1 (the rest is train)."
        )


def _check_images_exist(paths: Sequence[str], listed_in: str) -> None:
    """Raise :class:`MissingImageError` if any path is absent; one directory listing per folder."""
    listings: dict[str, set[str] | None] = {}
    missing: list[str] = []
    for path in paths:
        folder, filename = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = None
        names = listings[folder]
        # Fall back to a stat for names the listing misses (case-insensitive file systems).
        if names is None or filename not in names:
            if names is None or not os.path.isfile(path):
                missing.append(path)
    if missing:
        shown = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise MissingImageError(
            f"{len(missing)} image(s) listed in {listed_in} do not exist, e.g.:\n  {shown}{more}\n"
            "Extract the dataset's images to the expected folder, "
            "or pass check_files=False to skip this check."
        )


def _split_per_class(
    by_class: dict[int, list[str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Deterministic per-class train/val/test split of ``{label: [paths]}`` with a private RNG.

    Labels are visited in ascending order, each class's paths sorted then shuffled; the first
    ``round(n * val_fraction)`` go to val, the next ``round(n * test_fraction)`` to test, the rest to
    train (at least one image per class stays in train).
    """
    _check_fractions(val_fraction, test_fraction)
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n = len(items)
        n_val, n_test = round(n * val_fraction), round(n * test_fraction)
        while n_val + n_test > n - 1 and (n_val or n_test):
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        out["val"] += [(p, label) for p in items[:n_val]]
        out["test"] += [(p, label) for p in items[n_val:n_val + n_test]]
        out["train"] += [(p, label) for p in items[n_val + n_test:]]
    for split in SPLITS:
        out[split].sort(key=lambda item: (item[1], item[0]))
    return out


def _samples(items: Iterable[tuple[str, int]], classnames: Sequence[str]) -> list[Sample]:
    return [Sample(path=path, label=label, classname=classnames[label]) for path, label in items]


def _check_contiguous(labels: Iterable[int], source: str) -> int:
    present = sorted(set(labels))
    if not present:
        raise EmptyDatasetError(
            f"{source} lists no images, so no classes were found. Add labelled images to it."
        )
    expected = list(range(len(present)))
    if present != expected:
        gaps = sorted(set(range(max(present) + 1)) - set(present))
        raise SplitFormatError(
            f"{source}: labels must be contiguous 0..C-1, found {present}"
            + (f" (missing {gaps})" if gaps else "")
            + ". Renumber the labels so that each class id from 0 to C-1 is used."
        )
    return len(present)


def _classnames_from_pairs(pairs: Iterable[tuple[int, str]], source: str) -> list[str]:
    """Class names in label order from (label, name) pairs, checking the mapping is one-to-one."""
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for label, name in pairs:
        if name_of.setdefault(label, name) != name:
            raise LabelMismatchError(
                f"{source}: label {label} is used for two class names, {name_of[label]!r} and {name!r}. "
                "Each label must name exactly one class; fix the file."
            )
        if label_of.setdefault(name, label) != label:
            raise LabelMismatchError(
                f"{source}: class {name!r} appears with two labels, {label_of[name]} and {label}. "
                "Each class must have exactly one label; fix the file."
            )
    _check_contiguous(name_of, source)
    return [name_of[label] for label in sorted(name_of)]


def _catalog_spec(spec_or_name: DatasetSpec | str) -> DatasetSpec | None:
    if isinstance(spec_or_name, DatasetSpec):
        return spec_or_name
    try:
        return get_dataset_spec(spec_or_name)
    except UnknownDatasetError:
        return None


# ----------------------------------------------------------------------------------------------
# split-json (BiomedCoOp layout)


def _parse_split_json(data: Any, split_file: Path) -> dict[str, list[tuple[str, int, str]]]:
    if not isinstance(data, dict):
        raise SplitFormatError(
            f"{split_file} must hold a JSON object with keys 'train', 'val', 'test', "
            f"got {type(data).__name__}."
        )
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise SplitFormatError(
            f"{split_file} has unexpected key(s) {unknown}; expected 'train', 'val', 'test'."
        )
    for required in ("train", "test"):
        if required not in data:
            raise SplitFormatError(
                f"{split_file} has no {required!r} list; expected keys 'train', 'val', 'test'."
            )
    out: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list):
            raise SplitFormatError(f"{split_file}: {split!r} must be a list of [relpath, label, classname].")
        triples = []
        for index, item in enumerate(items):
            if not (
                isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)
            ):
                raise SplitFormatError(
                    f"{split_file}: {split}[{index}] = {item!r} is not a "
                    "[relpath (str), label (int), classname (str)] triple."
                )
            triples.append((item[0], item[1], _display_name(item[2])))
        out[split] = triples
    return out


def load_split_json(
    root: str | os.PathLike,
    spec_or_name: DatasetSpec | str,
    *,
    check_files: bool = True,
    check_classnames: bool = True,
) -> DatasetSplits:
    """Load a dataset in the published BiomedCoOp layout.

    Args:
        root: data root, the folder that contains ``<NAME>/``.
        spec_or_name: a :class:`DatasetSpec`, a catalog name or key (``"BTMRI"``, ``"btmri"``), or
            any other name whose folder follows the same layout.
        check_files: verify that every listed image exists (cheap: one listing per folder).
        check_classnames: for catalog datasets, require the file's class names to equal the catalog's.

    Class names come from the file's (label, classname) pairs sorted by label, underscores read as
    spaces; labels must be 0..C-1.
    """
    spec = _catalog_spec(spec_or_name)
    name = spec.name if spec is not None else str(spec_or_name)
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    layout = f"{root}/{name}/{name}/<class_folder>/<image> and {root}/{name}/split_{name}.json"
    if not root.is_dir():
        raise DatasetRootNotFoundError(f"Data root {root} does not exist. Expected the layout {layout}.")
    dataset_dir = root / name
    if not dataset_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())[:20]
        raise DatasetRootNotFoundError(
            f"Dataset folder {dataset_dir} does not exist (found in {root}: {present}). "
            f"Expected the layout {layout}."
        )
    split_file = dataset_dir / f"split_{name}.json"
    if not split_file.is_file():
        raise SplitFileNotFoundError(
            f"Split file {split_file} not found. Put the published split_{name}.json there "
            f"(BiomedCoOp ships it under data/{name}/), or load the class folders as an ImageFolder "
            f"with load_image_folder('{dataset_dir / name}')."
        )
    raw = split_file.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SplitFormatError(f"{split_file} is not valid JSON: {exc}.") from None
    triples = _parse_split_json(data, split_file)
    pairs = ((label, classname) for split in SPLITS for _, label, classname in triples[split])
    classnames = _classnames_from_pairs(pairs, str(split_file))
    if spec is not None and check_classnames and tuple(classnames) != spec.classnames:
        raise ClassnameMismatchError(
            f"{split_file} lists the classes {classnames} (label order), but the catalog's {spec.name} has "
            f"{list(spec.classnames)}. Use the published split file, or pass check_classnames=False if this "
            "file is authoritative."
        )
    image_root = dataset_dir / name
    splits = {
        split: _samples(
            ((os.path.normpath(os.path.join(image_root, rel)), label) for rel, label, _ in triples[split]),
            classnames,
        )
        for split in SPLITS
    }
    if check_files:
        if not image_root.is_dir():
            raise DatasetRootNotFoundError(
                f"Image folder {image_root} does not exist. "
                f"Extract the {name} images there (layout {layout}), "
                "or pass check_files=False."
            )
        _check_images_exist([s.path for split in SPLITS for s in splits[split]], str(split_file))
    return DatasetSplits(
        name=name, classnames=classnames, image_root=image_root, **splits,
        source=f"split-json {split_file}", source_sha256=_sha256_bytes(raw),
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted, absolute."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_file(f)]
    return sorted(found)


def _class_folders(folder: Path) -> list[Path]:
    folders = (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(folders, key=lambda p: p.name)


def _classnames_from_folders(folder_names: Iterable[str], where: Path) -> list[str]:
    """Distinct class folder names, sorted; two folders that read as the same class are an error."""
    names: dict[str, str] = {}  # display name -> folder name
    for folder in sorted(set(folder_names)):
        display = _display_name(folder)
        if names.setdefault(display, folder) != folder:
            raise SplitFormatError(
                f"{where}: class folders {names[display]!r} and {folder!r} both mean class {display!r} "
                "(underscores are read as spaces). Merge or rename them."
            )
    if not names:
        raise EmptyDatasetError(
            f"No class folders found in {where}. Expected {where}/<class>/<image> or "
            f"{where}/{{train,val,test}}/<class>/<image>."
        )
    return sorted(names.values())


def load_image_folder(
    path: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    *,
    name: str | None = None,
) -> DatasetSplits:
    """Load an ImageFolder tree.

    * ``path/{train,val,test}/<class>/<image>``: those splits are used as they are (``val/`` may be
      absent; then val is empty).
    * ``path/<class>/<image>``: each class is split ``1 - val - test`` / ``val`` / ``test``
      (default 50 / 20 / 30) with ``random.Random(seed)`` — deterministic, no global state.

    Classes are the folder names sorted alphabetically, underscores read as spaces. Images are files
    ending in .png .jpg .jpeg .bmp .tif .tiff .webp (any case), searched recursively per class.
    """
    _check_fractions(val_fraction, test_fraction)
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not path.is_dir():
        raise DatasetRootNotFoundError(
            f"Image folder {path} does not exist. "
            f"Expected {path}/<class>/<image> or {path}/{{train,val,test}}/<class>/<image>."
        )
    if (path / "train").is_dir():
        folder_names, items, sha, source = _read_split_folders(path)
    else:
        folder_names, items, sha, source = _read_class_folders(path, val_fraction, test_fraction, seed)
    classnames = [_display_name(n) for n in folder_names]
    return DatasetSplits(
        name=name or path.name, classnames=classnames, image_root=path,
        **{s: _samples(items[s], classnames) for s in SPLITS},
        source=source, source_sha256=sha,
    )


def _read_split_folders(path: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]], str, str]:
    """``path/{train,val,test}/<class>/<image>``: the folders are the splits."""
    if not (path / "test").is_dir():
        raise SplitFormatError(f"{path} has a train/ folder but no test/ folder; add test/<class>/<image>.")
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir()}
    if "val" not in split_dirs:
        logger.info("%s has no val/ folder: the val split is empty.", path)
    folders = {split: _class_folders(d) for split, d in split_dirs.items()}
    folder_names = _classnames_from_folders((f.name for fs in folders.values() for f in fs), path)
    label_of = {n: i for i, n in enumerate(folder_names)}
    items: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for split, class_dirs in folders.items():
        for folder in class_dirs:
            items[split] += [(p, label_of[folder.name]) for p in _list_images(folder)]
    counts = Counter(label for split_items in items.values() for _, label in split_items)
    for label, folder_name in enumerate(folder_names):
        if counts[label] == 0:
            raise EmptyDatasetError(
                f"The class folders {path}/{{train,val,test}}/{folder_name} contain no images "
                f"(extensions {sorted(IMAGE_EXTENSIONS)}). Add images or remove the folders."
            )
    for split in split_dirs:
        absent = sorted(set(range(len(folder_names))) - {label for _, label in items[split]})
        if absent:
            logger.warning("%s/%s has no images of class(es) %s.",
                           path, split, [folder_names[a] for a in absent])
    for split in SPLITS:
        items[split].sort(key=lambda item: (item[1], item[0]))
    listing = sorted(os.path.relpath(p, path) for split_items in items.values() for p, _ in split_items)
    return folder_names, items, _sha256_lines(listing), f"imagefolder {path} (train/val/test folders)"


def _read_class_folders(
    path: Path, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], dict[str, list[tuple[str, int]]], str, str]:
    """``path/<class>/<image>``: split each class with :func:`_split_per_class`."""
    class_dirs = _class_folders(path)
    folder_names = _classnames_from_folders((d.name for d in class_dirs), path)
    label_of = {n: i for i, n in enumerate(folder_names)}
    by_class: dict[int, list[str]] = {}
    for folder in class_dirs:
        images = _list_images(folder)
        if not images:
            raise EmptyDatasetError(
                f"Class folder {folder} contains no images (extensions {sorted(IMAGE_EXTENSIONS)}). "
                "Add images or remove the folder."
            )
        by_class[label_of[folder.name]] = images
    items = _split_per_class(by_class, val_fraction, test_fraction, seed)
    listing = sorted(os.path.relpath(p, path) for paths in by_class.values() for p in paths)
    params = f"per-class split val={val_fraction} test={test_fraction} seed={seed}"
    return folder_names, items, _sha256_lines(listing + [params]), f"imagefolder {path} ({params})"


# ----------------------------------------------------------------------------------------------
# CSV

_INT_RE = re.compile(r"^[+-]?\d+$")


def load_csv(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    check_files: bool = True,
    name: str | None = None,
) -> DatasetSplits:
    """Load a CSV of labelled images.

    Columns (header required, names case-insensitive):

    * ``path`` — image path, relative to ``image_root`` (default: the CSV's folder) or absolute;
    * ``label`` — a class name, or an integer 0..C-1;
    * ``classname`` (optional, integer labels only) — names the integer labels; without it the
      classes are named by their numbers;
    * ``split`` (optional) — ``train`` / ``val`` / ``test``; without it each class is split like
      :func:`load_image_folder` (``val_fraction``, ``test_fraction``, ``seed``).

    With class-name labels the classes are sorted alphabetically (underscores read as spaces).
    """
    _check_fractions(val_fraction, test_fraction)
    csv_path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not csv_path.is_file():
        raise DatasetRootNotFoundError(f"CSV file {csv_path} does not exist.")
    base = Path(os.path.abspath(os.fspath(image_root))) if image_root is not None else csv_path.parent
    if image_root is not None and not base.is_dir():
        raise DatasetRootNotFoundError(f"image_root {base} (for {csv_path}) does not exist.")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SplitFormatError(f"{csv_path} is not UTF-8 text: {exc}.") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise EmptyDatasetError(f"{csv_path} is empty; expected a header with at least 'path,label'.")
    columns = {h.strip().lower(): i for i, h in enumerate(header)}
    for required in ("path", "label"):
        if required not in columns:
            raise SplitFormatError(
                f"{csv_path} has no {required!r} column (header: {header}); expected at least 'path,label'."
            )
    rows: list[tuple[int, str, str, str | None, str | None]] = []  # line, path, label, classname, split
    for row in reader:
        line_no = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise SplitFormatError(
                f"{csv_path}, line {line_no}: {len(row)} fields, the header has {len(header)}."
            )

        def cell(column: str) -> str | None:
            return row[columns[column]].strip() if column in columns else None

        image, label = cell("path"), cell("label")
        if not image or not label:
            raise SplitFormatError(f"{csv_path}, line {line_no}: empty 'path' or 'label'.")
        rows.append((line_no, image, label, cell("classname"), cell("split")))
    if not rows:
        raise EmptyDatasetError(f"{csv_path} has a header but no rows; add one line per image.")

    where = str(csv_path)
    if all(_INT_RE.match(r[2]) for r in rows):
        if "classname" in columns:
            pairs = []
            for line_no, _, label, classname, _ in rows:
                if not classname:
                    raise SplitFormatError(f"{csv_path}, line {line_no}: empty 'classname'.")
                pairs.append((int(label), _display_name(classname)))
            classnames = _classnames_from_pairs(pairs, where)
        else:
            n = _check_contiguous((int(r[2]) for r in rows), where)
            classnames = [str(i) for i in range(n)]
            logger.warning("%s has integer labels and no 'classname' column: classes are named '0'..'%d', "
                           "which text-prompt methods cannot use meaningfully.", csv_path, n - 1)
        labels = [int(r[2]) for r in rows]
    else:
        classnames = sorted({_display_name(r[2]) for r in rows})
        label_of = {c: i for i, c in enumerate(classnames)}
        labels = [label_of[_display_name(r[2])] for r in rows]

    paths = [os.path.normpath(os.path.join(base, r[1])) for r in rows]
    if "split" in columns:
        items: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        for (line_no, _, _, _, split), image, label in zip(rows, paths, labels):
            canonical = _SPLIT_ALIASES.get((split or "").lower())
            if canonical is None:
                raise SplitFormatError(
                    f"{csv_path}, line {line_no}: split {split!r} is not one of train, val, test."
                )
            items[canonical].append((image, label))
        sha, source = _sha256_bytes(raw), f"csv {csv_path}"
    else:
        by_class: dict[int, list[str]] = defaultdict(list)
        for image, label in zip(paths, labels):
            by_class[label].append(image)
        items = _split_per_class(by_class, val_fraction, test_fraction, seed)
        params = f"per-class split val={val_fraction} test={test_fraction} seed={seed}"
        sha = _sha256_lines([_sha256_bytes(raw), params])
        source = f"csv {csv_path} ({params})"
    if check_files:
        _check_images_exist(paths, str(csv_path))
    return DatasetSplits(
        name=name or csv_path.parent.name, classnames=classnames, image_root=base,
        **{s: _samples(items[s], classnames) for s in SPLITS},
        source=source, source_sha256=sha,
    )


# ----------------------------------------------------------------------------------------------
# one entry point


def _load_directory(folder: Path, **options: Any) -> DatasetSplits:
    split_file = folder / f"split_{folder.name}.json"
    if split_file.is_file():
        return load_split_json(folder.parent, folder.name, check_files=options["check_files"],
                               check_classnames=options["check_classnames"])
    others = sorted(p.name for p in folder.glob("split_*.json"))
    if others:
        raise SplitFormatError(
            f"{folder} holds {others} but the split-json layout needs split_{folder.name}.json next to the "
            f"image folder {folder / folder.name}. Rename the file or the folder so that they match."
        )
    if (folder.parent / f"split_{folder.name}.json").is_file():
        # ROOT/<NAME>/<NAME> is the image folder of a split-json dataset: the published split is one
        # level up, and reading the class folders would silently draw a different split.
        logger.warning("%s looks like the image folder of a split-json dataset; pass %s to use its "
                       "published split_%s.json. Reading it as an ImageFolder instead.",
                       folder, folder.parent, folder.name)
    return load_image_folder(folder, options["val_fraction"], options["test_fraction"], options["seed"],
                             name=options["name"])


def load_dataset(
    spec: str | os.PathLike | DatasetSpec,
    root: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
    check_classnames: bool = True,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    name: str | None = None,
) -> DatasetSplits:
    """Load a dataset from a catalog name, a folder or a CSV file.

    ``spec`` may be:

    * a catalog name or key (``"BTMRI"``, ``"btmri"``) or a :class:`DatasetSpec`, read from
      ``root`` in the split-json layout; a non-catalog name with ``root`` is read from ``root/<name>``;
    * a folder: split-json layout if it contains ``split_<folder name>.json``, otherwise ImageFolder;
    * a ``.csv`` file.

    ``val_fraction``, ``test_fraction`` and ``seed`` only apply to folders and CSVs without splits.
    """
    options = dict(check_files=check_files, check_classnames=check_classnames, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, name=name)
    if isinstance(spec, DatasetSpec):
        if root is None:
            raise InvalidOptionError(f"Dataset {spec.name} needs root=<folder that contains {spec.name}/>.")
        return load_split_json(root, spec, check_files=check_files, check_classnames=check_classnames)
    text = os.fspath(spec)
    candidate = Path(os.path.expanduser(text))
    if root is not None and not candidate.is_absolute():
        catalog = _catalog_spec(text)
        if catalog is not None:
            return load_split_json(root, catalog, check_files=check_files, check_classnames=check_classnames)
        if (Path(root) / text).exists():
            candidate = Path(root) / text
    if candidate.is_file():
        if candidate.suffix.lower() != ".csv":
            raise InvalidOptionError(
                f"{candidate} is a file but not a .csv; pass a folder, a .csv or a catalog name."
            )
        return load_csv(candidate, check_files=check_files, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, name=name)
    if candidate.is_dir():
        return _load_directory(candidate, **options)
    catalog = _catalog_spec(text)
    if catalog is not None:
        raise InvalidOptionError(
            f"Dataset {catalog.name} is a catalog dataset: pass root=<folder that contains {catalog.name}/> "
            f"(expected {catalog.name}/{catalog.name}/<class_folder>/... "
            f"and {catalog.name}/{catalog.split_filename})."
        )
    if os.sep in text or "/" in text or candidate.suffix:
        raise DatasetRootNotFoundError(
            f"{candidate} does not exist (expected a folder, a .csv file or a catalog name)."
        )
    raise _unknown_dataset_error(text, extra=f" No file or folder {str(candidate)!r} exists either.")
