"""Datasets, few-shot splits and image transforms.

* :mod:`.catalog` — the 11 benchmark datasets and the 11 MedMNIST+ datasets as data (:class:`DatasetSpec`).
* :mod:`.sources` — split-json, ImageFolder and CSV loaders → :class:`DatasetSplits`.
* :mod:`.fewshot` — the published K-shot sampling and base/novel class split.
* :mod:`.transforms` — image decoding, eval preprocessing, (seeded) training augmentation.
* :mod:`.synthetic` — small generated datasets for tests and the offline demo.
"""

from .catalog import (
    DATASETS,
    MEDMNIST_DATASETS,
    DatasetSpec,
    get_dataset_spec,
    list_all_datasets,
    list_datasets,
)
from .errors import (
    ClassnameMismatchError,
    DataError,
    DatasetRootNotFoundError,
    EmptyDatasetError,
    InvalidOptionError,
    LabelMismatchError,
    MissingImageError,
    SplitFileNotFoundError,
    SplitFormatError,
    UnknownDatasetError,
    UnreadableImageError,
)
from .fewshot import FewShotSplit, fewshot_filename, sample_few_shot, subsample_classes
from .sources import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetSplits,
    Sample,
    load_csv,
    load_dataset,
    load_image_folder,
    load_split_json,
)
from .synthetic import DEFAULT_SYNTHETIC_CLASSNAMES, make_synthetic_dataset
from .transforms import (
    DASSL_AUGMENT,
    LP_AUGMENT,
    NO_AUGMENT,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AugmentSpec,
    PreprocessConfig,
    apply_train_transform,
    augmented_view,
    build_eval_transform,
    build_train_transform,
    load_image,
    random_resized_crop_params,
    view_seed,
)

__all__ = [
    "DASSL_AUGMENT",
    "DATASETS",
    "DEFAULT_SYNTHETIC_CLASSNAMES",
    "IMAGE_EXTENSIONS",
    "LP_AUGMENT",
    "MEDMNIST_DATASETS",
    "NO_AUGMENT",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SPLITS",
    "AugmentSpec",
    "ClassnameMismatchError",
    "DataError",
    "DatasetRootNotFoundError",
    "DatasetSpec",
    "DatasetSplits",
    "EmptyDatasetError",
    "FewShotSplit",
    "InvalidOptionError",
    "LabelMismatchError",
    "MissingImageError",
    "PreprocessConfig",
    "Sample",
    "SplitFileNotFoundError",
    "SplitFormatError",
    "UnknownDatasetError",
    "UnreadableImageError",
    "apply_train_transform",
    "augmented_view",
    "build_eval_transform",
    "build_train_transform",
    "fewshot_filename",
    "get_dataset_spec",
    "list_all_datasets",
    "list_datasets",
    "load_csv",
    "load_dataset",
    "load_image",
    "load_image_folder",
    "load_split_json",
    "make_synthetic_dataset",
    "random_resized_crop_params",
    "sample_few_shot",
    "subsample_classes",
    "view_seed",
]
