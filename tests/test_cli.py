"""The command line, in process through ``main([...])``: tiny backbone, generated data, caches under tmp."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from biomedap.cli import main
from biomedap.methods import list_methods


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured (for fixtures, where capsys is unavailable)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(data_dir: Path, base: Path, *extra: str) -> list[str]:
    return [
        "train", "--method", "coop", "--dataset", str(data_dir), "--backbone", "tiny", "--shots", "2",
        "--seed", "1", "--output-dir", str(base / "runs"), "--cache-dir", str(base / "cache"),
        "--device", "cpu",
        "--set", "optim.epochs=2", "data.views=2", *extra,
    ]


def run_dir_of(out: str) -> Path:
    match = re.search(r"^run directory: (.+)$", out, flags=re.MULTILINE)
    assert match, out
    return Path(match.group(1).strip())


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """One CoOp run trained through the CLI, shared by the eval / predict tests."""
    base = tmp_path_factory.mktemp("cli")
    args = train_args(synthetic_root / "SYNTH", base)
    code, out, err = run_main(args)
    assert code == 0, err
    return SimpleNamespace(args=args, out=out, err=err, run_dir=run_dir_of(out), base=base)


# ------------------------------------------------------------------------------------------- list


@pytest.mark.parametrize("what, expected", [
    ("methods", ["coop", "zeroshot", "features", "unseen classes"]),
    ("datasets", ["BTMRI", "btmri", "MRI", "glioma tumor"]),
    ("presets", ["coop", "zeroshot"]),
    ("backbones", ["biomedclip", "hf-hub:", "local-dir:", "tiny"]),
])
def test_list_prints_expected_names(capsys, what, expected):
    code, out, err = cli(capsys, "list", what)
    assert code == 0, err
    for name in expected:
        assert name in out


def test_no_command_and_version(capsys):
    code, _, err = cli(capsys)
    assert code == 2 and "COMMAND" in err
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.startswith("biomedap ")


# ------------------------------------------------------------------------------------------- train


def test_train_writes_a_complete_run_directory(trained):
    run_dir = trained.run_dir
    for name in ("config.yaml", "card.json", "state.safetensors", "result.json", "test_logits.safetensors",
                 "log.txt", "fewshot.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir.parent / "results.jsonl").is_file()
    assert sum(line.startswith("epoch") for line in (run_dir / "log.txt").read_text().splitlines()) == 2
    result = json.loads((run_dir / "result.json").read_text())
    assert result["shots"] == 2 and result["seed"] == 1 and result["fit"]["epochs"] == 2
    # The printed table shows the stored test accuracy in percent.
    accuracy = 100 * result["metrics"]["test"]["accuracy"]
    assert re.search(rf"^test\s+32\s+{accuracy:.2f}\s", trained.out, flags=re.MULTILINE), trained.out
    for column in ("accuracy %", "balanced acc %", "macro-F1 %", "AUROC %", "ECE %"):
        assert column in trained.out
    # Flags went through --set: the resolved config records them.
    config = (run_dir / "config.yaml").read_text()
    assert "backbone: tiny" in config and "views: 2" in config and "epochs: 2" in config


def test_second_identical_train_is_skipped_unless_forced(trained, capsys):
    result_file = trained.run_dir / "result.json"
    before = result_file.stat().st_mtime_ns
    code, out, err = cli(capsys, *trained.args)
    assert code == 0, err
    assert "Skipped" in out and run_dir_of(out) == trained.run_dir
    assert result_file.stat().st_mtime_ns == before

    code, out, err = cli(capsys, *trained.args, "--force")
    assert code == 0, err
    assert "Skipped" not in out and run_dir_of(out) == trained.run_dir
    assert result_file.stat().st_mtime_ns != before


def test_help_config_lists_method_options_with_help(capsys):
    code, out, err = cli(capsys, "train", "--method", "coop", "--help-config")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("method_config.n_ctx "))
    assert "number of learned context vectors" in line and " 4 " in line
    lr = next(line for line in out.splitlines() if line.startswith("optim.lr "))
    assert "0.002" in lr  # the preset's value


def test_flags_override_config_file_and_set_overrides_flags(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  shots: 8\noptim:\n  epochs: 7\n  lr: 0.1\n")
    code, out, err = cli(capsys, "train", "--method", "coop", "--config", config, "--shots", "3",
                         "--set", "optim.lr=0.5", "--help-config")
    assert code == 0, err
    values = {line.split()[0]: line.split()[2] for line in out.splitlines() if line[:1].isalpha() and
              len(line.split()) > 2}
    assert values["data.shots"] == "3" and values["optim.epochs"] == "7" and values["optim.lr"] == "0.5"


def test_unknown_method_exits_2_with_a_suggestion(capsys, tmp_path):
    code, out, err = cli(capsys, "train", "--method", "cop", "--dataset", tmp_path, "--output-dir", tmp_path)
    assert code == 2
    assert err.startswith("biomedap: error:") and "Did you mean 'coop'" in err and "Traceback" not in err


def test_bad_set_key_exits_2_naming_the_key(capsys, synthetic_root, tmp_path):
    code, _, err = cli(capsys, *train_args(synthetic_root / "SYNTH", tmp_path, "optim.lrr=0.1"))
    assert code == 2
    assert "optim.lrr" in err and "optim.lr" in err and "Traceback" not in err


def test_missing_dataset_root_exits_2_naming_the_path(capsys, tmp_path):
    missing = tmp_path / "no-such-root"
    code, _, err = cli(capsys, "train", "--method", "coop", "--dataset", "btmri", "--root", missing,
                       "--backbone", "tiny", "--output-dir", tmp_path / "runs",
                       "--cache-dir", tmp_path / "cache")
    assert code == 2
    assert str(missing) in err and "Traceback" not in err


def test_debug_flag_reraises(tmp_path):
    with pytest.raises(KeyError, match="Did you mean"):
        main(["--debug", "train", "--method", "cop", "--dataset", str(tmp_path)])


# ------------------------------------------------------------------------------------------- eval


def test_eval_reproduces_the_stored_test_accuracy(trained, capsys, tmp_path):
    stored = json.loads((trained.run_dir / "result.json").read_text())["metrics"]["test"]
    output = tmp_path / "eval.json"
    code, out, err = cli(capsys, "eval", "--run", trained.run_dir, "--device", "cpu", "--output", output)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["split"] == "test" and report["metrics"]["n"] == stored["n"]
    assert report["metrics"]["accuracy"] == pytest.approx(stored["accuracy"], abs=1e-9)
    assert report["metrics"]["macro_f1"] == pytest.approx(stored["macro_f1"], abs=1e-9)
    assert f"{100 * stored['accuracy']:.2f}" in out


def test_eval_on_another_dataset_uses_its_class_names(trained, capsys, tmp_path):
    from biomedap.data.synthetic import make_synthetic_dataset

    other = make_synthetic_dataset(tmp_path, name="OTHER", classnames=["normal lungs", "covid lungs"],
                                   n_train=2, n_val=1, n_test=3, seed=3)
    output = tmp_path / "other.json"
    code, out, err = cli(capsys, "eval", "--run", trained.run_dir, "--dataset", other, "--device", "cpu",
                         "--cache-dir", tmp_path / "cache", "--output", output)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["dataset"] == "OTHER" and report["classnames"] == ["normal lungs", "covid lungs"]
    assert report["metrics"]["n"] == 6 and "covid lungs" in out


# ------------------------------------------------------------------------------------------- predict


def test_predict_writes_topk_rows_per_image(trained, capsys, synthetic_root, tmp_path):
    image_dir = synthetic_root / "SYNTH" / "SYNTH"
    folder = image_dir / "glioma_tumor"
    single = image_dir / "normal_brain" / "test_0000.png"
    output = tmp_path / "preds.csv"
    code, out, err = cli(capsys, "predict", "--run", trained.run_dir, folder, single, "--topk", "3",
                         "--output", output, "--device", "cpu")
    assert code == 0, err
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["path", "rank", "class", "probability"]
    n_images = len(list(folder.glob("*.png"))) + 1
    by_image = defaultdict(list)
    for row in rows:
        by_image[row["path"]].append(row)
    assert len(by_image) == n_images and len(rows) == 3 * n_images
    classnames = json.loads((trained.run_dir / "card.json").read_text())["classnames"]
    for image_rows in by_image.values():
        assert [int(r["rank"]) for r in image_rows] == [1, 2, 3]
        probabilities = [float(r["probability"]) for r in image_rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert all(r["class"] in classnames for r in image_rows)
    assert str(single) in out


def test_predict_writes_preds_csv_by_default_and_csv_to_stdout_with_dash(trained, capsys, synthetic_root,
                                                                         tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = synthetic_root / "SYNTH" / "SYNTH" / "normal_brain" / "test_0000.png"
    code, _, err = cli(capsys, "predict", "--run", trained.run_dir, image, "--topk", "2", "--device", "cpu")
    assert code == 0, err
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 2
    (tmp_path / "preds.csv").unlink()
    code, out, err = cli(capsys, "predict", "--run", trained.run_dir, image, "--topk", "2", "--output", "-",
                         "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "path,rank,class,probability" and len(lines) == 3
    assert lines[1].startswith(f"{image},1,")
    assert not (tmp_path / "preds.csv").exists()


def test_predict_without_images_exits_2_naming_the_folder(trained, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, _, err = cli(capsys, "predict", "--run", trained.run_dir, empty)
    assert code == 2 and str(empty) in err


def test_predict_unreadable_image_exits_2_naming_the_file(trained, capsys, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code, _, err = cli(capsys, "predict", "--run", trained.run_dir, broken, "--device", "cpu")
    assert code == 2 and str(broken) in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- cache


def test_cache_build_info_rebuild_and_clear(capsys, synthetic_root, tmp_path):
    from biomedap.features import FeatureCache

    cache_dir = tmp_path / "features"
    build = ["cache", "build", "--dataset", synthetic_root / "SYNTH", "--backbone", "tiny",
             "--cache-dir", cache_dir, "--splits", "train,test", "--shots", "2", "--views", "2",
             "--device", "cpu"]
    code, out, err = cli(capsys, *build)
    assert code == 0, err
    stats = FeatureCache(cache_dir).stats()
    assert len(stats) == 1
    (fingerprint, entry), = stats.items()
    assert entry["entries"] == 8 + 32 + 2 * 8  # 2-shot train, full test, 2 augmented views of train

    code, out, err = cli(capsys, "cache", "info", "--cache-dir", cache_dir)
    assert code == 0, err
    assert fingerprint in out and str(entry["entries"]) in out and "tiny" in out

    code, out, err = cli(capsys, *build)
    assert code == 0, err
    assert "0 new feature(s) encoded" in out
    assert FeatureCache(cache_dir).stats() == stats

    code, _, err = cli(capsys, "cache", "clear", "--cache-dir", cache_dir)  # stdin is not a terminal
    assert code == 2 and "--yes" in err and cache_dir.is_dir()
    code, out, err = cli(capsys, "cache", "clear", "--cache-dir", cache_dir, "--yes")
    assert code == 0, err
    assert not cache_dir.exists()


def test_cache_clear_refuses_a_folder_that_is_not_a_cache(capsys, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = cli(capsys, "cache", "clear", "--cache-dir", tmp_path, "--yes")
    assert code == 2 and "does not look like" in err
    assert (tmp_path / "precious.txt").is_file()


# ------------------------------------------------------------------------------------------- demo


def test_demo_quick_writes_a_results_table(capsys, tmp_path):
    code, out, err = cli(capsys, "demo", "--quick", "--output-dir", tmp_path / "demo")
    assert code == 0, err
    results = (tmp_path / "demo" / "results.md").read_text()
    assert "| method | 4-shot |" in results
    assert re.search(r"^\| zero-shot \| \d+\.\d \|$", results, flags=re.MULTILINE), results
    assert re.search(r"^\| CoOp \| \d+\.\d \|$", results, flags=re.MULTILINE), results
    assert "no pretrained knowledge" in results and "| CoOp |" in out
    assert len(list((tmp_path / "demo" / "runs").glob("*/result.json"))) == 2


# ------------------------------------------------------------------------------------------- entry point


def test_python_dash_m_help_exits_0():
    completed = subprocess.run([sys.executable, "-m", "biomedap", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    for command in ("list", "train", "eval", "predict", "cache", "demo"):
        assert command in completed.stdout


# ------------------------------------------------------------------------------ every method end to end

ALL_METHODS = [cls.name for cls in list_methods()]
# Options the tiny 6-block test backbone needs on top of a method's preset (the presets are for BiomedCLIP).
TINY_BACKBONE_SETS = {"biomedap": ["method_config.fusion_layers=[2,4]"]}


def test_list_methods_shows_every_baseline(capsys):
    code, out, err = cli(capsys, "list", "methods")
    assert code == 0, err
    for name in ALL_METHODS:
        assert re.search(rf"^{re.escape(name)}\s", out, flags=re.MULTILINE), name


@pytest.mark.parametrize("method", ALL_METHODS)
def test_train_and_eval_every_method_from_the_command_line(method, synthetic_root, tmp_path, capsys):
    args = [
        "train", "--method", method, "--dataset", str(synthetic_root / "SYNTH"), "--backbone", "tiny",
        "--shots", "4", "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        "--device", "cpu", "--set", "optim.epochs=2", "data.views=1", "optim.batch_size=8",
        *TINY_BACKBONE_SETS.get(method, []),
    ]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    run_dir = run_dir_of(out)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == method and 0.0 <= result["metrics"]["test"]["accuracy"] <= 1.0
    code, out, err = cli(capsys, "eval", "--run", str(run_dir), "--output", str(tmp_path / "eval.json"))
    assert code == 0, err
    again = json.loads((tmp_path / "eval.json").read_text())["metrics"]["accuracy"]
    assert again == pytest.approx(result["metrics"]["test"]["accuracy"])
    # The novel classes of base-to-novel: methods tied to their training classes refuse with a clear error.
    from biomedap.methods import get_method

    code, out, err = cli(capsys, "eval", "--run", str(run_dir), "--subsample", "novel")
    if get_method(method).supports_unseen_classes:
        assert code == 0, err
    else:
        assert code == 2 and "cannot name" in err
