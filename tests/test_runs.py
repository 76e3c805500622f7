"""Runs end to end: the run directory, skip/resume, the results index and reloading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import biomedap.runs as runs
from biomedap.config import resolve_run_config
from biomedap.features import FeatureCache, encode_samples
from biomedap.methods import Batch
from biomedap.runs import RunError, load_run, rebuild_index, run_experiment

GOLDEN = Path(__file__).parent / "golden"


def _config(data_dir, out, method="coop", *extra):
    return resolve_run_config(method, overrides=[
        f"data.dataset={data_dir}", "backbone=tiny", f"output_dir={out}", "device=cpu",
        "optim.epochs=6", "data.views=3", "optim.lr=0.05", "optim.batch_size=16", *extra,
    ])


@pytest.fixture
def counted(tiny_backbone):
    """Counts images through the image tower."""
    seen = []
    original = tiny_backbone.encode_image

    def wrapper(pixels=None, **kwargs):
        if pixels is not None:
            seen.append(pixels.shape[0])
        return original(pixels, **kwargs)

    tiny_backbone.encode_image = wrapper
    try:
        yield seen
    finally:
        del tiny_backbone.encode_image  # the class method shows through again


def test_run_directory_is_complete_and_self_describing(synthetic_root, tmp_path, tiny_backbone, feature_cache):
    config = _config(synthetic_root / "SYNTH", tmp_path / "runs")
    result = run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    run_dir = result.run_dir
    for name in ("config.yaml", "card.json", "state.safetensors", "fewshot.json", "result.json",
                 "test_logits.safetensors", "log.txt"):
        assert (run_dir / name).is_file(), name
    card = json.loads((run_dir / "card.json").read_text())
    assert card["format_version"] == 1 and card["method"] == "coop"
    assert card["classnames"] == ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
    assert card["backbone"]["fingerprint"] == tiny_backbone.identity.fingerprint
    stored = json.loads((run_dir / "result.json").read_text())
    assert stored["metrics"]["test"]["n"] == 32 and 0 <= stored["metrics"]["test"]["accuracy"] <= 1
    assert stored["fit"]["epochs"] == 6 and stored["fit"]["steps"] == 6 * 3  # 48 train images / batch 16
    # Only the learned state is saved: 4 context vectors of width 64.
    state = load_file(run_dir / "state.safetensors")
    assert list(state) == ["ctx"] and state["ctx"].shape == (4, tiny_backbone.text.width)
    assert (run_dir / "state.safetensors").stat().st_size < 4096
    # The log has one line per epoch, the index one row per evaluated split.
    assert sum(line.startswith("epoch") for line in (run_dir / "log.txt").read_text().splitlines()) == 6
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["run_id"] == result.run_id and rows[0]["split"] == "test"
    assert rows[0]["accuracy"] == stored["metrics"]["test"]["accuracy"]

    # Reloading the run gives the stored test logits.
    method, _ = load_run(run_dir, backbone=tiny_backbone)
    splits_test = [s for s in json.loads((run_dir / "fewshot.json").read_text())["test"]]
    image_root = synthetic_root / "SYNTH" / "SYNTH"
    features = encode_samples(tiny_backbone, [str(image_root / rel) for rel, _, _ in splits_test], cache=feature_cache)
    with torch.no_grad():
        logits = method(Batch(features=features))
    torch.testing.assert_close(logits, load_file(run_dir / "test_logits.safetensors")["logits"], atol=1e-5, rtol=1e-5)


def test_finished_run_is_skipped_without_encoding(synthetic_root, tmp_path, tiny_backbone, feature_cache, counted):
    config = _config(synthetic_root / "SYNTH", tmp_path / "runs")
    first = run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert sum(counted) > 0
    counted.clear()
    again = run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert again.skipped and again.run_id == first.run_id and again.metrics == first.metrics
    assert counted == []
    # Another seed reuses every eval-view feature: only its own augmented views are new.
    other = _config(synthetic_root / "SYNTH", tmp_path / "runs", "coop", "seed=2")
    run_experiment(other, backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert sum(counted) == 3 * 48  # 3 views x 48 training images; test and train eval views cached


def test_interrupted_run_resumes_and_matches_uninterrupted(synthetic_root, tmp_path, tiny_backbone, feature_cache,
                                                           monkeypatch):
    data = synthetic_root / "SYNTH"
    reference = run_experiment(_config(data, tmp_path / "a"), backbone=tiny_backbone, cache=feature_cache,
                               progress=False)

    original = runs._append_log

    def crash_after_epoch_3(run_dir, line):
        original(run_dir, line)
        if line.startswith("epoch    3"):
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_append_log", crash_after_epoch_3)
    config = _config(data, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    run_dir = tmp_path / "b" / reference.run_id
    assert (run_dir / "resume.pt").is_file() and not (run_dir / "result.json").exists()
    monkeypatch.setattr(runs, "_append_log", original)

    resumed = run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert json.loads((run_dir / "result.json").read_text())["fit"]["resumed_from_epoch"] == 4
    assert not (run_dir / "resume.pt").exists()
    assert torch.equal(load_file(run_dir / "state.safetensors")["ctx"],
                       load_file(reference.run_dir / "state.safetensors")["ctx"])
    assert resumed.metrics["test"]["accuracy"] == reference.metrics["test"]["accuracy"]


def test_index_is_rebuilt_from_run_directories(synthetic_root, tmp_path, tiny_backbone, feature_cache, caplog):
    out = tmp_path / "runs"
    run_experiment(_config(synthetic_root / "SYNTH", out), backbone=tiny_backbone, cache=feature_cache, progress=False)
    run_experiment(_config(synthetic_root / "SYNTH", out, "zeroshot"), backbone=tiny_backbone, cache=feature_cache,
                   progress=False)
    index = out / "results.jsonl"
    before = sorted(index.read_text().splitlines())
    assert len(before) == 2
    index.unlink()
    (out / "broken").mkdir()
    (out / "broken" / "result.json").write_text("{not json")
    rebuild_index(out)
    assert sorted(index.read_text().splitlines()) == before
    assert "broken" in caplog.text


def test_base_subsample_trains_on_the_first_half(synthetic_root, tmp_path, tiny_backbone, feature_cache):
    config = _config(synthetic_root / "SYNTH", tmp_path / "runs", "coop", "data.subsample=base")
    result = run_experiment(config, backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert "-base-" in result.run_id
    card = json.loads((result.run_dir / "card.json").read_text())
    assert card["classnames"] == ["glioma tumor", "meningioma tumor"]
    assert result.metrics["test"]["n"] == 16


def test_load_run_refuses_a_different_backbone(synthetic_root, tmp_path, tiny_backbone, feature_cache):
    from biomedap.backbone import build_tiny_backbone

    result = run_experiment(_config(synthetic_root / "SYNTH", tmp_path / "runs"), backbone=tiny_backbone,
                            cache=feature_cache, progress=False)
    with pytest.raises(RunError, match="fingerprint"):
        load_run(result.run_dir, backbone=build_tiny_backbone(seed=1))
    (result.run_dir / "state.safetensors").unlink()
    with pytest.raises(RunError, match="state.safetensors"):
        load_run(result.run_dir, backbone=tiny_backbone)


def test_golden_artifact_of_format_version_1_still_loads(tiny_backbone, tmp_path):
    """A run directory written by biomedap 0.1 (card format 1) must keep loading and predicting."""
    run_dir = tmp_path / "golden"
    shutil.copytree(GOLDEN / "run_v1", run_dir)
    method, card = load_run(run_dir, backbone=tiny_backbone)
    assert card["format_version"] == 1
    stored = load_file(GOLDEN / "run_v1_expected.safetensors")
    with torch.no_grad():
        logits = method(Batch(features=stored["features"]))
    torch.testing.assert_close(logits, stored["logits"], atol=1e-5, rtol=1e-5)


def test_bad_data_fails_before_any_file_is_written(tmp_path, tiny_backbone, feature_cache):
    from biomedap.data import DataError

    out = tmp_path / "runs"
    with pytest.raises(DataError, match="missing-data"):
        run_experiment(_config(tmp_path / "missing-data", out), backbone=tiny_backbone, cache=feature_cache,
                       progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_run_id_follows_the_data_not_the_path_used(synthetic_root, tmp_path, tiny_backbone, feature_cache,
                                                   monkeypatch):
    out = tmp_path / "runs"
    absolute = run_experiment(_config(synthetic_root / "SYNTH", out), backbone=tiny_backbone, cache=feature_cache,
                              progress=False)
    monkeypatch.chdir(synthetic_root)
    relative = run_experiment(_config("SYNTH", out), backbone=tiny_backbone, cache=feature_cache, progress=False)
    assert relative.skipped and relative.run_id == absolute.run_id
