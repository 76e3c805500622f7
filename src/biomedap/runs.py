"""One run, end to end, and the files it leaves behind.

A run directory is self-describing and is the source of truth::

    RUN_DIR/
        config.yaml         the resolved RunConfig (method_config included)
        card.json           format version, method, classes, backbone identity, preprocessing, versions
        state.safetensors   the method's learned state only (kilobytes for prompt learners)
        fewshot.json        the sampled few-shot split (relative paths)
        result.json         metrics per evaluated split, timings; written last, atomically
        <split>_logits.safetensors   logits [N, C] and labels [N] of each evaluated split
        log.txt             per-epoch losses and timings

``results.jsonl`` under the output root is only an index, rebuilt from the run directories.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .config import RunConfig, config_from_dict, config_to_dict
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_text, json_fingerprint

if TYPE_CHECKING:
    from .backbone import Backbone
    from .features import FeatureCache
    from .methods import Method

log = logging.getLogger(__name__)

CARD_FORMAT_VERSION = 1
RESULTS_INDEX = "results.jsonl"


class RunError(RuntimeError):
    """A run directory is missing files or does not match what is asked of it."""


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    metrics: dict[str, dict]
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # True when a finished run with this id already existed


# --------------------------------------------------------------------------- small helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto = fp32 on CPU (bf16 autocast is ~7x slower there), bf16 autocast on CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def run_id(config: RunConfig, method_config: dict, dataset_name: str, dataset_sha256: str) -> str:
    """Readable prefix + hash of everything that can change the numbers.

    The dataset enters as its name and the hash of its split source, not as the path it was given:
    the same data reached through another path or working directory is the same run.
    """
    data = config.data
    spec = {
        "method": config.method,
        "method_config": method_config,
        "optim": config_to_dict(config.optim),
        "data": {k: v for k, v in config_to_dict(data).items() if k not in ("dataset", "root", "num_workers")},
        "dataset": [dataset_name, dataset_sha256],
        "seed": config.seed,
        "backbone": config.backbone,
        "precision": config.precision,
    }
    dataset = dataset_name.lower().replace(" ", "-") or "data"
    sub = "" if data.subsample == "all" else f"-{data.subsample}"
    return f"{config.method}-{dataset}{sub}-k{data.shots}-s{config.seed}-{json_fingerprint(spec)[:8]}"


def _versions() -> dict[str, str]:
    import open_clip
    import transformers

    return {"biomedap": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _append_log(run_dir: Path, line: str) -> None:
    with open(run_dir / "log.txt", "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- the run


def run_experiment(
    config: RunConfig,
    *,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    force: bool = False,
) -> RunResult:
    """Few-shot sample, extract (or reuse) features, train, evaluate and write the run directory.

    A finished run with the same id is returned as is unless ``force``; an interrupted one resumes
    from its last saved epoch.
    """
    from .backbone import load_backbone
    from .data import load_dataset, sample_few_shot, subsample_classes
    from .data.transforms import DASSL_AUGMENT, LP_AUGMENT, NO_AUGMENT
    from .features import FeatureCache, TokenPrefix, ViewSpec, encode_samples, train_views
    from .predict import predict_image_logits
    from .methods import Method, TrainingData, build_method, get_method
    from .metrics import evaluate_logits
    from .train import FeatureTrainData, fit, predict_logits

    timings: dict[str, float] = {}
    started = time.perf_counter()
    method_cls = get_method(config.method)
    method_config = config_from_dict(method_cls.Config, config.method_config, where="method_config")
    method_config_dict = config_to_dict(method_config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    data_cfg = config.data
    split_seed = data_cfg.split_seed if data_cfg.split_seed is not None else config.seed

    # ---- data (first: the run id depends on what the data is, and bad data fails before any file is written)
    t = time.perf_counter()
    splits = load_dataset(data_cfg.dataset, root=data_cfg.root)
    rid = run_id(config, method_config_dict, splits.name, splits.source_sha256)
    run_dir = Path(config.output_dir) / rid
    if (run_dir / "result.json").is_file() and not force:
        import json

        result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
        return RunResult(run_dir, rid, result["metrics"], result.get("timings", {}), skipped=True)
    fewshot = sample_few_shot(splits, data_cfg.shots, split_seed)
    if data_cfg.subsample != "all":
        fewshot = subsample_classes(fewshot, data_cfg.subsample)
    timings["data_s"] = time.perf_counter() - t

    # ---- backbone and method
    t = time.perf_counter()
    if backbone is None:
        backbone = load_backbone(config.backbone, device=device)
    else:
        backbone.to(device)
    cache = cache if cache is not None else FeatureCache(config.cache_dir)
    method = build_method(config.method, backbone, fewshot.classnames, method_config, seed=config.seed)
    timings["build_s"] = time.perf_counter() - t

    # Only now that data, backbone and method exist does the run get a directory.
    run_dir.mkdir(parents=True, exist_ok=True)
    if force:
        (run_dir / "result.json").unlink(missing_ok=True)
        (run_dir / "resume.pt").unlink(missing_ok=True)
        (run_dir / "log.txt").unlink(missing_ok=True)
    if not (run_dir / "log.txt").exists():  # a resumed run already logged its notes
        for note in fewshot.notes:
            _append_log(run_dir, f"note: {note}")
    fewshot.to_json(run_dir / "fewshot.json", relative_to=splits.image_root)

    # ---- features (cached: shared by every method, seed and shot count that needs them)
    t = time.perf_counter()
    labels = torch.tensor([s.label for s in fewshot.train])
    augment = {"dassl": DASSL_AUGMENT, "lp": LP_AUGMENT, "none": NO_AUGMENT}[data_cfg.augment]
    sets_up = type(method).prepare is not Method.prepare or type(method).finalize is not Method.finalize
    on_tokens = method_cls.input_kind == "tokens"
    # Token-space methods train on the tokens entering their first learned block (blocks before it
    # are frozen: computed once per view and cached), and see plain features only as prototypes.
    prefix = TokenPrefix(method.prefix_block, method.prefix_fingerprint(), method.prefix_hook()) if on_tokens else None
    what = "train tokens" if on_tokens else "train"
    views = train_eval_features = None
    if method_cls.trainable or sets_up:
        if augment.kind == "none":
            views = encode_samples(backbone, fewshot.train, ViewSpec(), cache=cache, precision=precision,
                                   num_workers=data_cfg.num_workers, progress=progress,
                                   desc=f"{what} features", prefix=prefix).unsqueeze(0)
        else:
            # A fresh view per epoch (faithful), a fixed pool of views, or the single augmented view
            # the closed-form methods of the published harness used.
            count = data_cfg.views or (config.optim.epochs if method_cls.trainable else 1)
            views = encode_samples(backbone, fewshot.train, train_views(augment, config.seed, count), cache=cache,
                                   precision=precision, num_workers=data_cfg.num_workers, progress=progress,
                                   desc=f"{what} views ({count})", prefix=prefix)
        if on_tokens:  # plain features of the shots: token-space methods' prototypes (one extra pass, cached)
            train_eval_features = encode_samples(
                backbone, fewshot.train, ViewSpec(), cache=cache, precision=precision,
                num_workers=data_cfg.num_workers, progress=progress, desc="train features (eval view)")
        elif augment.kind == "none":  # feature-space methods get them only when they are already at hand
            train_eval_features = views[0]
    # Named extra views (e.g. BioVLM's weak and strong views): as many as the main views, each
    # name with seeds of its own so that its crops differ from the main views'.
    extra_views = {}
    if views is not None:
        for offset, (name, extra_augment) in enumerate(sorted(method_cls.extra_views(method_config).items()), 1):
            extra_seed = config.seed * 1000 + offset
            extra_views[name] = encode_samples(
                backbone, fewshot.train, train_views(extra_augment, extra_seed, views.shape[0]), cache=cache,
                precision=precision, num_workers=data_cfg.num_workers, progress=progress,
                desc=f"{name} views ({views.shape[0]})")
    eval_features = {}
    for split in dict.fromkeys([*data_cfg.eval_splits, *(["val"] if method_cls.uses_validation else [])]):
        if on_tokens:  # evaluated from pixels below: every block after the prefix depends on training
            continue
        samples = fewshot.split(split)
        eval_features[split] = (
            encode_samples(backbone, samples, ViewSpec(), cache=cache, precision=precision,
                           batch_size=config.eval_batch_size, num_workers=data_cfg.num_workers,
                           progress=progress, desc=f"{split} features"),
            torch.tensor([s.label for s in samples]),
        )
    timings["features_s"] = time.perf_counter() - t

    # ---- train: set-up, gradient training, finishing work
    t = time.perf_counter()
    training = None
    if views is not None:
        val_features, val_labels = eval_features.get("val", (None, None))
        training = TrainingData(
            train_features=(train_eval_features if on_tokens else views[0]).to(device), train_labels=labels.to(device),
            views=None if on_tokens else views,
            train_eval_features=None if train_eval_features is None else train_eval_features.to(device),
            val_features=None if val_features is None else val_features.to(device),
            val_labels=None if val_labels is None else val_labels.to(device),
            optim=config.optim, seed=config.seed, precision=precision, cache=cache,
        )
        method.prepare(training)
    fit_result = None
    if method.needs_fit():
        fit_result = fit(
            method, FeatureTrainData(views, labels, extra=extra_views or None, kind="tokens" if on_tokens else "features"),
            config.optim, seed=config.seed, precision=precision,
            checkpoint_path=run_dir / "resume.pt", progress=progress,
            on_epoch_end=lambda row: _append_log(
                run_dir, "epoch {epoch:>4d}  lr {lr:.6g}  ".format(**row)
                + "  ".join(f"{k} {v:.5f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds"))
                + f"  ({row['seconds']:.2f}s)"),
        )
    if training is not None:
        method.finalize(training)
    timings["train_s"] = time.perf_counter() - t

    # ---- evaluate
    t = time.perf_counter()
    metrics = {}
    for split in data_cfg.eval_splits:
        if on_tokens:
            samples = fewshot.split(split)
            split_labels = torch.tensor([s.label for s in samples])
            logits = predict_image_logits(method, [s.path for s in samples], batch_size=config.eval_batch_size,
                                          precision=precision, progress=progress)
        else:
            features, split_labels = eval_features[split]
            logits = predict_logits(method, features, precision=precision)
        metrics[split] = evaluate_logits(logits, split_labels, fewshot.classnames)
        atomic_save_safetensors(run_dir / f"{split}_logits.safetensors",
                                {"logits": logits.float(), "labels": split_labels.long()})
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    # ---- artifacts: learned state only, then the card, then result.json last
    atomic_save_safetensors(run_dir / "state.safetensors", method.learned_state(),
                            metadata={"method": method.name, "format_version": str(CARD_FORMAT_VERSION)})
    import yaml

    resolved = config_to_dict(config)
    resolved["method_config"] = method_config_dict
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "run_id": rid,
        "method": method.name,
        "method_config": method_config_dict,
        "classnames": list(fewshot.classnames),
        "backbone": backbone.identity.to_dict(),
        "preprocess": backbone.preprocess.to_dict(),
        "dataset": {"name": splits.name, "spec": str(data_cfg.dataset), "source": splits.source,
                    "source_sha256": splits.source_sha256, "shots": data_cfg.shots, "split_seed": split_seed,
                    "subsample": data_cfg.subsample},
        "describe": method.describe(),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(run_dir / "card.json", card)
    result = {
        "run_id": rid,
        "method": method.name,
        "dataset": splits.name,
        "shots": data_cfg.shots,
        "seed": config.seed,
        "split_seed": split_seed,
        "subsample": data_cfg.subsample,
        "backbone": backbone.identity.spec,
        "device": str(device),
        "precision": precision,
        "metrics": metrics,
        "timings": timings,
        "fit": None if fit_result is None else {
            "epochs": fit_result.epochs, "steps": fit_result.steps, "seconds": fit_result.seconds,
            "resumed_from_epoch": fit_result.resumed_from_epoch,
            "final_loss": fit_result.history[-1]["loss"] if fit_result.history else None},
        "artifact_bytes": (run_dir / "state.safetensors").stat().st_size,
    }
    atomic_write_json(run_dir / "result.json", result)
    (run_dir / "resume.pt").unlink(missing_ok=True)
    rebuild_index(Path(config.output_dir))
    return RunResult(run_dir, rid, metrics, timings)


# --------------------------------------------------------------------------- index and reloading

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "nll", "n")


def index_rows(result: dict) -> list[dict]:
    """Rows of ``results.jsonl`` for one result.json: one per evaluated split, scalar metrics only."""
    base = {k: result.get(k) for k in ("run_id", "method", "dataset", "shots", "seed", "split_seed", "subsample",
                                        "backbone")}
    rows = []
    for split, metrics in result.get("metrics", {}).items():
        rows.append({**base, "split": split, **{k: metrics.get(k) for k in SCALAR_METRICS if k in metrics}})
    return rows


def rebuild_index(output_dir: Path) -> Path:
    """Rewrite ``results.jsonl`` from every ``*/result.json`` under ``output_dir`` (atomic)."""
    import json

    lines = []
    for result_path in sorted(Path(output_dir).glob("*/result.json")):
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("skipping unreadable %s (%s)", result_path, err)
            continue
        lines.extend(json.dumps(row) for row in index_rows(result))
    target = Path(output_dir) / RESULTS_INDEX
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


def load_run(run_dir: str | Path, *, backbone: Backbone | None = None, device: str = "auto") -> tuple[Method, dict]:
    """Rebuild a saved run's method on its backbone; returns ``(method, card)``."""
    import json

    from safetensors.torch import load_file

    from .backbone import load_backbone
    from .methods import build_method, get_method

    run_dir = Path(run_dir)
    for name in ("card.json", "state.safetensors"):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} is not a finished run: {name} is missing")
    card = json.loads((run_dir / "card.json").read_text(encoding="utf-8"))
    if card.get("format_version", 0) > CARD_FORMAT_VERSION:
        raise RunError(f"{run_dir} was written by a newer biomedap (card format {card['format_version']}); upgrade")
    if backbone is None:
        backbone = load_backbone(card["backbone"]["spec"], device=resolve_device(device))
    expected = card["backbone"].get("fingerprint")
    if expected and expected != backbone.identity.fingerprint:
        raise RunError(
            f"{run_dir} was trained on backbone {card['backbone']['spec']!r} (fingerprint {expected}) but the loaded "
            f"backbone has fingerprint {backbone.identity.fingerprint}: different weights or preprocessing"
        )
    method_cls = get_method(card["method"])
    method = build_method(method_cls.name, backbone, card["classnames"], card["method_config"])
    method.load_learned_state(load_file(str(run_dir / "state.safetensors")))
    method.eval()
    return method, card
