"""`biomedap prompts …` end to end, zero-shot over the built-in banks, and the bank samples page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from biomedap.cli import EXIT_OK, EXIT_USAGE, main
from biomedap.methods import build_method
from biomedap.prompts import MissingBankError, changed_fraction, load_bank

REPO = Path(__file__).resolve().parents[1]
BTMRI = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_one_class_prints_its_sentences(capsys):
    code, out, _ = run(capsys, "prompts", "show", "--dataset", "btmri", "--class", "glioma tumor", "--limit", "3")
    assert code == EXIT_OK
    lines = out.strip().splitlines()
    assert lines[0] == "glioma tumor (3)"
    assert [line[4:] for line in lines[1:]] == load_bank("btmri")["glioma tumor"][:3]


def test_show_json_round_trips_the_bank(capsys):
    code, out, _ = run(capsys, "prompts", "show", "--dataset", "busi", "--json")
    assert code == EXIT_OK
    assert json.loads(out) == load_bank("busi")


def test_show_attributes_are_framed_sentences(capsys):
    code, out, _ = run(capsys, "prompts", "show", "--dataset", "medmnist/pathmnist", "--attributes",
                       "--class", "adipose", "--json")
    assert code == EXIT_OK
    sentences = json.loads(out)["adipose"]
    assert len(sentences) == 10
    assert all(s.startswith("an H&E-stained colorectal histology patch of adipose, which ") for s in sentences)


def test_show_unknown_class_suggests_the_spelling(capsys):
    code, _, err = run(capsys, "prompts", "show", "--dataset", "btmri", "--class", "glioma tumour")
    assert code == EXIT_USAGE
    assert "Did you mean 'glioma tumor'" in err


def test_show_without_source_is_a_usage_error(capsys):
    code, _, err = run(capsys, "prompts", "show")
    assert code == EXIT_USAGE
    assert "--dataset" in err


def test_perturb_bank_is_seeded_and_calibrated(capsys, tmp_path):
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    code, _, err = run(capsys, "prompts", "perturb", "--dataset", "btmri", "--level", "0.3", "--seed", "1",
                       "--output", str(out_a))
    assert code == EXIT_OK and "changed 0." in err and "level 0.3" in err
    run(capsys, "prompts", "perturb", "--dataset", "btmri", "--level", "0.3", "--seed", "1", "--output", str(out_b))
    a, b = json.loads(out_a.read_text()), json.loads(out_b.read_text())
    assert a == b
    assert abs(changed_fraction(load_bank("btmri"), a) - 0.3) <= 0.05
    # an existing output is not overwritten without --force
    code, _, err = run(capsys, "prompts", "perturb", "--dataset", "btmri", "--level", "0.5", "--seed", "1",
                       "--output", str(out_a))
    assert code == EXIT_USAGE and "--force" in err
    assert json.loads(out_a.read_text()) == a


def test_perturb_template_keeps_the_placeholder(capsys):
    code, out, _ = run(capsys, "prompts", "perturb", "--template", "clinical/btmri", "--level", "0.5",
                       "--seed", "3", "--kind", "typo")
    assert code == EXIT_OK
    text = out.strip()
    assert text.count("{}") == 1 and text != "a MR photo of a {} in the brain."


@pytest.mark.parametrize("level", ["-0.1", "1.5", "abc"])
def test_perturb_rejects_bad_levels(capsys, level):
    code, _, err = run(capsys, "prompts", "perturb", "--level", level)
    assert code == EXIT_USAGE and "--level" in err


def test_check_builtin_bank_passes_every_gate(capsys):
    code, out, _ = run(capsys, "prompts", "check", "--dataset", "btmri")
    assert code == EXIT_OK
    assert "btmri: OK" in out and "attributes btmri: OK" in out


def test_check_reports_missing_and_misspelt_classes(capsys, tmp_path):
    bank = {"glioma tumour": ["x"], "meningioma tumor": ["y"], "pituitary tumor": ["z"], "cat": ["w"]}
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(bank))
    code, out, _ = run(capsys, "prompts", "check", "--dataset", "btmri", "--bank", str(path))
    assert code == EXIT_USAGE
    assert "missing class 'glioma tumor' (the bank has 'glioma tumour'" in out
    assert "missing class 'normal brain'" in out
    assert "not classes of the dataset" in out and "cat" in out


def test_check_quality_flags_short_sentences(capsys, tmp_path):
    path = tmp_path / "bank.json"
    path.write_text(json.dumps({name: ["too short"] for name in BTMRI}))
    code, out, _ = run(capsys, "prompts", "check", "--dataset", "btmri", "--bank", str(path), "--quality")
    assert code == EXIT_USAGE
    assert "characters (allowed 60-200)" in out and "fewer than 50" in out


def test_init_writes_a_skeleton_for_custom_data_and_check_accepts_it_once_filled(capsys, tmp_path):
    from biomedap.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", classnames=["round cyst", "flat polyp"], layout="imagefolder",
                                  n_train=2, n_val=1, n_test=1, image_size=16)
    out = tmp_path / "bank.json"
    code, stdout, _ = run(capsys, "prompts", "init", "--data", str(data), "--output", str(out))
    assert code == EXIT_OK and "prompts check" in stdout
    skeleton = json.loads(out.read_text())
    assert skeleton == {"round cyst": [], "flat polyp": []}
    code, _, _ = run(capsys, "prompts", "check", "--data", str(data), "--bank", str(out))
    assert code == EXIT_USAGE  # empty classes are problems
    out.write_text(json.dumps({name: [f"an image of {name}"] for name in skeleton}))
    code, _, _ = run(capsys, "prompts", "check", "--data", str(data), "--bank", str(out))
    assert code == EXIT_OK
    code, _, err = run(capsys, "prompts", "init", "--data", str(data), "--output", str(out))
    assert code == EXIT_USAGE and "--force" in err  # the filled bank is not overwritten
    assert json.loads(out.read_text())[next(iter(skeleton))]


def test_templates_lists_ids_with_a_filter(capsys):
    code, out, _ = run(capsys, "prompts", "templates", "quality/*")
    assert code == EXIT_OK
    ids = [line.split()[0] for line in out.splitlines()[2:]]
    assert ids == ["quality/medical_minimal", "quality/generic", "quality/article", "quality/minimal", "quality/empty"]
    code, _, err = run(capsys, "prompts", "templates", "nothing/*")
    assert code == EXIT_USAGE and "no template id matches" in err


def test_prompts_without_action_names_the_actions(capsys):
    code, _, err = run(capsys, "prompts")
    assert code == EXIT_USAGE and "show, check, perturb, init or templates" in err


# ---------------------------------------------------------------------------------- zero-shot


def test_zeroshot_builtin_bank_is_the_mean_of_normalised_descriptions(tiny_backbone):
    method = build_method("zeroshot", tiny_backbone, BTMRI, {"descriptions": "builtin", "max_descriptions": 3})
    bank = load_bank("btmri")
    with torch.no_grad():
        manual = torch.stack([
            F.normalize(tiny_backbone.encode_text(bank[name][:3], normalize=True).mean(0), dim=-1) for name in BTMRI
        ])
    torch.testing.assert_close(method.text_features, manual, atol=1e-6, rtol=1e-6)


def test_zeroshot_builtin_needs_the_dataset_when_class_names_are_shared(tiny_backbone):
    organs = ["bladder", "heart", "liver"]
    with pytest.raises(ValueError, match="organamnist.*organcmnist|several built-in banks"):
        build_method("zeroshot", tiny_backbone, organs, {"descriptions": "builtin", "max_descriptions": 1})
    method = build_method("zeroshot", tiny_backbone, organs,
                          {"descriptions": "builtin:medmnist/organcmnist", "max_descriptions": 1})
    assert method.text_features.shape[0] == 3


def test_zeroshot_builtin_on_custom_classes_points_to_prompts_init(tiny_backbone):
    with pytest.raises(MissingBankError, match="biomedap prompts init --data DIR"):
        build_method("zeroshot", tiny_backbone, ["cat", "dog"], {"descriptions": "builtin"})


def test_zeroshot_reads_a_python_bank_by_name_without_running_it(tiny_backbone, tmp_path):
    path = tmp_path / "prompt_templates.py"
    bank = {name: [f"an MRI slice showing {name}"] for name in BTMRI}
    path.write_text(f'"""published style"""\nOTHER = {{"x": ["y"]}}\nBIOMEDCOOP_TEMPLATES = {bank!r}\n')
    method = build_method("zeroshot", tiny_backbone, BTMRI, {"descriptions": f"{path}:BIOMEDCOOP_TEMPLATES"})
    assert method.text_features.shape == (4, tiny_backbone.embed_dim)


def test_zeroshot_accepts_template_ids_and_rejects_the_empty_level(tiny_backbone):
    by_id = build_method("zeroshot", tiny_backbone, BTMRI, {"templates": ["quality/generic"]})
    by_text = build_method("zeroshot", tiny_backbone, BTMRI, {"templates": ["a photo of {}"]})
    torch.testing.assert_close(by_id.text_features, by_text.text_features)
    with pytest.raises(ValueError, match="quality/empty"):
        build_method("zeroshot", tiny_backbone, BTMRI, {"templates": ["quality/empty"]})


# ---------------------------------------------------------------------------------- docs


def test_bank_samples_page_is_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bank_samples", REPO / "tools" / "bank_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = REPO / "docs" / "bank-samples.md"
    assert page.read_text(encoding="utf-8") == module.render(), "run `python tools/bank_samples.py`"
    text = page.read_text(encoding="utf-8")
    from biomedap.data.catalog import list_all_datasets

    for spec_ in list_all_datasets():  # every class of every dataset is shown with 5 sentences
        assert f"(`{spec_.key}`)" in text
