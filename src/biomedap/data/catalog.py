"""The datasets biomedap knows by name, as data.

One :class:`DatasetSpec` row per dataset: folder name, class names in label order, modality,
organ, prompt template ids and published split sizes. Two families:

* ``"benchmark"`` — the 11 datasets of the BiomedCoOp benchmark (:data:`DATASETS`). Class names are
  spelled exactly as in the published split files (``split_<NAME>.json``), and label ``i`` is
  ``classnames[i]`` — the order is the split file's, not alphabetical (e.g. BTMRI puts "normal
  brain" last).
* ``"medmnist"`` — the 11 single-label 2D datasets of MedMNIST+ (:data:`MEDMNIST_DATASETS`), keyed
  ``medmnist/<flag>`` (e.g. ``"medmnist/dermamnist"``) so that the benchmark's ``"DermaMNIST"`` and
  ``"OCTMNIST"`` keep their meaning. Class names are the official label map's, in label order.
  ChestMNIST is not in the catalog: it is multi-label (14 findings per image), which the
  single-label methods and metrics here do not handle.

Prompt templates are referred to by id (see :mod:`biomedap.prompts.templates`); the
``zeroshot_template``, ``clinical_template`` and ``ctx_init`` properties return their text.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .errors import UnknownDatasetError

__all__ = [
    "DATASETS",
    "DATASET_FAMILIES",
    "MEDMNIST_DATASETS",
    "MEDMNIST_EXCLUDED",
    "MEDMNIST_IMAGE_SIZES",
    "DatasetSpec",
    "get_dataset_spec",
    "list_all_datasets",
    "list_datasets",
]

DATASET_FAMILIES: tuple[str, ...] = ("benchmark", "medmnist")
MEDMNIST_IMAGE_SIZES: tuple[int, ...] = (28, 64, 128, 224)
# MedMNIST+ datasets that the catalog leaves out, and why (the lookup error says it).
MEDMNIST_EXCLUDED: Mapping[str, str] = MappingProxyType({
    "chestmnist": "ChestMNIST is multi-label (14 findings per image); the catalog holds single-label datasets only",
})

# Words that name the imaging modality or view of a dataset: regular expressions matched
# case-insensitively on word boundaries. Description-bank quality gates require one per sentence
# (biomedap.prompts.quality), and the perturbation module knows them as modality words.
_HISTOLOGY = r"histolog\w*|histopatholog\w*|h&e|hematoxylin|haematoxylin|eosin|microscop\w*|slide|stain\w*"
_DERMOSCOPY = r"dermoscop\w*|dermatoscop\w*|epiluminescence"
_OCT = r"oct|optical coherence tomograph\w*|b-scans?|tomogra\w*"
_FUNDUS = r"fundus|fundoscop\w*|funduscop\w*|ophthalmoscop\w*|retinal photograph\w*"
_CHEST_XRAY = r"x-rays?|radiograph\w*|chest films?|cxr|frontal|posteroanterior|anteroposterior|pa view|ap view"
_ULTRASOUND = r"ultrasound|sonograph\w*|sonogram|b-mode"
_CT = r"ct|computed tomograph\w*|hounsfield|axial|coronal|sagittal"
_MRI = r"mri|mr|magnetic resonance|t1\w*|t2\w*|flair|axial|coronal|sagittal"
_KNEE_XRAY = r"x-rays?|radiograph\w*|films?|anteroposterior|ap view|frontal|weight-bearing"
_ENDOSCOPY = r"endoscop\w*|colonoscop\w*|gastroscop\w*|white-light|narrow-band"
_BLOOD = r"microscop\w*|smears?|stain\w*|wright|giemsa|slide|blood films?"
_KIDNEY_CORTEX = r"microscop\w*|histolog\w*|sections?|stain\w*|fluoresc\w*"


def _template_text(template_id: str) -> str:
    from ..prompts.templates import get_template

    return get_template(template_id)


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one catalog dataset.

    Attributes:
        name: folder name and split-file stem, e.g. ``"BTMRI"`` (images live in
            ``ROOT/<name>/<name>/<class_folder>/``, the split in ``ROOT/<name>/split_<name>.json``).
        key: lowercase command-line key and dataset id, e.g. ``"btmri"``, ``"medmnist/pathmnist"``.
        classnames: class names in label order, as written in the split file (benchmark) or the
            official label map (MedMNIST+).
        modality: imaging modality, e.g. ``"MRI"``.
        organ: anatomical site.
        published_counts: ``{"train": n, "val": n, "test": n}`` as published (empty if unknown).
        family: ``"benchmark"`` or ``"medmnist"`` (see :data:`DATASET_FAMILIES`).
        modality_terms: regular expression of the words that name this dataset's imaging modality
            or view (matched case-insensitively on word boundaries; empty = no requirement).
        zeroshot_template_id: id of the zero-shot template (default ``"generic"``,
            ``"a photo of a {}."``) in :mod:`biomedap.prompts.templates`.
        clinical_template_id: id of the dataset-specific clinical template with one ``{}``
            (default ``"clinical/<key>"``).
        ctx_init_id: id of the phrase that initialises Biomed-DPT / BiomedAP's learned context
            (default ``"ctx_init/<key>"``).
        image_sizes: image sizes (pixels per side) the dataset is distributed at; empty when it
            comes at its original resolutions.
        medmnist_flag: MedMNIST's own name for the dataset (``"pathmnist"``; ``None`` outside
            MedMNIST+), the stem of its ``<flag>_<size>.npz`` files.
        notes: caveats worth knowing before reporting numbers on this dataset.
    """

    name: str
    key: str
    classnames: tuple[str, ...]
    modality: str
    organ: str
    published_counts: Mapping[str, int] = field(hash=False, default_factory=dict)
    family: str = "benchmark"
    modality_terms: str = ""
    zeroshot_template_id: str = "generic"
    clinical_template_id: str = ""
    ctx_init_id: str = ""
    image_sizes: tuple[int, ...] = ()
    medmnist_flag: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        # A read-only view keeps the frozen promise for the one dict-valued field.
        object.__setattr__(self, "published_counts", MappingProxyType(dict(self.published_counts)))
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "image_sizes", tuple(self.image_sizes))
        if not self.clinical_template_id:
            object.__setattr__(self, "clinical_template_id", f"clinical/{self.key}")
        if not self.ctx_init_id:
            object.__setattr__(self, "ctx_init_id", f"ctx_init/{self.key}")
        if self.family not in DATASET_FAMILIES:
            raise ValueError(f"DatasetSpec {self.name!r}: family {self.family!r} is not one of {DATASET_FAMILIES}")

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

    # Template texts are looked up on access (not stored) so the template table stays the single
    # source; the import is local because biomedap.prompts imports this module.
    @property
    def zeroshot_template(self) -> str:
        """Text of the zero-shot template (``"a photo of a {}."`` for every catalog dataset)."""
        return _template_text(self.zeroshot_template_id)

    @property
    def clinical_template(self) -> str:
        """Text of the dataset-specific clinical template, e.g. ``"a MR photo of a {} in the brain."``."""
        return _template_text(self.clinical_template_id)

    @property
    def ctx_init(self) -> str:
        """Text of the context-initialisation phrase, e.g. ``"a MR photo of a"``."""
        return _template_text(self.ctx_init_id)

    @property
    def resource_id(self) -> str:
        """File stem of this dataset's bundled resources: the key with ``/`` as ``-`` (``medmnist-pathmnist``)."""
        return self.key.replace("/", "-")

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
            "family": self.family,
            "zeroshot_template_id": self.zeroshot_template_id,
            "zeroshot_template": self.zeroshot_template,
            "clinical_template_id": self.clinical_template_id,
            "clinical_template": self.clinical_template,
            "ctx_init_id": self.ctx_init_id,
            "ctx_init": self.ctx_init,
            "published_counts": dict(self.published_counts),
            "image_sizes": list(self.image_sizes),
            "medmnist_flag": self.medmnist_flag,
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
        modality_terms=_MRI,
        published_counts=_counts(2854, 1141, 1717),
    ),
    DatasetSpec(
        name="BUSI",
        key="busi",
        classnames=("benign tumor", "malignant tumor", "normal scan"),
        modality="Ultrasound",
        organ="breast",
        modality_terms=_ULTRASOUND,
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
        modality_terms=_HISTOLOGY,
        published_counts=_counts(2496, 1000, 1504),
        notes="'tumour epithelium' uses the British spelling, as in the split file.",
    ),
    DatasetSpec(
        name="COVID_19",
        key="covid",
        classnames=("covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"),
        modality="X-ray",
        organ="chest",
        modality_terms=_CHEST_XRAY,
        published_counts=_counts(10582, 4232, 6351),
    ),
    DatasetSpec(
        name="CTKidney",
        key="ctkidney",
        classnames=("cyst kidney", "kidney stone", "kidney tumor", "normal kidney"),
        modality="CT",
        organ="kidney",
        modality_terms=_CT,
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
        modality_terms=_DERMOSCOPY,
        published_counts=_counts(7006, 1003, 2005),
        notes=(
            "PNG exports of MedMNIST. DATASETS.md says 7007 train images; the split file has 7006. "
            "Strong class imbalance (melanocytic nevus 4693 vs dermatofibroma 80 train images). "
            "The MedMNIST+ version, with the official label names, is 'medmnist/dermamnist'."
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
        modality_terms=_KNEE_XRAY,
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
        modality_terms=_ENDOSCOPY,
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
        modality_terms=_HISTOLOGY,
        published_counts=_counts(12500, 5000, 7500),
        notes="LC25000.",
    ),
    DatasetSpec(
        name="OCTMNIST",
        key="octmnist",
        classnames=("choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"),
        modality="OCT",
        organ="retina",
        modality_terms=_OCT,
        published_counts=_counts(97477, 10832, 1000),
        notes=(
            "PNG exports of MedMNIST. Split sizes are the README's; the split file (> 4 MB) was not "
            "inspected, so the class order is unverified — the loader reports a mismatch if it differs. "
            "The MedMNIST+ version, with the official label names, is 'medmnist/octmnist'."
        ),
    ),
    DatasetSpec(
        name="RETINA",
        key="retina",
        classnames=("diabetic retinopathy", "glaucoma", "cataract", "normal retina"),
        modality="Fundus photography",
        organ="eye",
        modality_terms=_FUNDUS,
        published_counts=_counts(2108, 841, 1268),
    ),
)



def _medmnist(flag: str, title: str, classnames: tuple[str, ...], modality: str, organ: str, terms: str,
              counts: dict[str, int], notes: str = "") -> DatasetSpec:
    """A MedMNIST+ row: key ``medmnist/<flag>``, name ``MedMNIST-<Title>``, the four MedMNIST+ sizes."""
    common = ("MedMNIST+ (MedMNIST v2 labels and splits; images at 28, 64, 128 and 224 px). "
              "Class names are the official label map's, in label order.")
    return DatasetSpec(
        name=f"MedMNIST-{title}", key=f"medmnist/{flag}", classnames=classnames, modality=modality, organ=organ,
        modality_terms=terms, published_counts=counts, family="medmnist", image_sizes=MEDMNIST_IMAGE_SIZES,
        medmnist_flag=flag, notes=f"{common} {notes}".strip(),
    )


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")
_ORGAN_NOTE = ("Crops of the {view} centre slices of abdominal CT volumes (LiTS); the three Organ datasets share "
               "their 11 class names, so name the dataset when looking up its description bank.")

# Sample counts are MedMNIST v2's official train / val / test sizes (Yang et al., Scientific Data 2023).
MEDMNIST_DATASETS: tuple[DatasetSpec, ...] = (
    _medmnist("pathmnist", "PathMNIST", (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
    ), "Histopathology", "colon", _HISTOLOGY, _counts(89996, 10004, 7180),
        "NCT-CRC-HE-100K (train/val) and CRC-VAL-HE-7K (test), H&E."),
    _medmnist("dermamnist", "DermaMNIST", (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
        "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions",
    ), "Dermatoscopy", "skin", _DERMOSCOPY, _counts(7007, 1003, 2005),
        "HAM10000. Same images as the benchmark's 'DermaMNIST' (key 'dermamnist'), which renames the classes."),
    _medmnist("octmnist", "OCTMNIST", (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal",
    ), "OCT", "retina", _OCT, _counts(97477, 10832, 1000),
        "Retinal OCT B-scans. The benchmark's 'OCTMNIST' (key 'octmnist') calls the last class 'normal OCT scan'."),
    _medmnist("pneumoniamnist", "PneumoniaMNIST", ("normal", "pneumonia"), "X-ray", "chest", _CHEST_XRAY,
              _counts(4708, 524, 624), "Paediatric chest X-rays."),
    _medmnist("retinamnist", "RetinaMNIST", (
        "no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
        "severe diabetic retinopathy", "proliferative diabetic retinopathy",
    ), "Fundus photography", "eye", _FUNDUS, _counts(1080, 120, 400),
        "DeepDRiD. The official label map names the grades only '0'..'4' (ordinal regression); the class "
        "names here spell out those diabetic-retinopathy grades so that text prompts can use them."),
    _medmnist("breastmnist", "BreastMNIST", ("malignant", "normal, benign"), "Ultrasound", "breast", _ULTRASOUND,
              _counts(546, 78, 156), "BUSI regrouped into 2 classes: 'normal, benign' is one class (label 1)."),
    _medmnist("bloodmnist", "BloodMNIST", (
        "basophil", "eosinophil", "erythroblast", "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte", "monocyte", "neutrophil", "platelet",
    ), "Blood cell microscopy", "blood", _BLOOD, _counts(11959, 1712, 3421),
        "Peripheral blood smears. The official label map writes 'immature granulocytes(myelocytes, ...' "
        "without the space before the parenthesis."),
    _medmnist("tissuemnist", "TissueMNIST", (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ), "Kidney cortex microscopy", "kidney cortex", _KIDNEY_CORTEX, _counts(165466, 23640, 47280),
        "Kidney cortex cells (BBBC051), 2D projections of 3D fluorescence microscopy."),
    _medmnist("organamnist", "OrganAMNIST", _ORGANS, "CT", "abdomen", _CT, _counts(34581, 6491, 17778),
              _ORGAN_NOTE.format(view="axial")),
    _medmnist("organcmnist", "OrganCMNIST", _ORGANS, "CT", "abdomen", _CT, _counts(13000, 2392, 8268),
              _ORGAN_NOTE.format(view="coronal")),
    _medmnist("organsmnist", "OrganSMNIST", _ORGANS, "CT", "abdomen", _CT, _counts(13940, 2452, 8829),
              _ORGAN_NOTE.format(view="sagittal")),
)

_FAMILIES: Mapping[str, tuple[DatasetSpec, ...]] = MappingProxyType(
    {"benchmark": DATASETS, "medmnist": MEDMNIST_DATASETS}
)


def list_datasets(family: str = "benchmark") -> tuple[DatasetSpec, ...]:
    """The catalog datasets of one family, in the order of the published tables.

    Args:
        family: ``"benchmark"`` (default: the 11 BiomedCoOp datasets) or ``"medmnist"`` (the 11
            single-label MedMNIST+ datasets). :func:`list_all_datasets` returns both.
    """
    try:
        return _FAMILIES[family]
    except KeyError:
        raise UnknownDatasetError(
            f"Unknown dataset family {family!r}; use one of {list(_FAMILIES)} (or list_all_datasets())."
        ) from None


def list_all_datasets() -> tuple[DatasetSpec, ...]:
    """Every catalog dataset: the benchmark's 11, then MedMNIST+'s 11."""
    return DATASETS + MEDMNIST_DATASETS


def get_dataset_spec(name_or_key: str | DatasetSpec) -> DatasetSpec:
    """Look a dataset up by name, key or resource id, case-insensitively.

    ``"BTMRI"``, ``"btmri"``; MedMNIST+ datasets by key ``"medmnist/pathmnist"``, name
    ``"MedMNIST-PathMNIST"`` or resource id ``"medmnist-pathmnist"``. Names are unambiguous:
    ``"DermaMNIST"`` and ``"OCTMNIST"`` are the benchmark's datasets. A :class:`DatasetSpec` is
    returned as it is.

    Raises:
        UnknownDatasetError: the name is not in the catalog; the message lists the known datasets
            and the closest match.
    """
    if isinstance(name_or_key, DatasetSpec):
        return name_or_key
    wanted = str(name_or_key).strip().lower()
    for spec in list_all_datasets():
        if wanted in (spec.name.lower(), spec.key, spec.resource_id):
            return spec
    raise _unknown_dataset_error(name_or_key)


def _unknown_dataset_error(name: str, extra: str = "") -> UnknownDatasetError:
    """The error for an unknown name: lists the catalog and suggests the closest name or key."""
    wanted = str(name).strip().lower()
    specs = list_all_datasets()
    excluded = MEDMNIST_EXCLUDED.get(wanted.removeprefix("medmnist/").removeprefix("medmnist-"))
    flags = {s.medmnist_flag: s for s in MEDMNIST_DATASETS}
    hint = ""
    if excluded:
        hint = f" {excluded}."
    elif wanted in flags:  # a bare MedMNIST flag such as "pathmnist"
        hint = f" The MedMNIST+ dataset is {flags[wanted].key!r}."
    else:
        candidates = [s.name.lower() for s in specs] + [s.key for s in specs]
        close = difflib.get_close_matches(wanted, candidates, n=1, cutoff=0.5)
        if close:
            match = next(s for s in specs if close[0] in (s.name.lower(), s.key))
            hint = f" Did you mean {match.name!r} (key {match.key!r})?"
    known = ", ".join(f"{s.name} ({s.key})" for s in DATASETS)
    medmnist = ", ".join(s.key for s in MEDMNIST_DATASETS)
    return UnknownDatasetError(
        f"Unknown dataset {name!r}.{hint}{extra} Known catalog datasets: {known}; MedMNIST+: {medmnist}. "
        "For your own data pass a folder (ImageFolder or split-json layout) or a .csv file instead."
    )
