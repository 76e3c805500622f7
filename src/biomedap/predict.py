"""Apply a saved run to new data: classify image files, or evaluate it on a labelled split.

Both start from a reloaded run (:func:`biomedap.runs.load_run`), which rebuilds the method on its
frozen backbone::

    from biomedap.runs import load_run
    from biomedap.predict import collect_images, predict_images, write_predictions_csv

    method, card = load_run("runs/coop-btmri-k16-s1-1a2b3c4d")
    predictions = predict_images(method, collect_images(["scans/"]), topk=3)
    write_predictions_csv(predictions, "preds.csv")

    from biomedap.predict import evaluate_run
    report = evaluate_run("runs/coop-btmri-k16-s1-1a2b3c4d", split="test")
    report["metrics"]["accuracy"]

Images are preprocessed with the backbone's own evaluation transform (resize, center crop,
normalisation from its preprocess config), exactly as the run's evaluation split was.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .data.errors import EmptyDatasetError
from .data.sources import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from .backbone import Backbone
    from .features import FeatureCache
    from .methods import Method

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTION_COLUMNS",
    "collect_images",
    "evaluate_run",
    "predict_images",
    "predict_image_logits",
    "prediction_rows",
    "write_predictions_csv",
]

#: Columns of the CSV written by :func:`write_predictions_csv` (one row per image and rank).
PREDICTION_COLUMNS = ("path", "rank", "class", "probability")


# --------------------------------------------------------------------------- finding images


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders searched recursively.

    In folders, files with a common image extension (``.png .jpg .jpeg .bmp .tif .tiff .webp``, any
    case) are taken, sorted, hidden files and folders skipped. A file named explicitly is taken
    whatever its extension (decoding tells whether it is an image). Duplicates are dropped, first
    occurrence kept.

    Raises:
        FileNotFoundError: a path does not exist (the message names it).
        EmptyDatasetError: no image file was found (a :class:`~biomedap.data.DataError`).
    """
    found: list[Path] = []
    seen: set[Path] = set()
    given = [Path(os.path.expanduser(os.fspath(p))) for p in paths]
    if not given:
        raise EmptyDatasetError("no images given: pass image files or folders that contain images")
    empty_folders = []
    for path in given:
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(
                p for p in path.rglob("*")
                if p.is_file() and _is_image(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not candidates:
                empty_folders.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    if not found:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        where = ", ".join(str(p) for p in empty_folders) or ", ".join(str(p) for p in given)
        raise EmptyDatasetError(f"no image files ({extensions}) found in {where}")
    for folder in empty_folders:
        log.warning("no image files found in %s", folder)
    return found


# --------------------------------------------------------------------------- predicting


@torch.no_grad()
def predict_image_logits(
    method: Method,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``[N, C]`` (float32, CPU) of ``method`` for image files, read and preprocessed here.

    Works for feature-space and pixel-space methods alike: the method receives pixels preprocessed
    with the backbone's evaluation transform. Nothing is cached (new images are usually seen once).

    Raises:
        UnreadableImageError: a file is missing or cannot be decoded (the message names it).
    """
    from .data.transforms import build_eval_transform, load_image
    from .methods import Batch
    from .train import autocast_for

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    transform = build_eval_transform(method.backbone.preprocess)
    device = method.backbone.device
    method.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predicting", unit="img", leave=False)
    outputs = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            pixels = torch.stack([transform(load_image(p)) for p in chunk]).to(device)
            with torch.no_grad(), autocast_for(device, precision):
                logits = method(Batch(pixels=pixels))
            outputs.append(logits.float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not outputs:
        return torch.empty(0, len(method.classnames))
    return torch.cat(outputs)


def predict_images(
    method: Method,
    paths: Sequence[str | os.PathLike],
    topk: int = 3,
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Classify image files with a reloaded run; one dict per image, in the order of ``paths``.

    Each dict is ``{"path": str, "predictions": [{"rank": 1, "class": str, "probability": float},
    ...]}`` with the ``topk`` most probable classes (fewer if the method has fewer classes).
    Probabilities are the softmax of the method's logits over all its classes, so the listed ones
    sum to at most 1.

    Raises:
        ValueError: ``topk < 1``.
        UnreadableImageError: a file cannot be decoded (the message names it).
    """
    if topk < 1:
        raise ValueError(f"topk must be ≥ 1, got {topk}")
    paths = list(paths)
    logits = predict_image_logits(method, paths, batch_size=batch_size, precision=precision,
                                  progress=progress)
    probabilities = torch.softmax(logits.double(), dim=-1)
    k = min(topk, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=-1)
    results = []
    for path, row_values, row_indices in zip(paths, values.tolist(), indices.tolist()):
        results.append({
            "path": os.fspath(path),
            "predictions": [
                {"rank": rank, "class": method.classnames[index], "probability": value}
                for rank, (value, index) in enumerate(zip(row_values, row_indices), start=1)
            ],
        })
    return results


def prediction_rows(predictions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten :func:`predict_images` output to rows with the :data:`PREDICTION_COLUMNS`."""
    return [
        {"path": item["path"], "rank": p["rank"], "class": p["class"], "probability": p["probability"]}
        for item in predictions
        for p in item["predictions"]
    ]


def write_predictions_csv(
    predictions: Iterable[dict[str, Any]], path: str | os.PathLike | TextIO
) -> Path | None:
    """Write predictions as CSV (``path,rank,class,probability``, one row per image and rank).

    ``path`` is a file name (parent folders are created; returns the path) or an open text stream
    such as ``sys.stdout`` (returns ``None``).
    """
    if hasattr(path, "write"):
        _write_csv(predictions, path)
        return None
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        _write_csv(predictions, handle)
    return path


def _write_csv(predictions: Iterable[dict[str, Any]], handle: TextIO) -> None:
    writer = csv.DictWriter(handle, fieldnames=list(PREDICTION_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in prediction_rows(predictions):
        writer.writerow({**row, "probability": f"{row['probability']:.6f}"})


# --------------------------------------------------------------------------- evaluating


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def _align_classes(method: Method, classnames: Sequence[str], dataset: str) -> list[int] | None:
    """Make ``method`` predict ``classnames``; returns a column order when only the order differs.

    Same names in the same order: nothing to do. Same names in another order: the method keeps its
    classes and the logit columns are permuted. Other names: the method is re-targeted if it can
    name unseen classes, otherwise a clear error.
    """
    trained = list(method.classnames)
    wanted = list(classnames)
    if trained == wanted:
        return None
    if sorted(trained) == sorted(wanted):
        return [trained.index(name) for name in wanted]
    if not type(method).supports_unseen_classes:
        raise ValueError(
            f"method {method.name!r} learns state tied to its training classes {trained} and cannot name "
            f"the classes of {dataset} {wanted}. Evaluate it on a dataset with the same class names, "
            "or use a method that can name unseen classes (see `biomedap list methods`)."
        )
    method.set_classnames(wanted)
    return None


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str = "test",
    shots: int | None = None,
    split_seed: int | None = None,
    subsample: str | None = None,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
    device: str = "auto",
    batch_size: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Reload a saved run and evaluate it on a labelled split.

    By default the run's own dataset (``card.json`` and ``config.yaml``: spec and root) and the
    ``test`` split. For ``train``/``val`` the few-shot subset the run was trained on is used (the
    run's shots, split seed and class subset) unless ``shots`` / ``split_seed`` say otherwise.

    With ``dataset`` (and ``root``) another dataset is evaluated (cross-dataset transfer): its own
    class names are used, which needs a method that can name unseen classes unless the names are
    the same; ``train``/``val`` are then the full splits unless ``shots`` is given.

    Args:
        run_dir: a finished run directory.
        dataset, root: another dataset (catalog name, folder or CSV) and its data root.
        split: ``train``, ``val`` or ``test``.
        shots, split_seed: evaluate the K-shot sample of train/val drawn with this seed.
        subsample: ``all``, ``base`` or ``novel`` classes (default: the run's own subset for its own
            dataset, ``all`` for another one).
        backbone: an already loaded backbone (default: the run's, loaded on ``device``).
        cache: feature cache for the evaluated images (default: the run's ``cache_dir``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        batch_size: images per encoder batch.
        progress: show a progress bar while encoding.

    Returns:
        ``{"run_dir", "run_id", "method", "dataset", "split", "shots", "split_seed", "subsample",
        "classnames", "metrics"}`` where ``metrics`` is :func:`biomedap.metrics.evaluate_logits`'s dict
        (fractions in [0, 1]).

    Raises:
        RunError: not a finished run. DataError: the dataset cannot be loaded. ValueError: the method
        cannot name the dataset's classes, or an invalid option.
    """
    from .data import load_dataset, sample_few_shot, subsample_classes
    from .data.fewshot import FewShotSplit
    from .data.sources import SPLITS
    from .features import FeatureCache, ViewSpec, encode_samples
    from .metrics import evaluate_logits
    from .runs import RunError, load_run, resolve_precision
    from .train import predict_logits

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be ≥ 1, got {shots}")
    config = _read_run_config(run_dir)
    data_config = config.get("data") or {}
    method, card = load_run(run_dir, backbone=backbone, device=device)
    card_data = card.get("dataset") or {}

    own = dataset is None
    if own:
        dataset = card_data.get("spec") or data_config.get("dataset")
        if not dataset:
            raise RunError(f"{run_dir} does not record its dataset; pass --dataset (and --root)")
        if root is None:
            root = data_config.get("root")
        if subsample is None:
            subsample = card_data.get("subsample") or "all"
        if split != "test":
            shots = shots if shots is not None else card_data.get("shots")
            split_seed = split_seed if split_seed is not None else card_data.get("split_seed")
    subsample = subsample or "all"
    splits = load_dataset(dataset, root=root)

    if shots is not None:
        seed = split_seed if split_seed is not None else 1
        fewshot = sample_few_shot(splits, int(shots), int(seed))
        split_seed = seed
    else:
        fewshot = FewShotSplit(dataset=splits.name, classnames=list(splits.classnames), shots=0, split_seed=0,
                               train=list(splits.train), val=list(splits.val), test=list(splits.test),
                               source_sha256=splits.source_sha256, image_root=Path(splits.image_root))
    if subsample != "all":
        fewshot = subsample_classes(fewshot, subsample)
    samples = fewshot.split(split)
    if not samples:
        raise EmptyDatasetError(f"the {split} split of {splits.name} ({splits.source}) has no images")

    order = _align_classes(method, fewshot.classnames, f"dataset {splits.name!r}")
    backbone = method.backbone
    precision = resolve_precision(str(config.get("precision", "auto")), backbone.device)
    labels = torch.tensor([s.label for s in samples])
    if type(method).input_kind == "features":
        if cache is None:
            cache = FeatureCache(config.get("cache_dir"))
        features = encode_samples(backbone, samples, ViewSpec(), cache=cache, batch_size=batch_size,
                                  precision=precision, progress=progress, desc=f"{split} features")
        logits = predict_logits(method, features, precision=precision)
    else:
        logits = predict_image_logits(method, [s.path for s in samples], batch_size=batch_size,
                                      precision=precision, progress=progress)
    if order is not None:
        logits = logits[:, order]
    metrics = evaluate_logits(logits, labels, fewshot.classnames)
    return {
        "run_dir": str(run_dir),
        "run_id": card.get("run_id", run_dir.name),
        "method": card.get("method"),
        "dataset": splits.name,
        "dataset_spec": str(dataset),
        "split": split,
        "shots": shots,
        "split_seed": split_seed if shots is not None else None,
        "subsample": subsample,
        "classnames": list(fewshot.classnames),
        "metrics": metrics,
    }
