"""The 11 datasets of the BiomedCoOp benchmark, as data.

One :class:`DatasetSpec` row per dataset: folder name, class names in label order, modality,
organ, prompt templates and published split sizes. Class names are spelled exactly as in the
published split files (``split_<NAME>.json``), and label ``i`` is ``classnames[i]`` — the order is
the split file's, not alphabetical (e.g. BTMRI puts "normal brain" last).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import UnknownDatasetError

__all__ = ["DATASETS", "DatasetSpec", "get_dataset_spec", "list_datasets"]

ZEROSHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one benchmark dataset.

    Attributes:
        name: folder name and split-file stem, e.g. ``"BTMRI"`` (images live in
            ``ROOT/<name>/<name>/<class_folder>/``, the split in ``ROOT/<name>/split_<name>.json``).
        key: lowercase command-line key, e.g. ``"btmri"``.
        classnames: class names in label order, as written in the split file.
        modality: imaging modality, e.g. ``"MRI"``.
        organ: anatomical site.
        zeroshot_template: zero-shot prompt with one ``{}`` (``"a photo of a {}."`` everywhere).
        clinical_template: the Biomed-DPT / BiomedAP dataset-specific prompt with one ``{}``.
        ctx_init: phrase that initialises the learned context of Biomed-DPT / BiomedAP.
        published_counts: ``{"train": n, "val": n, "test": n}`` as published.
        notes: caveats worth knowing before reporting numbers on this dataset.
    """

    name: str
    key: str
    classnames: tuple[str, ...]
    modality: str
    organ: str
    clinical_template: str
    ctx_init: str
    published_counts: Mapping[str, int] = field(hash=False)
    zeroshot_template: str = ZEROSHOT_TEMPLATE
    notes: str = ""

    def __post_init__(self) -> None:
        # A read-only view keeps the frozen promise for the one dict-valued field.
        object.__setattr__(self, "published_counts", MappingProxyType(dict(self.published_counts)))
        object.__setattr__(self, "classnames", tuple(self.classnames))

    # mappingproxy cannot be pickled: store a plain dict and re-wrap it on load, so specs travel
    # to DataLoader workers and Ray tasks.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "published_counts": dict(self.published_counts)}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "published_counts", MappingProxyType(dict(state["published_counts"])))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def split_filename(self) -> str:
        """File name of the published split, e.g. ``"split_BTMRI.json"``."""
        return f"split_{self.name}.json"

    @property
    def image_dirname(self) -> str:
        """Name of the inner image folder (``ROOT/<name>/<image_dirname>/``); equals ``name``."""
        return self.name

    def class_folder(self, classname: str) -> str:
        """Folder that holds the images of ``classname`` (spaces become underscores)."""
        return classname.replace(" ", "_")

    @property
    def base_classnames(self) -> tuple[str, ...]:
        """Base half of the base-to-novel protocol: the first ``ceil(C/2)`` labels."""
        return self.classnames[: math.ceil(self.num_classes / 2)]

    @property
    def novel_classnames(self) -> tuple[str, ...]:
        """Novel half of the base-to-novel protocol: the remaining labels."""
        return self.classnames[math.ceil(self.num_classes / 2):]

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (for run cards and ``biomedap list``)."""
        return {
            "name": self.name,
            "key": self.key,
            "classnames": list(self.classnames),
            "modality": self.modality,
            "organ": self.organ,
            "zeroshot_template": self.zeroshot_template,
            "clinical_template": self.clinical_template,
            "ctx_init": self.ctx_init,
            "published_counts": dict(self.published_counts),
            "notes": self.notes,
        }


def _counts(train: int, val: int, test: int) -> dict[str, int]:
    return {"train": train, "val": val, "test": test}


DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="BTMRI",
        key="btmri",
        classnames=("glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"),
        modality="MRI",
        organ="brain",
        clinical_template="a MR photo of a {} in the brain.",
        ctx_init="a MR photo of a",
        published_counts=_counts(2854, 1141, 1717),
    ),
    DatasetSpec(
        name="BUSI",
        key="busi",
        classnames=("benign tumor", "malignant tumor", "normal scan"),
        modality="Ultrasound",
        organ="breast",
        clinical_template="a ultrasound photo of a {} in the breast.",
        ctx_init="a ultrasound photo of a",
        published_counts=_counts(389, 155, 236),
        notes=(
            "Only 3 classes: base-to-novel has a single novel class (novel accuracy is trivially 100%). "
            "BiomedCoOp excludes BUSI from base-to-novel; Biomed-DPT and BiomedAP include it."
        ),
    ),
    DatasetSpec(
        name="CHMNIST",
        key="chmnist",
        classnames=(
            "adipose tissue", "complex stroma", "debris", "empty background",
            "immune cells", "normal mucosal glands", "simple stroma", "tumour epithelium",
        ),
        modality="Histopathology",
        organ="colorectum",
        clinical_template="a histopathological photo of a {}.",
        ctx_init="a histopathological photo of a",
        published_counts=_counts(2496, 1000, 1504),
        notes="'tumour epithelium' uses the British spelling, as in the split file.",
    ),
    DatasetSpec(
        name="COVID_19",
        key="covid",
        classnames=("covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"),
        modality="X-ray",
        organ="chest",
        clinical_template="a chest X-ray photo of a {} affected by COVID-19 in the lung.",
        ctx_init="a chest X-ray photo of a",
        published_counts=_counts(10582, 4232, 6351),
    ),
    DatasetSpec(
        name="CTKidney",
        key="ctkidney",
        classnames=("cyst kidney", "kidney stone", "kidney tumor", "normal kidney"),
        modality="CT",
        organ="kidney",
        clinical_template="a CT photo of a {} in the kidney.",
        ctx_init="a CT photo of a",
        published_counts=_counts(6221, 2487, 3738),
    ),
    DatasetSpec(
        name="DermaMNIST",
        key="dermamnist",
        classnames=(
            "actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
            "melanoma", "melanocytic nevus", "vascular lesion",
        ),
        modality="Dermatoscopy",
        organ="skin",
        clinical_template="a dermatoscopy photo of a {} in the skin.",
        ctx_init="a dermatoscopy photo of a",
        published_counts=_counts(7006, 1003, 2005),
        notes=(
            "PNG exports of MedMNIST. DATASETS.md says 7007 train images; the split file has 7006. "
            "Strong class imbalance (melanocytic nevus 4693 vs dermatofibroma 80 train images)."
        ),
    ),
    DatasetSpec(
        name="KneeXray",
        key="kneexray",
        classnames=(
            "healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis",
            "moderate osteoarthritis", "severe osteoarthritis",
        ),
        modality="X-ray",
        organ="knee",
        clinical_template="a frontal X-ray photo of a {} in the knee joint.",
        ctx_init="a frontal X-ray photo of a",
        published_counts=_counts(5778, 826, 1656),
    ),
    DatasetSpec(
        name="Kvasir",
        key="kvasir",
        classnames=(
            "dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum",
            "normal pylorus", "normal z line", "polyps", "ulcerative colitis",
        ),
        modality="Endoscopy",
        organ="GI tract",
        clinical_template="a endoscopic photo of a {} in the colon.",
        ctx_init="a endoscopic photo of a",
        published_counts=_counts(2000, 800, 1200),
        notes="The README gives the organ as colon; the images cover the whole GI tract.",
    ),
    DatasetSpec(
        name="LungColon",
        key="lungcolon",
        classnames=(
            "colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma",
            "lung benign tissue", "lung squamous cell carcinoma",
        ),
        modality="Histopathology",
        organ="lung, colon",
        clinical_template="a histopathological photo of a {}.",
        ctx_init="a histopathological photo of a",
        published_counts=_counts(12500, 5000, 7500),
        notes="LC25000.",
    ),
    DatasetSpec(
        name="OCTMNIST",
        key="octmnist",
        classnames=("choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"),
        modality="OCT",
        organ="retina",
        clinical_template="a OCT photo of a {}.",
        ctx_init="a OCT photo of a",
        published_counts=_counts(97477, 10832, 1000),
        notes=(
            "PNG exports of MedMNIST. Split sizes are the README's; the split file (> 4 MB) was not "
            "inspected, so the class order is unverified — the loader reports a mismatch if it differs."
        ),
    ),
    DatasetSpec(
        name="RETINA",
        key="retina",
        classnames=("diabetic retinopathy", "glaucoma", "cataract", "normal retina"),
        modality="Fundus photography",
        organ="eye",
        clinical_template="a photo of a {} presented in image.",
        ctx_init="a photo of a",
        published_counts=_counts(2108, 841, 1268),
    ),
)


def list_datasets() -> tuple[DatasetSpec, ...]:
    """All catalog datasets, in the order of the published tables."""
    return DATASETS


def get_dataset_spec(name_or_key: str | DatasetSpec) -> DatasetSpec:
    """Look a dataset up by folder name (``"BTMRI"``) or key (``"btmri"``), case-insensitively.

    A :class:`DatasetSpec` is returned as it is.

    Raises:
        UnknownDatasetError: the name is not in the catalog; the message lists the known datasets
            and the closest match.
    """
    if isinstance(name_or_key, DatasetSpec):
        return name_or_key
    wanted = str(name_or_key).strip().lower()
    for spec in DATASETS:
        if wanted in (spec.name.lower(), spec.key):
            return spec
    raise _unknown_dataset_error(name_or_key)


def _unknown_dataset_error(name: str, extra: str = "") -> UnknownDatasetError:
    """The error for an unknown name: lists the catalog and suggests the closest name or key."""
    wanted = str(name).strip().lower()
    candidates = [s.name.lower() for s in DATASETS] + [s.key for s in DATASETS]
    close = difflib.get_close_matches(wanted, candidates, n=1, cutoff=0.5)
    hint = ""
    if close:
        match = next(s for s in DATASETS if close[0] in (s.name.lower(), s.key))
        hint = f" Did you mean {match.name!r} (key {match.key!r})?"
    known = ", ".join(f"{s.name} ({s.key})" for s in DATASETS)
    return UnknownDatasetError(
        f"Unknown dataset {name!r}.{hint}{extra} Known catalog datasets: {known}. "
        "For your own data pass a folder (ImageFolder or split-json layout) or a .csv file instead."
    )
