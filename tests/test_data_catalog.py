"""The dataset catalog: the 11 benchmark datasets, exactly as published."""

import dataclasses
import math
import pickle

import pytest

from biomedap.data import DataError, DatasetSpec, UnknownDatasetError, get_dataset_spec, list_datasets

# (name, key, classes in label order, train, val, test) — biomed-methods.md §2.1.
EXPECTED = [
    ("BTMRI", "btmri", ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
     2854, 1141, 1717),
    ("BUSI", "busi", ["benign tumor", "malignant tumor", "normal scan"], 389, 155, 236),
    ("CHMNIST", "chmnist", ["adipose tissue", "complex stroma", "debris", "empty background", "immune cells",
                            "normal mucosal glands", "simple stroma", "tumour epithelium"], 2496, 1000, 1504),
    ("COVID_19", "covid", ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"],
     10582, 4232, 6351),
    ("CTKidney", "ctkidney", ["cyst kidney", "kidney stone", "kidney tumor", "normal kidney"],
     6221, 2487, 3738),
    ("DermaMNIST", "dermamnist", ["actinic keratosis", "basal cell carcinoma", "benign keratosis",
                                  "dermatofibroma", "melanoma", "melanocytic nevus", "vascular lesion"],
     7006, 1003, 2005),
    ("KneeXray", "kneexray", ["healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis",
                              "moderate osteoarthritis", "severe osteoarthritis"], 5778, 826, 1656),
    ("Kvasir", "kvasir", ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum",
                          "normal pylorus", "normal z line", "polyps", "ulcerative colitis"],
     2000, 800, 1200),
    ("LungColon", "lungcolon", ["colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma",
                                "lung benign tissue", "lung squamous cell carcinoma"], 12500, 5000, 7500),
    ("OCTMNIST", "octmnist",
     ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"],
     97477, 10832, 1000),
    ("RETINA", "retina", ["diabetic retinopathy", "glaucoma", "cataract", "normal retina"], 2108, 841, 1268),
]

CLINICAL = {
    "BTMRI": "a MR photo of a {} in the brain.",
    "BUSI": "a ultrasound photo of a {} in the breast.",
    "CHMNIST": "a histopathological photo of a {}.",
    "COVID_19": "a chest X-ray photo of a {} affected by COVID-19 in the lung.",
    "CTKidney": "a CT photo of a {} in the kidney.",
    "DermaMNIST": "a dermatoscopy photo of a {} in the skin.",
    "KneeXray": "a frontal X-ray photo of a {} in the knee joint.",
    "Kvasir": "a endoscopic photo of a {} in the colon.",
    "LungColon": "a histopathological photo of a {}.",
    "OCTMNIST": "a OCT photo of a {}.",
    "RETINA": "a photo of a {} presented in image.",
}


def test_catalog_has_the_eleven_datasets_in_published_order():
    specs = list_datasets()
    assert [s.name for s in specs] == [row[0] for row in EXPECTED]
    assert [s.key for s in specs] == [row[1] for row in EXPECTED]


@pytest.mark.parametrize("name,key,classnames,train,val,test", EXPECTED, ids=[row[0] for row in EXPECTED])
def test_spec_matches_published_table(name, key, classnames, train, val, test):
    spec = get_dataset_spec(name)
    assert spec.key == key
    assert list(spec.classnames) == classnames
    assert spec.num_classes == len(classnames)
    assert dict(spec.published_counts) == {"train": train, "val": val, "test": test}
    assert spec.zeroshot_template == "a photo of a {}."
    assert spec.clinical_template == CLINICAL[name]
    # CTX_INIT is the clinical template up to the class name.
    assert spec.clinical_template.startswith(spec.ctx_init + " {}")
    assert spec.split_filename == f"split_{name}.json"
    assert spec.image_dirname == name
    m = math.ceil(len(classnames) / 2)
    assert list(spec.base_classnames) == classnames[:m]
    assert list(spec.novel_classnames) == classnames[m:]


def test_class_folder_replaces_spaces():
    spec = get_dataset_spec("kvasir")
    assert spec.class_folder("normal z line") == "normal_z_line"
    assert spec.class_folder("polyps") == "polyps"


@pytest.mark.parametrize("query", ["BTMRI", "btmri", "BtMrI", " btmri "])
def test_lookup_by_name_or_key_is_case_insensitive(query):
    assert get_dataset_spec(query).name == "BTMRI"


@pytest.mark.parametrize("query", ["covid", "COVID_19", "covid_19", "Covid"])
def test_lookup_covid_by_key_and_name(query):
    assert get_dataset_spec(query).name == "COVID_19"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownDatasetError) as info:
        get_dataset_spec("kvasr")
    message = str(info.value)
    assert "'kvasr'" in message
    assert "Did you mean 'Kvasir'" in message
    assert "BTMRI (btmri)" in message  # lists the known datasets
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(UnknownDatasetError, match="Known catalog datasets: BTMRI"):
        get_dataset_spec("imagenet")


def test_busi_notes_explain_base_to_novel():
    notes = get_dataset_spec("busi").notes.lower()
    assert "novel" in notes and "single" in notes


def test_specs_are_immutable_and_picklable():
    spec = get_dataset_spec("btmri")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "X"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.published_counts["train"] = 1  # type: ignore[index]
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec and isinstance(clone, DatasetSpec)
    assert dict(clone.published_counts) == dict(spec.published_counts)
    assert spec.to_dict()["classnames"] == list(spec.classnames)
