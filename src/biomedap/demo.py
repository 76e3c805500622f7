"""An offline demonstration of the whole pipeline, in about a minute on a laptop CPU.

:func:`run_demo` generates a small synthetic 4-class image dataset, loads the tiny random
BiomedCLIP-shaped backbone (no download), runs zero-shot classification and CoOp few-shot
training at a few shot counts through :func:`biomedap.runs.run_experiment`, and writes a Markdown
table of test accuracies::

    from biomedap.demo import run_demo, format_demo_table
    rows = run_demo("biomedap-demo")
    print(format_demo_table(rows))

The tiny backbone has random weights: it knows nothing about images or words, so zero-shot sits
near chance and the few-shot numbers only show that the pipeline learns. A later release replaces
it with a small pretrained model.

Everything goes under ``output_dir``::

    data/DEMO/...      the generated dataset (BiomedCoOp split-json layout)
    cache/             the feature cache
    runs/<run id>/     one run directory per (method, shots), runs/results.jsonl indexes them
    results.md         the results table
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DEMO_DATASET", "DEFAULT_SHOTS", "demo_settings", "format_demo_table", "run_demo"]

DEMO_DATASET = "DEMO"
DEFAULT_SHOTS: tuple[int, ...] = (1, 4, 16)
DEFAULT_EPOCHS = 30
QUICK_SHOTS: tuple[int, ...] = (4,)
QUICK_EPOCHS = 10

# The tiny random backbone needs a larger step than the published CoOp lr (0.002) to move in 30
# epochs; views are a fixed pool of augmented crops cycled over the epochs (data.views).
_DEMO_LR = 0.02
_SEED = 1

NOTE = (
    "The demo backbone is a tiny randomly initialised BiomedCLIP-shaped model (`--backbone tiny`): "
    "it has no pretrained knowledge of images or medical terms, so zero-shot accuracy is near chance "
    "(25 % for 4 classes) and the CoOp numbers only show that the pipeline learns from a few labelled "
    "images. They say nothing about BiomedCLIP. A later release replaces it with a small pretrained "
    "demo model."
)


def demo_settings(shots: Sequence[int] | None = None, epochs: int | None = None, quick: bool = False) -> dict:
    """The settings :func:`run_demo` uses (shots, epochs, views, batch size, lr, dataset sizes)."""
    shots = tuple(shots) if shots else (QUICK_SHOTS if quick else DEFAULT_SHOTS)
    if any(int(k) < 1 for k in shots):
        raise ValueError(f"shots must be ≥ 1, got {list(shots)}")
    shots = tuple(sorted({int(k) for k in shots}))
    epochs = int(epochs) if epochs is not None else (QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    if epochs < 2:
        raise ValueError(f"epochs must be ≥ 2 (one warm-up epoch + training), got {epochs}")
    return {
        "shots": shots,
        "epochs": epochs,
        "views": 2 if quick else 5,
        "batch_size": 32,
        "lr": _DEMO_LR,
        "seed": _SEED,
        # Per class; the train split must hold the largest shot count.
        "n_train": max(max(shots), 4 if quick else 16),
        "n_val": 4,
        "n_test": 8 if quick else 25,
        "image_size": 64,
    }


def run_demo(
    output_dir: str | os.PathLike = "biomedap-demo",
    shots: Sequence[int] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    progress: bool = True,
    *,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the offline demo; returns one row per run and writes ``output_dir/results.md``.

    Args:
        output_dir: where the data, cache, runs and ``results.md`` go (created).
        shots: shot counts for CoOp (default 1, 4, 16; quick: 4).
        epochs: CoOp training epochs (default 30; quick: 10).
        quick: a few-second version (one shot count, few epochs, fewer images) for CI.
        progress: tqdm progress bars.
        force: rerun finished runs instead of reusing them.

    Returns:
        Rows ``{"method", "shots", "accuracy" (fraction), "run_dir", "skipped"}``: one zero-shot row
        (it trains nothing, so the shot count does not change it) then one CoOp row per shot count.
    """
    from .backbone import load_backbone
    from .config import resolve_run_config
    from .data.synthetic import make_synthetic_dataset
    from .features import FeatureCache
    from .runs import run_experiment

    settings = demo_settings(shots, epochs, quick)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_path = make_synthetic_dataset(
        output_dir / "data", name=DEMO_DATASET, layout="split-json", n_train=settings["n_train"],
        n_val=settings["n_val"], n_test=settings["n_test"], image_size=settings["image_size"], seed=0,
    )
    log.info("demo dataset written to %s", data_path)
    backbone = load_backbone("tiny", device="cpu")
    cache = FeatureCache(output_dir / "cache")
    common = [
        f"data.dataset={_quote(str(data_path))}", "backbone=tiny", "device=cpu", "precision=fp32",
        f"output_dir={_quote(str(output_dir / 'runs'))}", f"cache_dir={_quote(str(output_dir / 'cache'))}",
        f"seed={settings['seed']}",
    ]

    def run(method: str, extra: list[str]) -> Any:
        config = resolve_run_config(method, overrides=[*common, *extra])
        return run_experiment(config, backbone=backbone, cache=cache, progress=progress, force=force)

    rows: list[dict[str, Any]] = []
    first = settings["shots"][0]
    result = run("zeroshot", [f"data.shots={first}"])
    rows.append(_row("zeroshot", None, result))
    for k in settings["shots"]:
        result = run("coop", [
            f"data.shots={k}", f"optim.epochs={settings['epochs']}", f"data.views={settings['views']}",
            f"optim.lr={settings['lr']}", f"optim.batch_size={settings['batch_size']}",
        ])
        rows.append(_row("coop", k, result))

    text = "\n".join([
        "# biomedap demo",
        "",
        format_demo_table(rows, settings["shots"]),
        "",
        f"Test accuracy (%) on {settings['n_test'] * 4} synthetic test images (4 classes, "
        f"{settings['n_test']} per class). CoOp: {settings['epochs']} epochs, lr {settings['lr']}, "
        f"a pool of {settings['views']} augmented views per image, seed {settings['seed']}. "
        "Zero-shot trains nothing, so one number serves every shot count.",
        "",
        NOTE,
        "",
        f"Run directories: {output_dir / 'runs'} (one per row; `biomedap eval --run DIR` and "
        "`biomedap predict --run DIR IMAGES` reuse them).",
        "",
    ])
    (output_dir / "results.md").write_text(text, encoding="utf-8")
    return rows


def _quote(text: str) -> str:
    """A ``--set`` value that YAML reads back as this exact string (paths with ':' or '#')."""
    return "'" + text.replace("'", "''") + "'"


def _row(method: str, shots: int | None, result: Any) -> dict[str, Any]:
    return {"method": method, "shots": shots, "accuracy": result.metrics["test"]["accuracy"],
            "run_dir": str(result.run_dir), "skipped": result.skipped}


def format_demo_table(rows: Sequence[dict[str, Any]], shots: Sequence[int] | None = None) -> str:
    """Markdown table, methods × shots, of test accuracy in percent (zero-shot repeated)."""
    if shots is None:
        shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    header = "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    rule = "|---|" + "---:|" * len(shots)
    lines = [header, rule]
    names = {"zeroshot": "zero-shot", "coop": "CoOp"}
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for k in shots:
            match = [r for r in rows if r["method"] == method and r["shots"] in (k, None)]
            cells.append(f"{100 * match[0]['accuracy']:.1f}" if match else "")
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
