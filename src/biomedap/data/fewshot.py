"""K-shot sampling and base/novel class splits, exactly as the published (Dassl) protocol.

Sampling (what ``DatasetBase.generate_fewshot_dataset`` does after ``set_random_seed(seed)``):

1. One RNG seeded with the split seed — here a private ``random.Random(split_seed)``, which yields
   the same sequence as seeding the global ``random`` module, without touching global state.
2. Train: group the full train list by label in order of *first appearance*, items in file order;
   for each label in that order draw ``rng.sample(items, K)``; a class with fewer than K images
   keeps all of them, in file order, and draws nothing from the RNG.
3. Val: the same on the val list with ``min(K, 4)``, continuing the same RNG stream.
4. Test: the full test split, untouched.

Base-to-novel (``subsample_classes``) then keeps the first or second half of the sorted labels of
the K=16 all-class split and relabels them from 0.

The split seed is separate from the run seed: some published baselines reuse one split (seed 1)
for all their runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import EmptyDatasetError, InvalidOptionError, SplitFormatError
from .sources import SPLITS, DatasetSplits, Sample, get_split

__all__ = [
    "FEWSHOT_FORMAT_VERSION",
    "FewShotSplit",
    "fewshot_filename",
    "sample_few_shot",
    "subsample_classes",
]

logger = logging.getLogger(__name__)

FEWSHOT_FORMAT_VERSION = 1
MAX_VAL_SHOTS = 4  # val keeps min(K, 4) per class in the published protocol
_SUBSETS = ("all", "base", "novel")


@dataclass
class FewShotSplit:
    """A K-shot train / val split plus the full test split of one dataset.

    Attributes:
        dataset: dataset name.
        classnames: class names in label order (only the selected half after ``subsample_classes``).
        shots: K, images per class in train (val has ``min(K, 4)``).
        split_seed: seed of the sampling RNG.
        train, val, test: the samples; train and val in the published order (class by class in
            first-appearance order, items in draw order).
        notes: human-readable warnings, e.g. classes with fewer than K images.
        source_sha256: ``DatasetSplits.source_sha256`` of the data it was drawn from.
        image_root: folder the sample paths are saved relative to.
        subset: ``"all"``, ``"base"`` or ``"novel"``.
    """

    dataset: str
    classnames: list[str]
    shots: int
    split_seed: int
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)
    source_sha256: str = ""
    image_root: Path = Path(".")
    subset: str = "all"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        return get_split(self, name, f"the few-shot split of {self.dataset!r}")

    def to_json(self, path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
        """Save atomically as JSON with image paths relative to ``relative_to`` (default ``image_root``).

        Each split is a list of ``[relpath, label, classname]`` triples, as in ``split_<NAME>.json``.
        """
        path = Path(path)
        base = os.path.abspath(os.fspath(relative_to if relative_to is not None else self.image_root))

        def triples(samples: Sequence[Sample]) -> list[list[Any]]:
            return [[Path(os.path.relpath(s.path, base)).as_posix(), s.label, s.classname] for s in samples]

        payload = {
            "format_version": FEWSHOT_FORMAT_VERSION,
            "dataset": self.dataset,
            "classnames": list(self.classnames),
            "shots": self.shots,
            "split_seed": self.split_seed,
            "subset": self.subset,
            "source_sha256": self.source_sha256,
            "notes": list(self.notes),
            **{split: triples(self.split(split)) for split in SPLITS},
        }
        _atomic_write_text(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike, image_root: str | os.PathLike) -> "FewShotSplit":
        """Load a split saved by :meth:`to_json`, resolving image paths against ``image_root``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SplitFormatError(f"Few-shot split file {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SplitFormatError(f"Few-shot split file {path} is not valid JSON: {exc}.") from None
        required = ("format_version", "dataset", "classnames", "shots", "split_seed", *SPLITS)
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        if missing:
            raise SplitFormatError(f"{path} is not a biomedap few-shot split: missing key(s) {missing}.")
        version = data["format_version"]
        if not isinstance(version, int) or version > FEWSHOT_FORMAT_VERSION:
            raise SplitFormatError(
                f"{path} has format_version {version!r}; this biomedap reads up to "
                f"{FEWSHOT_FORMAT_VERSION}. Upgrade biomedap."
            )
        root = os.path.abspath(os.fspath(image_root))
        classnames = list(data["classnames"])

        def samples(split: str) -> list[Sample]:
            out = []
            for index, item in enumerate(data[split]):
                try:
                    rel, label, classname = item
                    valid = isinstance(rel, str) and 0 <= int(label) < len(classnames)
                except (TypeError, ValueError):
                    valid = False
                if not valid or classnames[int(label)] != classname:
                    raise SplitFormatError(
                        f"{path}: {split}[{index}] = {item!r} is not a [relpath, label, classname] triple "
                        f"consistent with classnames {classnames}."
                    )
                out.append(Sample(os.path.normpath(os.path.join(root, rel)), int(label), classname))
            return out

        return cls(
            dataset=data["dataset"], classnames=classnames, shots=int(data["shots"]),
            split_seed=int(data["split_seed"]),
            train=samples("train"), val=samples("val"), test=samples("test"),
            notes=list(data.get("notes", [])), source_sha256=data.get("source_sha256", ""),
            image_root=Path(root), subset=data.get("subset", "all"),
        )


def fewshot_filename(shots: int, split_seed: int) -> str:
    """Conventional file name of a saved split, mirroring Dassl's ``shot_<K>-seed_<seed>.pkl``."""
    return f"shot_{shots}-seed_{split_seed}.json"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder + ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_int(value: Any, option: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{option} must be an int, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise InvalidOptionError(f"{option} must be >= {minimum}, got {value}.")
    return value


def _sample_per_class(
    samples: Sequence[Sample], shots: int, rng: random.Random, split: str, classnames: Sequence[str],
    notes: list[str],
) -> list[Sample]:
    by_label: dict[int, list[Sample]] = {}  # insertion order = first appearance, as Dassl's defaultdict
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    picked: list[Sample] = []
    for label, items in by_label.items():
        if len(items) >= shots:
            picked += rng.sample(items, shots)
        else:
            count = len(items)
            note = f"class {classnames[label]!r} has {count} {split} images < K={shots}: kept all {count}"
            notes.append(note)
            logger.warning("%s", note)
            picked += items
    return picked


def sample_few_shot(splits: DatasetSplits, shots: int, split_seed: int) -> FewShotSplit:
    """Draw the published K-shot split (see the module docstring for the exact protocol).

    Args:
        splits: the full dataset.
        shots: K >= 1 images per class for train; val gets ``min(K, 4)``.
        split_seed: seed of the sampling RNG (seeds 1, 2, 3 in the papers).
    """
    _check_int(shots, "shots", minimum=1)
    _check_int(split_seed, "split_seed")
    if not splits.train:
        raise EmptyDatasetError(
            f"Dataset {splits.name!r} ({splits.source}) has no train images to sample shots from."
        )
    rng = random.Random(split_seed)
    notes: list[str] = []
    # Order matters: train consumes the stream first, then val continues it.
    train = _sample_per_class(splits.train, shots, rng, "train", splits.classnames, notes)
    val = _sample_per_class(splits.val, min(shots, MAX_VAL_SHOTS), rng, "val", splits.classnames, notes)
    return FewShotSplit(
        dataset=splits.name, classnames=list(splits.classnames), shots=shots, split_seed=split_seed,
        train=train, val=val, test=list(splits.test), notes=notes,
        source_sha256=splits.source_sha256, image_root=Path(splits.image_root),
    )


def subsample_classes(fs: FewShotSplit, which: str) -> FewShotSplit:
    """Keep the base or novel half of the classes and relabel them 0..n-1.

    The labels present in ``fs.train`` are sorted; the first ``ceil(n / 2)`` are *base*, the rest
    *novel* (``"new"`` is accepted as Dassl's name for novel). Train, val and test keep only the
    chosen half, with labels renumbered in sorted order. ``"all"`` returns an unchanged copy.
    """
    which = "novel" if which == "new" else which
    if which not in _SUBSETS:
        raise InvalidOptionError(f"subsample_classes: which={which!r}; use one of {list(_SUBSETS)}.")
    if fs.subset != "all":
        raise InvalidOptionError(
            f"subsample_classes: this split of {fs.dataset!r} is already the {fs.subset!r} subset; "
            "subsample the all-class split instead."
        )
    if which == "all":
        return replace(fs, train=list(fs.train), val=list(fs.val), test=list(fs.test), notes=list(fs.notes))
    labels = sorted({s.label for s in fs.train})
    if not labels:
        raise EmptyDatasetError(
            f"subsample_classes: the few-shot split of {fs.dataset!r} has no train samples."
        )
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if which == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(chosen)}
    classnames = [fs.classnames[old] for old in chosen]

    def keep(samples: Sequence[Sample]) -> list[Sample]:
        return [Sample(s.path, relabel[s.label], s.classname) for s in samples if s.label in relabel]

    return replace(
        fs, classnames=classnames, train=keep(fs.train), val=keep(fs.val), test=keep(fs.test),
        notes=list(fs.notes), subset=which,
    )
