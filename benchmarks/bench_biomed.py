"""BiomedCoOp, Biomed-DPT (released) and BiomedAP on the full-size BiomedCLIP architecture (random weights).

    .venv/bin/python benchmarks/bench_biomed.py                    # everything (~40 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_biomed.py --methods biomedap --ap-epochs 2
    .venv/bin/python benchmarks/bench_biomed.py --json out.json

What it measures (fp32, 16 shots x 4 classes = 64 training images, batch 4 as published; torch threads =
all cores): through ``run_experiment``, the *training side* of a run — feature/token extraction plus
training (teacher text encoding included), not the test pass:

1. BiomedCoOp, ``--epochs`` (100) epochs with a pool of 10 cached views: cold cache (extraction
   included) and warm cache (pool already cached).
2. Biomed-DPT ``variant=released`` (four fixed zero tokens: image features fully cacheable), the same
   two figures.
3. BiomedAP (default configuration: blocks before the first fusion layer cached as tokens),
   seconds per epoch, median over ``--ap-epochs`` epochs after the first.

The reference column quotes ../shared/reference/reference-costs.md (published code, unmodified, same
machine class). Time figures are also shown scaled by the ratio of fp32 matmul speeds between this
machine and the reference one (183 GFLOP/s), as in bench_coop.py.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coop import REFERENCE_GFLOPS, matmul_gflops, peak_rss_mib  # noqa: E402

CLASSNAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]

# reference-costs.md: 100-epoch training part of the published runs (16 shots, 4 classes) and BiomedAP's epoch.
REFERENCE = {
    "biomedcoop_train_min": 137.0,
    "biomeddpt_train_min": 109.0,
    "biomedap_epoch_s": 79.4,
}
TARGETS = {"cold_min": 8.0, "warm_min": 6.0, "ap_speedup": 2.0}

RUNS = {
    "biomedcoop": ("biomedcoop", []),
    "biomeddpt-released": ("biomeddpt", ["method_config.variant=released"]),
    "biomedap": ("biomedap", []),
}


def epoch_seconds(run_dir: Path) -> list[float]:
    """Per-epoch seconds from a run's log.txt (``epoch N ... (S s)`` lines)."""
    text = (run_dir / "log.txt").read_text(encoding="utf-8")
    return [float(m) for m in re.findall(r"^epoch .*\(([0-9.]+)s\)$", text, flags=re.M)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="biomedcoop,biomeddpt-released,biomedap",
                        help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the BiomedCoOp / Biomed-DPT runs")
    parser.add_argument("--ap-epochs", type=int, default=3, help="epochs of the BiomedAP run (per-epoch timing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RUNS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(RUNS)}")

    from biomedap.backbone import load_backbone
    from biomedap.config import resolve_run_config
    from biomedap.data.synthetic import make_synthetic_dataset
    from biomedap.features import FeatureCache
    from biomedap.runs import run_experiment

    gflops = matmul_gflops()
    scale = gflops / REFERENCE_GFLOPS
    print(f"fp32 matmul: {gflops:.0f} GFLOP/s (reference machine {REFERENCE_GFLOPS:.0f}); threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    backbone = load_backbone("random-biomedclip", device="cpu")
    figures: dict[str, float] = {"gflops": gflops}
    with tempfile.TemporaryDirectory(prefix="biomedap-bench-") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_dataset(tmp / "data", name="BTMRI_SYNTH", classnames=CLASSNAMES, n_train=16,
                                      n_val=4, n_test=2, image_size=224, seed=0)
        for label in methods:
            method, extra = RUNS[label]
            cache = FeatureCache(tmp / f"cache-{label}")
            epochs = args.ap_epochs if method == "biomedap" else args.epochs

            def run():
                config = resolve_run_config(method, dataset="btmri", overrides=[
                    f"data.dataset={data}", "data.shots=16", f"output_dir={tmp / 'runs'}", "device=cpu",
                    "backbone=random-biomedclip", f"optim.epochs={epochs}", "data.views=10",
                    "data.eval_splits=[test]", *extra])
                started = time.perf_counter()
                result = run_experiment(config, backbone=backbone, cache=cache, progress=False, force=True)
                print(f"{label}: {time.perf_counter() - started:.0f}s (timings {result.timings})", file=sys.stderr)
                return result

            cold = run()
            if method == "biomedap":
                seconds = epoch_seconds(cold.run_dir)
                steady = seconds[1:] or seconds
                figures["biomedap_epoch_s"] = statistics.median(steady)
                figures["biomedap_features_s"] = cold.timings["features_s"]
                continue
            figures[f"{label}_cold_s"] = cold.timings["features_s"] + cold.timings["train_s"]
            warm = run()
            figures[f"{label}_warm_s"] = warm.timings["features_s"] + warm.timings["train_s"]
            figures[f"{label}_artifact_bytes"] = (warm.run_dir / "state.safetensors").stat().st_size
    figures["peak_rss_mib"] = peak_rss_mib()

    rows = []
    for label, reference in (("biomedcoop", "biomedcoop_train_min"), ("biomeddpt-released", "biomeddpt_train_min")):
        if f"{label}_cold_s" not in figures:
            continue
        for which in ("cold", "warm"):
            minutes = figures[f"{label}_{which}_s"] / 60
            target = TARGETS[f"{which}_min"]
            rows.append((f"{label}, {args.epochs} epochs, pool of 10 views, {which} cache, min",
                         f"{minutes:.1f}", f"{minutes * scale:.1f} (target ≤ {target:g})",
                         f"{REFERENCE[reference]:g}"))
        rows.append((f"{label}, saved artifact", f"{figures[f'{label}_artifact_bytes'] / 1024:.0f} KB", "", ""))
    if "biomedap_epoch_s" in figures:
        epoch = figures["biomedap_epoch_s"]
        speedup = REFERENCE["biomedap_epoch_s"] / (epoch * scale)
        rows.append(("biomedap, seconds per epoch (64 images, batch 4)", f"{epoch:.1f}",
                     f"{epoch * scale:.1f} ({speedup:.1f}x faster; target ≥ {TARGETS['ap_speedup']:g}x)",
                     f"{REFERENCE['biomedap_epoch_s']:g}"))
    rows.append(("peak RSS, MiB", f"{figures['peak_rss_mib']:.0f}", "", ""))
    print("| measurement (fp32, 2 CPU cores) | biomedap | scaled to the reference machine | published code |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
