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


# ------------------------------------------------------------------------------------ MedMNIST+

# (flag, number of classes) — the 11 single-label 2D datasets of MedMNIST+, in the catalog's order.
MEDMNIST = [
    ("pathmnist", 9), ("dermamnist", 7), ("octmnist", 4), ("pneumoniamnist", 2), ("retinamnist", 5),
    ("breastmnist", 2), ("bloodmnist", 8), ("tissuemnist", 8), ("organamnist", 11), ("organcmnist", 11),
    ("organsmnist", 11),
]


def test_medmnist_family_has_the_eleven_single_label_datasets():
    from biomedap.data import MEDMNIST_DATASETS, list_all_datasets

    specs = list_datasets("medmnist")
    assert specs == MEDMNIST_DATASETS
    assert [s.key for s in specs] == [f"medmnist/{flag}" for flag, _ in MEDMNIST]
    assert [s.num_classes for s in specs] == [n for _, n in MEDMNIST]
    assert all(s.family == "medmnist" and s.image_sizes == (28, 64, 128, 224) for s in specs)
    assert list_all_datasets() == list_datasets() + specs
    assert len(list_all_datasets()) == 22
    assert len({s.key for s in list_all_datasets()}) == 22
    assert len({s.name.lower() for s in list_all_datasets()}) == 22


@pytest.mark.parametrize("flag,n", MEDMNIST, ids=[flag for flag, _ in MEDMNIST])
def test_medmnist_lookup_by_key_name_and_resource_id(flag, n):
    spec = get_dataset_spec(f"medmnist/{flag}")
    assert spec.medmnist_flag == flag and spec.num_classes == n
    assert spec.resource_id == f"medmnist-{flag}"
    assert get_dataset_spec(spec.name) is spec
    assert get_dataset_spec(spec.name.upper()) is spec
    assert get_dataset_spec(f"medmnist-{flag}") is spec
    assert get_dataset_spec(f" MEDMNIST/{flag.upper()} ") is spec
    assert len(set(spec.classnames)) == n
    assert sum(spec.published_counts.values()) > 0


def test_medmnist_class_names():
    assert get_dataset_spec("medmnist/pathmnist").classnames[-1] == "colorectal adenocarcinoma epithelium"
    assert get_dataset_spec("medmnist/octmnist").classnames[-1] == "normal"
    assert get_dataset_spec("medmnist/breastmnist").classnames == ("malignant", "normal, benign")
    organs = {get_dataset_spec(f"medmnist/organ{view}mnist").classnames for view in "acs"}
    assert len(organs) == 1 and "kidney-left" in next(iter(organs))


@pytest.mark.parametrize("query,key", [
    ("DermaMNIST", "dermamnist"), ("dermamnist", "dermamnist"), ("OCTMNIST", "octmnist"),
    ("MedMNIST-DermaMNIST", "medmnist/dermamnist"),
])
def test_benchmark_names_keep_their_meaning(query, key):
    spec = get_dataset_spec(query)
    assert spec.key == key
    if key == "dermamnist":
        assert spec.family == "benchmark" and spec.classnames[0] == "actinic keratosis"


@pytest.mark.parametrize("query", ["chestmnist", "medmnist/chestmnist", "ChestMNIST", "medmnist-chestmnist"])
def test_chestmnist_is_excluded_as_multi_label(query):
    with pytest.raises(UnknownDatasetError, match="multi-label"):
        get_dataset_spec(query)


def test_bare_medmnist_flag_suggests_the_key():
    with pytest.raises(UnknownDatasetError) as info:
        get_dataset_spec("pathmnist")
    message = str(info.value)
    assert "'medmnist/pathmnist'" in message
    assert "MedMNIST+: medmnist/pathmnist" in message  # the MedMNIST+ keys are listed too


def test_unknown_family_is_rejected():
    with pytest.raises(UnknownDatasetError, match="family 'imagenet'"):
        list_datasets("imagenet")


@pytest.mark.parametrize("key", ["medmnist/organcmnist", "btmri"])
def test_spec_pickles_round_trip(key):
    spec = get_dataset_spec(key)
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec and clone is not spec
    assert clone.medmnist_flag == spec.medmnist_flag and clone.image_sizes == spec.image_sizes
    assert clone.clinical_template == spec.clinical_template
    with pytest.raises(TypeError):
        clone.published_counts["train"] = 0  # type: ignore[index]  # still read-only after loading
    assert hash(clone) == hash(spec)


def test_to_dict_includes_template_texts_and_ids():
    import json

    spec = get_dataset_spec("medmnist/organamnist")
    data = spec.to_dict()
    assert data["clinical_template_id"] == "clinical/medmnist/organamnist"
    assert data["clinical_template"] == "a cropped axial CT slice of the {}."
    assert data["ctx_init_id"] == "ctx_init/medmnist/organamnist"
    assert data["ctx_init"] == "a cropped axial CT slice of the"
    assert data["zeroshot_template_id"] == "generic" and data["zeroshot_template"] == "a photo of a {}."
    assert data["family"] == "medmnist" and data["medmnist_flag"] == "organamnist"
    assert data["image_sizes"] == [28, 64, 128, 224]
    assert json.loads(json.dumps(data)) == data
    benchmark = get_dataset_spec("btmri").to_dict()
    assert benchmark["medmnist_flag"] is None and benchmark["image_sizes"] == []
    assert benchmark["clinical_template"] == "a MR photo of a {} in the brain."
