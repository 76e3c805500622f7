"""Synthetic datasets: deterministic bytes, published split format, separable classes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from biomedap.data import (
    DEFAULT_SYNTHETIC_CLASSNAMES,
    InvalidOptionError,
    load_dataset,
    load_image,
    make_synthetic_dataset,
)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = dict(n_train=2, n_val=1, n_test=1, image_size=16)
    a = _tree_bytes(make_synthetic_dataset(tmp_path / "a", seed=7, **kwargs))
    b = _tree_bytes(make_synthetic_dataset(tmp_path / "b", seed=7, **kwargs))
    c = _tree_bytes(make_synthetic_dataset(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_default_classnames_are_multi_word():
    assert any(len(name.split()) > 1 for name in DEFAULT_SYNTHETIC_CLASSNAMES)
    assert "meningioma tumor" in DEFAULT_SYNTHETIC_CLASSNAMES


def test_split_json_layout_is_the_published_format(tmp_path):
    path = make_synthetic_dataset(tmp_path, name="TOY", n_train=3, n_val=2, n_test=1, image_size=16)
    assert path == tmp_path / "TOY"
    data = json.loads((path / "split_TOY.json").read_text())
    assert set(data) == {"train", "val", "test"}
    assert len(data["train"]) == 3 * 4 and len(data["val"]) == 2 * 4 and len(data["test"]) == 4
    for relpath, label, classname in data["train"] + data["val"] + data["test"]:
        assert isinstance(label, int) and DEFAULT_SYNTHETIC_CLASSNAMES[label] == classname
        assert relpath.split("/")[0] == classname.replace(" ", "_")
        assert (path / "TOY" / relpath).is_file()
    # Classes are interleaved in the file, as in real split files.
    first_seen = list(dict.fromkeys(label for _, label, _ in data["train"]))
    assert sorted(first_seen) == [0, 1, 2, 3]


def test_imagefolder_and_csv_layouts(tmp_path):
    small = dict(n_train=2, n_val=1, n_test=1, image_size=16)
    folder = make_synthetic_dataset(tmp_path / "f", layout="imagefolder", **small)
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train", "val"]
    assert (folder / "train" / "normal_brain" / "0001.png").is_file()
    csv_path = make_synthetic_dataset(tmp_path / "c", layout="csv", **small)
    assert csv_path == tmp_path / "c" / "SYNTH" / "labels.csv"
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "split"]
    assert {r["split"] for r in rows} == {"train", "val", "test"} and len(rows) == 16
    assert all((csv_path.parent / r["path"]).is_file() and r["path"].startswith("images/") for r in rows)


def test_custom_classnames_beyond_the_pattern_count(tmp_path):
    names = [f"kind {i}" for i in range(10)]
    splits = load_dataset(make_synthetic_dataset(tmp_path, classnames=names, n_train=1, n_val=0, n_test=1,
                                                 image_size=12))
    assert splits.classnames == names and len(splits.val) == 0


def test_classes_are_separable_by_simple_statistics(tmp_path):
    """Nearest class-mean on (mean colour, pixel std) classifies every test image: easy for any ViT."""
    root = make_synthetic_dataset(tmp_path, n_train=6, n_val=0, n_test=6, image_size=32, seed=3)
    splits = load_dataset(root)

    def features(sample):
        pixels = np.asarray(load_image(sample.path), dtype=np.float64)
        return np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))])

    train = np.stack([features(s) for s in splits.train])
    labels = np.array([s.label for s in splits.train])
    centroids = np.stack([train[labels == c].mean(axis=0) for c in range(splits.num_classes)])
    for sample in splits.test:
        distances = np.linalg.norm(centroids - features(sample), axis=1)
        assert int(distances.argmin()) == sample.label
    # ... and the images of one class are not copies of each other.
    first_two = [s for s in splits.train if s.label == 0][:2]
    a, b = (np.asarray(load_image(s.path)) for s in first_two)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"layout": "zip"}, "layout"), ({"classnames": ["a", "a"]}, "distinct"), ({"n_train": 0}, "n_train"),
     ({"classnames": []}, "classnames")],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        make_synthetic_dataset(tmp_path, **kwargs)
