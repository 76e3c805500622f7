"""Loaders: split-json, ImageFolder and CSV agree; every bad input fails with a clear error."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from biomedap.data import (
    SPLITS,
    ClassnameMismatchError,
    DatasetRootNotFoundError,
    EmptyDatasetError,
    InvalidOptionError,
    LabelMismatchError,
    MissingImageError,
    SplitFileNotFoundError,
    SplitFormatError,
    UnknownDatasetError,
    UnreadableImageError,
    load_csv,
    load_dataset,
    load_image,
    load_image_folder,
    load_split_json,
    make_synthetic_dataset,
)

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
COUNTS = {"train": 5, "val": 2, "test": 3}


@pytest.fixture(scope="session")
def layouts_root(tmp_path_factory) -> Path:
    """One small synthetic dataset in each layout (read-only for the tests that share it)."""
    root = tmp_path_factory.mktemp("data_sources")
    for layout in ("split-json", "imagefolder", "csv"):
        make_synthetic_dataset(root / layout, classnames=CLASSES, layout=layout, n_train=COUNTS["train"],
                               n_val=COUNTS["val"], n_test=COUNTS["test"], image_size=16, seed=0)
    return root


@pytest.fixture
def split_json_copy(layouts_root, tmp_path) -> Path:
    """A private, writable copy of the split-json dataset root."""
    shutil.copytree(layouts_root / "split-json", tmp_path / "root")
    return tmp_path / "root"


def _write_split(root: Path, name: str, data: dict) -> Path:
    (root / name / name).mkdir(parents=True, exist_ok=True)
    path = root / name / f"split_{name}.json"
    path.write_text(json.dumps(data))
    return path


def _per_class_counts(splits) -> dict:
    return {s: dict(Counter(x.classname for x in splits.split(s))) for s in SPLITS}


# ------------------------------------------------------------------------------------------------
# the three layouts agree


def test_layouts_give_same_classes_and_counts(layouts_root):
    loaded = {
        "split-json": load_dataset(layouts_root / "split-json" / "SYNTH"),
        "imagefolder": load_dataset(layouts_root / "imagefolder" / "SYNTH"),
        "csv": load_dataset(layouts_root / "csv" / "SYNTH" / "labels.csv"),
    }
    # split-json keeps the file's label order; folders and CSV names sort alphabetically.
    assert loaded["split-json"].classnames == CLASSES
    assert loaded["imagefolder"].classnames == sorted(CLASSES)
    assert loaded["csv"].classnames == sorted(CLASSES)
    expected = {s: {c: COUNTS[s] for c in CLASSES} for s in SPLITS}
    for layout, splits in loaded.items():
        assert splits.name == "SYNTH", layout
        assert _per_class_counts(splits) == expected, layout
        for sample in splits.train + splits.val + splits.test:
            assert os.path.isabs(sample.path) and os.path.isfile(sample.path)
            assert splits.classnames[sample.label] == sample.classname


def test_split_json_matches_published_semantics(layouts_root):
    splits = load_split_json(layouts_root / "split-json", "SYNTH")
    raw = json.loads((layouts_root / "split-json" / "SYNTH" / "split_SYNTH.json").read_text())
    assert splits.image_root == layouts_root / "split-json" / "SYNTH" / "SYNTH"
    for split in SPLITS:
        relpaths = [os.path.relpath(s.path, splits.image_root) for s in splits.split(split)]
        assert relpaths == [r[0] for r in raw[split]]
        assert [s.label for s in splits.split(split)] == [r[1] for r in raw[split]]
    assert splits.source.startswith("split-json ")
    assert splits.summary()["train"] == {c: COUNTS["train"] for c in CLASSES}
    assert "glioma tumor" in splits.summary_text()


def test_custom_name_with_root_and_hash_is_stable(layouts_root):
    a = load_dataset("SYNTH", root=layouts_root / "split-json")
    b = load_split_json(str(layouts_root / "split-json"), "SYNTH", check_files=False)
    assert a.classnames == b.classnames and a.train == b.train
    assert a.source_sha256 == b.source_sha256 and len(a.source_sha256) == 64


def test_underscored_classnames_in_split_file_read_as_spaces(tmp_path):
    _write_split(tmp_path, "MINI", {"train": [["a_b/x.png", 0, "a_b"]], "val": [],
                                    "test": [["c/y.png", 1, "c"]]})
    splits = load_split_json(tmp_path, "MINI", check_files=False)
    assert splits.classnames == ["a b", "c"]


def test_image_folder_flat_layout_split_is_deterministic(tmp_path):
    for classname in ("cat_a", "cat_b"):
        folder = tmp_path / "flat" / classname
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4)).save(folder / f"{i}.PNG")  # upper-case extension counts
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"")
    a = load_image_folder(tmp_path / "flat", seed=0)
    b = load_image_folder(tmp_path / "flat", seed=0)
    c = load_image_folder(tmp_path / "flat", seed=1)
    assert a.classnames == ["cat a", "cat b"]
    assert _per_class_counts(a) == {"train": {"cat a": 5, "cat b": 5}, "val": {"cat a": 2, "cat b": 2},
                                    "test": {"cat a": 3, "cat b": 3}}
    assert a.train == b.train and a.test == b.test and a.source_sha256 == b.source_sha256
    assert a.train != c.train and a.source_sha256 != c.source_sha256
    every = sorted(s.path for s in a.train + a.val + a.test)
    assert len(every) == len(set(every)) == 20
    custom = load_image_folder(tmp_path / "flat", val_fraction=0.0, test_fraction=0.5)
    assert len(custom.val) == 0 and len(custom.test) == 10


def test_csv_integer_labels_classname_column_and_no_split(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["path,label,classname"]
    for i in range(6):
        Image.new("RGB", (4, 4)).save(images / f"{i}.png")
        label = i % 2
        rows.append(f"{i}.png,{label},{['normal_scan', 'benign tumor'][label]}")
    (tmp_path / "meta").mkdir()
    csv_path = tmp_path / "meta" / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    splits = load_csv(csv_path, image_root=images, val_fraction=0.0, test_fraction=0.34)
    assert splits.classnames == ["normal scan", "benign tumor"]  # label order, not alphabetical
    assert splits.image_root == images
    assert {len(splits.train), len(splits.val), len(splits.test)} == {4, 0, 2}
    assert all(s.path.startswith(str(images)) for s in splits.train)


def test_csv_absolute_paths_and_split_aliases(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    csv_path = tmp_path / "x.csv"
    csv_path.write_text(
        f"Path,Label,Split\n{tmp_path / 'a.png'},x,TRAIN\n{tmp_path / 'b.png'},y,validation\n"
    )
    splits = load_dataset(csv_path)
    assert [s.classname for s in splits.train] == ["x"] and [s.classname for s in splits.val] == ["y"]


# ------------------------------------------------------------------------------------------------
# errors: type and message


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetRootNotFoundError) as info:
        load_split_json(missing, "BTMRI")
    assert str(missing) in str(info.value) and "split_BTMRI.json" in str(info.value)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetRootNotFoundError, match="BTMRI"):
        load_dataset("btmri", root=tmp_path)


def test_catalog_name_without_root_says_pass_root():
    with pytest.raises(InvalidOptionError, match="root="):
        load_dataset("BTMRI")


def test_unknown_dataset_name_suggests():
    with pytest.raises(UnknownDatasetError, match="Did you mean 'RETINA'"):
        load_dataset("retna")


def test_missing_split_file(split_json_copy):
    (split_json_copy / "SYNTH" / "split_SYNTH.json").unlink()
    with pytest.raises(SplitFileNotFoundError) as info:
        load_split_json(split_json_copy, "SYNTH")
    assert str(split_json_copy / "SYNTH" / "split_SYNTH.json") in str(info.value)


def test_image_listed_but_absent(split_json_copy):
    image_dir = split_json_copy / "SYNTH" / "SYNTH"
    victims = sorted((image_dir / "normal_brain").glob("test_*.png"))
    for victim in victims:
        victim.unlink()
    with pytest.raises(MissingImageError) as info:
        load_split_json(split_json_copy, "SYNTH")
    message = str(info.value)
    assert f"{len(victims)} image(s)" in message
    assert str(victims[0]) in message or str(victims[1]) in message
    assert "split_SYNTH.json" in message
    # The check can be skipped on purpose.
    assert len(load_split_json(split_json_copy, "SYNTH", check_files=False).test) == 4 * COUNTS["test"]


def test_unreadable_image_surfaces_with_its_path(split_json_copy):
    splits = load_split_json(split_json_copy, "SYNTH")
    victim = splits.train[0].path
    Path(victim).write_bytes(b"\x89PNG garbage garbage garbage")
    assert load_split_json(split_json_copy, "SYNTH").train[0].path == victim  # loaders do not decode
    with pytest.raises(UnreadableImageError) as info:
        load_image(victim)
    assert victim in str(info.value)


def test_label_classname_mismatch(tmp_path):
    split = _write_split(tmp_path, "MIX", {
        "train": [["a/1.png", 0, "alpha"], ["b/1.png", 1, "beta"]],
        "val": [["a/2.png", 0, "gamma"]],
        "test": [],
    })
    with pytest.raises(LabelMismatchError) as info:
        load_split_json(tmp_path, "MIX", check_files=False)
    message = str(info.value)
    assert "'alpha'" in message and "'gamma'" in message and str(split) in message


def test_one_class_with_two_labels(tmp_path):
    _write_split(tmp_path, "MIX", {"train": [["a/1.png", 0, "alpha"], ["a/2.png", 1, "alpha"]],
                                   "val": [], "test": []})
    with pytest.raises(LabelMismatchError, match="'alpha' appears with two labels"):
        load_split_json(tmp_path, "MIX", check_files=False)


def test_empty_class_list(tmp_path):
    split = _write_split(tmp_path, "EMPTY", {"train": [], "val": [], "test": []})
    with pytest.raises(EmptyDatasetError) as info:
        load_split_json(tmp_path, "EMPTY", check_files=False)
    assert str(split) in str(info.value)


def test_labels_must_be_contiguous(tmp_path):
    _write_split(tmp_path, "GAP", {"train": [["a/1.png", 0, "a"], ["c/1.png", 2, "c"]],
                                   "val": [], "test": []})
    with pytest.raises(SplitFormatError, match=r"missing \[1\]"):
        load_split_json(tmp_path, "GAP", check_files=False)


def test_catalog_classnames_mismatch(tmp_path):
    triples = [["x/1.png", 0, "benign tumor"], ["y/1.png", 1, "malignant tumor"], ["z/1.png", 2, "healthy"]]
    split = _write_split(tmp_path, "BUSI", {"train": triples, "val": [], "test": []})
    with pytest.raises(ClassnameMismatchError) as info:
        load_split_json(tmp_path, "busi", check_files=False)
    message = str(info.value)
    assert str(split) in message and "'healthy'" in message and "'normal scan'" in message
    assert "check_classnames=False" in message
    relaxed = load_split_json(tmp_path, "BUSI", check_files=False, check_classnames=False)
    assert relaxed.classnames[2] == "healthy"


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"train": [], "test": [], "valid": []}), "unexpected key"),
        (json.dumps({"train": []}), "no 'test' list"),
        (json.dumps({"train": [["a.png", "0", "a"]], "test": []}), r"train\[0\]"),
    ],
)
def test_malformed_split_file(tmp_path, content, match):
    (tmp_path / "BAD").mkdir()
    (tmp_path / "BAD" / "split_BAD.json").write_text(content)
    with pytest.raises(SplitFormatError, match=match) as info:
        load_split_json(tmp_path, "BAD", check_files=False)
    assert "split_BAD.json" in str(info.value)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetRootNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="No class folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "oneclass" / "full").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "oneclass" / "full" / "1.png")
    (tmp_path / "oneclass" / "hollow").mkdir()
    (tmp_path / "oneclass" / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(EmptyDatasetError) as info:
        load_image_folder(tmp_path / "oneclass")
    assert str(tmp_path / "oneclass" / "hollow") in str(info.value)
    with pytest.raises(InvalidOptionError, match="val_fraction"):
        load_image_folder(tmp_path / "oneclass", val_fraction=0.6, test_fraction=0.5)


def test_split_json_in_folder_must_match_folder_name(tmp_path):
    (tmp_path / "DS").mkdir()
    (tmp_path / "DS" / "split_OTHER.json").write_text("{}")
    with pytest.raises(SplitFormatError, match="split_DS.json"):
        load_dataset(tmp_path / "DS")


@pytest.mark.parametrize(
    "content,error,match",
    [
        ("file,label\na.png,x\n", SplitFormatError, "no 'path' column"),
        ("path,label,split\na.png,x,holdout\n", SplitFormatError, "line 2"),
        ("path,label\n", EmptyDatasetError, "no rows"),
        ("path,label,classname\na.png,0,x\nb.png,0,y\n", LabelMismatchError, "'x' and 'y'"),
        ("path,label\na.png,0\nb.png,2\n", SplitFormatError, "contiguous"),
    ],
)
def test_csv_errors(tmp_path, content, error, match):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(content)
    with pytest.raises(error, match=match) as info:
        load_csv(csv_path, check_files=False)
    assert "labels.csv" in str(info.value)


def test_csv_missing_image(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,split\ngone.png,x,train\n")
    with pytest.raises(MissingImageError, match="gone.png"):
        load_csv(csv_path)


def test_presplit_image_folder_needs_test_and_allows_missing_val(tmp_path):
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "ds" / "train" / "a" / "1.png")
    with pytest.raises(SplitFormatError, match="no test/ folder"):
        load_image_folder(tmp_path / "ds")
    (tmp_path / "ds" / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "ds" / "test" / "a" / "2.jpg")
    splits = load_image_folder(tmp_path / "ds")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1, 0, 1)


def test_inner_image_folder_of_split_json_dataset_warns(layouts_root, caplog):
    with caplog.at_level("WARNING", logger="biomedap.data.sources"):
        load_dataset(layouts_root / "split-json" / "SYNTH" / "SYNTH")
    assert any("split_SYNTH.json" in record.getMessage() for record in caplog.records)


def test_csv_quoted_fields(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a, b.png")
    (tmp_path / "l.csv").write_text('path,label,split\n"a, b.png","normal, scan",test\n')
    splits = load_csv(tmp_path / "l.csv")
    assert splits.classnames == ["normal, scan"] and splits.test[0].path.endswith("a, b.png")
