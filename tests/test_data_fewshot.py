"""K-shot sampling reproduces the published Dassl picks; base/novel splits; JSON round trip."""

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from biomedap.data import (
    SPLITS,
    DatasetSplits,
    EmptyDatasetError,
    FewShotSplit,
    InvalidOptionError,
    Sample,
    SplitFormatError,
    fewshot_filename,
    load_split_json,
    sample_few_shot,
    subsample_classes,
)

GOLDEN_SPLIT = Path(__file__).parent / "golden" / "split_GOLDEN.json"

# Output of tests/golden/make_fewshot_golden.py (global random.seed + random.sample, like Dassl),
# pasted verbatim. Keys are (shots, split_seed).
GOLDEN_PICKS = {
    (1, 1): {"train": ["gamma_cell/tr_01.png", "alpha_cell/tr_09.png", "beta_cell/tr_01.png"],
             "val": ["beta_cell/va_02.png", "gamma_cell/va_00.png", "alpha_cell/va_03.png"]},
    (2, 2): {"train": ["gamma_cell/tr_06.png", "gamma_cell/tr_00.png", "alpha_cell/tr_01.png",
                       "alpha_cell/tr_11.png", "beta_cell/tr_05.png", "beta_cell/tr_02.png"],
             "val": ["beta_cell/va_05.png", "beta_cell/va_02.png", "gamma_cell/va_01.png",
                     "gamma_cell/va_00.png", "alpha_cell/va_04.png", "alpha_cell/va_00.png"]},
    (4, 1): {"train": ["gamma_cell/tr_01.png", "gamma_cell/tr_04.png", "gamma_cell/tr_00.png",
                       "gamma_cell/tr_02.png", "alpha_cell/tr_01.png", "alpha_cell/tr_07.png",
                       "alpha_cell/tr_10.png", "alpha_cell/tr_09.png", "beta_cell/tr_06.png",
                       "beta_cell/tr_03.png", "beta_cell/tr_00.png", "beta_cell/tr_07.png"],
             "val": ["beta_cell/va_00.png", "beta_cell/va_03.png", "beta_cell/va_04.png",
                     "beta_cell/va_02.png",
                     "gamma_cell/va_00.png", "gamma_cell/va_01.png", "gamma_cell/va_02.png",
                     "alpha_cell/va_00.png", "alpha_cell/va_03.png", "alpha_cell/va_01.png",
                     "alpha_cell/va_04.png"]},
    (8, 3): {"train": ["gamma_cell/tr_00.png", "gamma_cell/tr_01.png", "gamma_cell/tr_02.png",
                       "gamma_cell/tr_03.png", "gamma_cell/tr_04.png", "gamma_cell/tr_05.png",
                       "gamma_cell/tr_06.png", "alpha_cell/tr_03.png", "alpha_cell/tr_09.png",
                       "alpha_cell/tr_08.png", "alpha_cell/tr_02.png", "alpha_cell/tr_05.png",
                       "alpha_cell/tr_04.png", "alpha_cell/tr_11.png", "alpha_cell/tr_06.png",
                       "beta_cell/tr_01.png", "beta_cell/tr_00.png", "beta_cell/tr_06.png",
                       "beta_cell/tr_03.png", "beta_cell/tr_02.png", "beta_cell/tr_08.png",
                       "beta_cell/tr_07.png", "beta_cell/tr_05.png"],
             "val": ["beta_cell/va_04.png", "beta_cell/va_05.png", "beta_cell/va_03.png",
                     "beta_cell/va_01.png",
                     "gamma_cell/va_00.png", "gamma_cell/va_01.png", "gamma_cell/va_02.png",
                     "alpha_cell/va_01.png", "alpha_cell/va_04.png", "alpha_cell/va_02.png",
                     "alpha_cell/va_00.png"]},
    (16, 1): {"train": ["gamma_cell/tr_00.png", "gamma_cell/tr_01.png", "gamma_cell/tr_02.png",
                        "gamma_cell/tr_03.png", "gamma_cell/tr_04.png", "gamma_cell/tr_05.png",
                        "gamma_cell/tr_06.png", "alpha_cell/tr_00.png", "alpha_cell/tr_01.png",
                        "alpha_cell/tr_02.png", "alpha_cell/tr_03.png", "alpha_cell/tr_04.png",
                        "alpha_cell/tr_05.png", "alpha_cell/tr_06.png", "alpha_cell/tr_07.png",
                        "alpha_cell/tr_08.png", "alpha_cell/tr_09.png", "alpha_cell/tr_10.png",
                        "alpha_cell/tr_11.png", "beta_cell/tr_00.png", "beta_cell/tr_01.png",
                        "beta_cell/tr_02.png", "beta_cell/tr_03.png", "beta_cell/tr_04.png",
                        "beta_cell/tr_05.png", "beta_cell/tr_06.png", "beta_cell/tr_07.png",
                        "beta_cell/tr_08.png"],
              "val": ["beta_cell/va_01.png", "beta_cell/va_04.png", "beta_cell/va_00.png",
                      "beta_cell/va_05.png",
                      "gamma_cell/va_00.png", "gamma_cell/va_01.png", "gamma_cell/va_02.png",
                      "alpha_cell/va_00.png", "alpha_cell/va_03.png", "alpha_cell/va_01.png",
                      "alpha_cell/va_02.png"]},
}


@pytest.fixture
def golden(tmp_path) -> DatasetSplits:
    """The golden split file in the published layout (images are not needed: check_files=False)."""
    (tmp_path / "GOLDEN" / "GOLDEN").mkdir(parents=True)
    shutil.copy(GOLDEN_SPLIT, tmp_path / "GOLDEN" / "split_GOLDEN.json")
    return load_split_json(tmp_path, "GOLDEN", check_files=False)


def _rel(samples, root) -> list[str]:
    return [Path(os.path.relpath(s.path, root)).as_posix() for s in samples]


def _fake_splits(num_classes: int, per_class: int = 5) -> DatasetSplits:
    names = [f"class {c}" for c in range(num_classes)]

    def make(split: str, n: int) -> list[Sample]:
        return [Sample(f"/data/{split}/{c}_{i}.png", c, names[c])
                for i in range(n) for c in range(num_classes)]

    return DatasetSplits(name=f"FAKE{num_classes}", classnames=names, image_root=Path("/data"),
                         train=make("train", per_class), val=make("val", per_class), test=make("test", 3),
                         source="in memory", source_sha256="0" * 64)


@pytest.mark.parametrize("shots,seed", sorted(GOLDEN_PICKS))
def test_picks_equal_the_independent_dassl_reference(golden, shots, seed):
    fs = sample_few_shot(golden, shots, seed)
    assert _rel(fs.train, golden.image_root) == GOLDEN_PICKS[(shots, seed)]["train"]
    assert _rel(fs.val, golden.image_root) == GOLDEN_PICKS[(shots, seed)]["val"]


def test_golden_file_has_unsorted_first_appearance(golden):
    first_seen = list(dict.fromkeys(s.label for s in golden.train))
    assert first_seen == [2, 0, 1] and first_seen != sorted(first_seen)
    assert golden.classnames == ["alpha cell", "beta cell", "gamma cell"]


def test_first_appearance_order_matters(golden):
    """Sampling classes in sorted-label order would draw other images: the order is load-bearing."""
    rng = random.Random(4)
    by_label: dict[int, list[Sample]] = {}
    for s in golden.train:
        by_label.setdefault(s.label, []).append(s)
    sorted_order = [x for label in sorted(by_label) for x in rng.sample(by_label[label], 4)]
    ours = sample_few_shot(golden, 4, 4).train
    assert sorted(s.path for s in ours) != sorted(s.path for s in sorted_order)


def test_val_uses_min_k_4_and_test_is_untouched(golden):
    for shots in (1, 2, 4, 8, 16):
        fs = sample_few_shot(golden, shots, 1)
        per_class = {c: sum(s.label == c for s in fs.val) for c in range(3)}
        available = {c: sum(s.label == c for s in golden.val) for c in range(3)}
        assert per_class == {c: min(shots, 4, available[c]) for c in range(3)}
        assert fs.test == golden.test
        assert fs.classnames == golden.classnames and fs.source_sha256 == golden.source_sha256


def test_class_with_fewer_than_k_is_kept_whole_with_a_note(golden, caplog):
    with caplog.at_level(logging.WARNING, logger="biomedap.data.fewshot"):
        fs = sample_few_shot(golden, 8, 3)
    gamma = [s for s in fs.train if s.classname == "gamma cell"]
    assert len(gamma) == 7 and len({s.path for s in gamma}) == 7  # no repeats
    assert "class 'gamma cell' has 7 train images < K=8: kept all 7" in fs.notes
    assert "class 'gamma cell' has 3 val images < K=4: kept all 3" in fs.notes
    assert any("gamma cell" in record.getMessage() for record in caplog.records)


def test_sampling_leaves_global_random_alone(golden):
    random.seed(123)
    state = random.getstate()
    sample_few_shot(golden, 4, 1)
    assert random.getstate() == state


@pytest.mark.parametrize("shots", [0, -1, 1.5, "4", True, None])
def test_bad_shots(golden, shots):
    with pytest.raises(InvalidOptionError, match="shots"):
        sample_few_shot(golden, shots, 1)


def test_bad_split_seed(golden):
    with pytest.raises(InvalidOptionError, match="split_seed"):
        sample_few_shot(golden, 4, "1")


def test_json_round_trip_keeps_relative_paths(golden, tmp_path):
    fs = sample_few_shot(golden, 4, 1)
    target = tmp_path / "out" / fewshot_filename(4, 1)
    fs.to_json(target)
    assert target.name == "shot_4-seed_1.json"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left behind
    text = target.read_text()
    assert str(golden.image_root) not in text  # relative paths only
    data = json.loads(text)
    assert data["train"][0] == ["gamma_cell/tr_01.png", 2, "gamma cell"]
    assert data["shots"] == 4 and data["split_seed"] == 1

    same = FewShotSplit.from_json(target, golden.image_root)
    assert same == fs

    moved_root = tmp_path / "elsewhere"
    moved = FewShotSplit.from_json(target, moved_root)
    for split in SPLITS:
        assert _rel(moved.split(split), moved_root) == _rel(fs.split(split), golden.image_root)
        labels = [(s.label, s.classname) for s in fs.split(split)]
        assert [(s.label, s.classname) for s in moved.split(split)] == labels


def test_from_json_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "X"}))
    with pytest.raises(SplitFormatError, match="bad.json"):
        FewShotSplit.from_json(bad, tmp_path)
    with pytest.raises(SplitFormatError, match="does not exist"):
        FewShotSplit.from_json(tmp_path / "none.json", tmp_path)


@pytest.mark.parametrize("num_classes", [3, 4, 5, 7, 8])
def test_base_novel_halves_and_relabels(num_classes):
    fs = sample_few_shot(_fake_splits(num_classes), 2, 1)
    base, novel = subsample_classes(fs, "base"), subsample_classes(fs, "novel")
    m = math.ceil(num_classes / 2)
    assert base.classnames == [f"class {c}" for c in range(m)]
    assert novel.classnames == [f"class {c}" for c in range(m, num_classes)]
    for half, offset in ((base, 0), (novel, m)):
        for split in SPLITS:
            samples = half.split(split)
            assert {s.label for s in samples} == set(range(half.num_classes))
            assert all(s.classname == f"class {s.label + offset}" for s in samples)
        assert len(half.train) == 2 * half.num_classes
        assert len(half.test) == 3 * half.num_classes
    assert base.subset == "base" and novel.subset == "novel"
    assert len(base.test) + len(novel.test) == len(fs.test)


def test_subsample_accepts_new_alias_and_all_and_rejects_twice():
    fs = sample_few_shot(_fake_splits(4), 2, 1)
    assert subsample_classes(fs, "new").classnames == ["class 2", "class 3"]
    everything = subsample_classes(fs, "all")
    assert everything == fs and everything.train is not fs.train
    with pytest.raises(InvalidOptionError, match="already"):
        subsample_classes(subsample_classes(fs, "base"), "novel")
    with pytest.raises(InvalidOptionError, match="which"):
        subsample_classes(fs, "half")


def test_empty_train_split_is_an_error():
    empty = _fake_splits(3)
    empty.train = []
    with pytest.raises(EmptyDatasetError, match="FAKE3"):
        sample_few_shot(empty, 4, 1)
