"""Prompt templates: the published strings, resolved through the catalog, and format_template."""

import pytest

from biomedap.data import get_dataset_spec
from biomedap.data.catalog import list_all_datasets
from biomedap.prompts.templates import (
    GENERIC,
    PLACEHOLDER,
    QUALITY_LEVELS,
    TEMPLATES,
    format_template,
    get_template,
    list_templates,
    resolve_template,
    template_source,
)

# Biomed-DPT / BiomedAP CUSTOM_BIOMEDDPT_TEMPLATES and CTX_INIT, verbatim (grammar included: published
# numbers were obtained with exactly these strings).
PUBLISHED = {
    "btmri": ("a MR photo of a {} in the brain.", "a MR photo of a"),
    "busi": ("a ultrasound photo of a {} in the breast.", "a ultrasound photo of a"),
    "chmnist": ("a histopathological photo of a {}.", "a histopathological photo of a"),
    "covid": ("a chest X-ray photo of a {} affected by COVID-19 in the lung.", "a chest X-ray photo of a"),
    "ctkidney": ("a CT photo of a {} in the kidney.", "a CT photo of a"),
    "dermamnist": ("a dermatoscopy photo of a {} in the skin.", "a dermatoscopy photo of a"),
    "kneexray": ("a frontal X-ray photo of a {} in the knee joint.", "a frontal X-ray photo of a"),
    "kvasir": ("a endoscopic photo of a {} in the colon.", "a endoscopic photo of a"),
    "lungcolon": ("a histopathological photo of a {}.", "a histopathological photo of a"),
    "octmnist": ("a OCT photo of a {}.", "a OCT photo of a"),
    "retina": ("a photo of a {} presented in image.", "a photo of a"),
}

QUALITY_TEXTS = {
    "quality/medical_minimal": "a medical image of {}",
    "quality/generic": "a photo of {}",
    "quality/article": "a {}",
    "quality/minimal": "{}",
    "quality/empty": "",
}

ALL_SPECS = list_all_datasets()


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_benchmark_templates_resolve_to_the_published_strings(key):
    spec = get_dataset_spec(key)
    clinical, ctx = PUBLISHED[key]
    assert spec.family == "benchmark"
    assert spec.clinical_template_id == f"clinical/{key}"
    assert spec.ctx_init_id == f"ctx_init/{key}"
    assert spec.zeroshot_template_id == GENERIC
    assert spec.clinical_template == clinical
    assert spec.ctx_init == ctx
    assert spec.zeroshot_template == "a photo of a {}."
    assert get_template(spec.clinical_template_id) == clinical


def test_published_table_covers_every_benchmark_dataset():
    assert sorted(s.key for s in ALL_SPECS if s.family == "benchmark") == sorted(PUBLISHED)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_every_catalog_dataset_has_clinical_and_ctx_init_templates(spec):
    assert spec.clinical_template_id in TEMPLATES
    assert spec.ctx_init_id in TEMPLATES
    assert spec.zeroshot_template_id in TEMPLATES
    clinical = spec.clinical_template
    assert clinical.count(PLACEHOLDER) == 1
    assert PLACEHOLDER not in spec.ctx_init
    # CTX_INIT is the clinical template's text before the class name.
    assert spec.ctx_init == clinical.split(PLACEHOLDER)[0].strip()
    assert spec.ctx_init  # never empty: it initialises the learned context
    assert format_template(clinical, spec.classnames[0]).count(spec.classnames[0]) >= 1
    assert template_source(spec.clinical_template_id)


def test_quality_levels_in_order_with_their_texts():
    assert QUALITY_LEVELS == tuple(QUALITY_TEXTS)
    assert [get_template(t) for t in QUALITY_LEVELS] == list(QUALITY_TEXTS.values())
    assert list_templates("quality/*") == list(QUALITY_LEVELS)
    assert "Abstract" in template_source("quality/medical_minimal")


def test_format_template_fills_the_one_placeholder():
    assert format_template("a photo of a {}.", "glioma tumor") == "a photo of a glioma tumor."
    assert format_template(get_template("quality/minimal"), "drusen") == "drusen"


@pytest.mark.parametrize("template", ["", "a MR photo of a", "a photo"])
def test_format_template_without_placeholder_drops_the_class(template):
    assert format_template(template, "glioma tumor") == template
    empty = get_template("quality/empty")
    assert format_template(empty, "x") == format_template(empty, "y") == ""


@pytest.mark.parametrize("template", ["a photo of a {class}.", "a photo of {0}", "{classname}"])
def test_format_template_rejects_named_placeholders(template):
    with pytest.raises(ValueError, match="named placeholder") as info:
        format_template(template, "glioma")
    assert "'{}'" in str(info.value)


def test_format_template_rejects_a_named_placeholder_next_to_braces():
    # "{}" filled but "{class}" left verbatim would reach the text encoder unnoticed.
    with pytest.raises(ValueError, match="named placeholder"):
        format_template("a {} seen in the {organ}.", "glioma")


def test_format_template_rejects_two_placeholders():
    with pytest.raises(ValueError, match="2 '{}' placeholders"):
        format_template("a {} or a {}", "glioma")


@pytest.mark.parametrize("classname", ["a {b} c", "{}", "x}{y", "{0}"])
def test_class_names_with_braces_are_kept_literally(classname):
    assert format_template("a photo of a {}.", classname) == f"a photo of a {classname}."


def test_get_template_unknown_id_suggests_close_ids():
    with pytest.raises(KeyError) as info:
        get_template("clinical/btmr")
    message = str(info.value)
    assert "'clinical/btmri'" in message
    assert "list_templates()" in message
    with pytest.raises(KeyError, match="Unknown template id"):
        template_source("no/such/template")


def test_list_templates_filters_with_wildcards():
    clinical = list_templates("clinical/*")
    assert clinical == [f"clinical/{s.key}" for s in ALL_SPECS]
    assert len(clinical) == 22
    medmnist = [f"ctx_init/{s.key}" for s in ALL_SPECS if s.family == "medmnist"]
    assert list_templates("ctx_init/medmnist/*") == medmnist
    assert list_templates() == list(TEMPLATES)
    assert list_templates("nothing*") == []


def test_resolve_template_takes_ids_or_literal_text():
    assert resolve_template("clinical/btmri") == "a MR photo of a {} in the brain."
    assert resolve_template("an X-ray of {}") == "an X-ray of {}"
    assert resolve_template(GENERIC) == "a photo of a {}."


def test_template_table_is_read_only():
    with pytest.raises(TypeError):
        TEMPLATES["generic"] = "x"  # type: ignore[index]
