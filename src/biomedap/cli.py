"""The ``biomedap`` command line: a thin argparse layer over the library.

Every command is one library call (``biomedap.runs.run_experiment``, ``biomedap.predict``,
``biomedap.features``, ``biomedap.demo``); this module only parses options, prints tables and turns
known errors into one-line messages. The library never imports it.

Exit codes: 0 success; 1 unexpected error (a bug: the traceback is printed); 2 a usage or input
error (bad option, unknown method or dataset, missing files or weights), printed as
``biomedap: error: <message>``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__

PROG = "biomedap"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_SPLITS = ("train", "val", "test")


# ================================================================================================
# small helpers: argument types, tables, output
# ================================================================================================


def _device(text: str) -> str:
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use auto, cpu, cuda, cuda:N or mps")
    return text


def _int_at_least(minimum: int):
    """An argparse type: a whole number ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number ≥ {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 1,4,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers ≥ 1 such as 1,4,16, got {text!r}")
    return values


def _split_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in _SPLITS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(_SPLITS)}, got {text!r}")
    return list(dict.fromkeys(values))


def _yaml_quote(text: str) -> str:
    """A ``--set`` value that YAML reads back as exactly this string (``yes``, ``2018``, ``a: b``)."""
    return "'" + str(text).replace("'", "''") + "'"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain aligned text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.2f}"


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def metrics_table(metrics_by_split: dict[str, dict]) -> str:
    """Results table: one row per split; rates in percent, NLL in nats."""
    headers = ["split", "n", "accuracy %", "balanced acc %", "macro-F1 %", "AUROC %", "ECE %", "NLL"]
    rows = []
    for split, m in metrics_by_split.items():
        rows.append([split, m.get("n", ""), _percent(m.get("accuracy")), _percent(m.get("balanced_accuracy")),
                     _percent(m.get("macro_f1")), _percent(m.get("auroc")), _percent(m.get("ece")),
                     _number(m.get("nll"))])
    return _table(headers, rows, right=range(1, len(headers)))


def _per_class_table(metrics: dict) -> str | None:
    names = metrics.get("classnames")
    recalls = metrics.get("per_class_recall")
    if not names or not recalls:
        return None
    return _table(["class", "recall %"], [[n, _percent(r)] for n, r in zip(names, recalls)], right=(1,))


def _progress(args: argparse.Namespace) -> bool:
    """tqdm bars unless --no-progress, and only when stderr is a terminal (not in logs or pipes)."""
    if getattr(args, "no_progress", False):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (which tests and notebooks may swap)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; ignore
        pass


@contextlib.contextmanager
def _logging_to_stderr(verbosity: int) -> Iterator[None]:
    """Send the library's log records to stderr for the duration of one command, then restore.

    WARNING by default, INFO with ``-v``, DEBUG with ``-vv``. The ``biomedap`` logger stops
    propagating meanwhile: open_clip's module-level ``logging.info`` calls install a root handler
    (``logging.basicConfig``), which would print every record twice.
    """
    logger = logging.getLogger("biomedap")
    saved = (logger.level, logger.propagate)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# ================================================================================================
# parser
# ================================================================================================


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs, keeps indented lines (examples) as written, appends defaults."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith("  ") for line in lines[1:]) or paragraph.endswith(":"):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS):
            return text
        if isinstance(action.default, list) and not action.default:
            return text
        return text + " (default: %(default)s)"


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """``-v``, ``--debug``, ``--no-progress``: accepted before or after the command name.

    In subcommands the defaults are SUPPRESS so that a flag given before the command is not reset.
    """
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("global options")
    group.add_argument("-v", "--verbose", action="count", default=default(0),
                       help="log library messages to stderr: -v = INFO, -vv = DEBUG")
    group.add_argument("--debug", action="store_true", default=default(False),
                       help="show the full traceback of errors instead of a one-line message")
    group.add_argument("--no-progress", action="store_true", default=default(False),
                       help="no progress bars (they are also off when stderr is not a terminal)")


def _subparser(sub, name: str, help_text: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                            formatter_class=_HelpFormatter)
    _add_global_options(parser, in_subcommand=True)
    return parser


def _add_device(parser, default: str = "auto") -> None:
    parser.add_argument("--device", type=_device, default=default, metavar="DEVICE",
                        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")


def _add_cache_dir(parser, help_text: str | None = None) -> None:
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=help_text or "feature cache directory (default: $BIOMEDAP_CACHE or "
                                          "~/.cache/biomedap/features)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        description="Few-shot adaptation of biomedical vision-language models (BiomedCLIP via open_clip).",
        epilog=(
            "first steps:\n"
            "  biomedap demo                                 offline demo on synthetic data (~1 min)\n"
            "  biomedap list methods                         what can be trained\n"
            "  biomedap train --method coop --dataset btmri --root DATA --shots 16\n"
            "  biomedap predict --run runs/<run id> images/  classify images, write preds.csv\n"
            "  biomedap prompts show --dataset btmri         the built-in class descriptions\n\n"
            "`biomedap COMMAND --help` describes each command. Exit codes: 0 ok, 1 internal error, "
            "2 usage or input error."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
    _add_global_options(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    # ---------------------------------------------------------------- list
    p = _subparser(sub, "list", "list methods, datasets, presets or backbone specs",
                   "List what biomedap knows about.",
                   "examples:\n  biomedap list methods\n  biomedap list datasets")
    p.add_argument("what", choices=("methods", "datasets", "presets", "backbones"),
                   help="methods (summary, input, unseen classes), datasets (catalog: modality, classes), "
                        "presets (per-method settings files) or backbones (accepted --backbone forms)")
    p.set_defaults(handler=cmd_list)

    # ---------------------------------------------------------------- train
    p = _subparser(
        sub, "train", "train (or evaluate zero-shot) one method on one dataset",
        "Few-shot sample a dataset, extract (or reuse cached) features, train a method, evaluate it and "
        "write a run directory.\n\nOptions are resolved as: method preset < --config FILE < the flags "
        "below < --set KEY=VALUE.",
        "examples:\n"
        "  biomedap train --method coop --dataset btmri --root ~/data --shots 16 --seed 1\n"
        "  biomedap train --method coop --dataset ./my_images --set optim.epochs=50 method.n_ctx=8\n"
        "  biomedap train --method coop --help-config        # every option with its default and help",
    )
    p.add_argument("--method", metavar="NAME", help="method to run (see `biomedap list methods`)")
    p.add_argument("--dataset", metavar="D",
                   help="catalog name or key (btmri), an image folder (ImageFolder or split-json layout) or "
                        "a CSV of path,label")
    p.add_argument("--root", metavar="DIR", help="data root holding the catalog datasets (ROOT/<NAME>/...)")
    p.add_argument("--shots", type=_positive_int, metavar="K", help="training images per class (data.shots)")
    p.add_argument("--seed", type=_non_negative_int, metavar="S",
                   help="run seed: initialisation, batch order, augmentation (seed)")
    p.add_argument("--split-seed", type=_non_negative_int, metavar="S",
                   help="seed of the few-shot sampling (data.split_seed; default: the run seed)")
    p.add_argument("--backbone", metavar="SPEC",
                   help="backbone spec: biomedclip, hf-hub:ORG/REPO, local-dir:PATH or tiny "
                        "(see `biomedap list backbones`)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any RunConfig options")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override options by dotted name, e.g. optim.lr=0.01 method.n_ctx=8 (applied last)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="directory that receives the run directory (output_dir)")
    p.add_argument("--device", type=_device, metavar="DEVICE",
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps (device)")
    _add_cache_dir(p, "feature cache directory (cache_dir; default: $BIOMEDAP_CACHE or "
                      "~/.cache/biomedap/features)")
    p.add_argument("--force", action="store_true",
                   help="run again even if a finished run with the same id exists (it is overwritten)")
    p.add_argument("--help-config", action="store_true",
                   help="print every option of the run and of the method (dotted name, type, default from "
                        "the preset, help) and exit")
    p.set_defaults(handler=cmd_train)

    # ---------------------------------------------------------------- eval
    p = _subparser(
        sub, "eval", "evaluate a saved run on its own or another dataset",
        "Reload a saved run and evaluate it. By default on its own dataset (as recorded in card.json and "
        "config.yaml) and its test split; with --dataset on another dataset, using that dataset's class "
        "names (methods that cannot name unseen classes refuse different class names).",
        "examples:\n"
        "  biomedap eval --run runs/coop-btmri-k16-s1-1a2b3c4d\n"
        "  biomedap eval --run runs/coop-btmri-k16-s1-1a2b3c4d --subsample novel\n"
        "  biomedap eval --run RUN --dataset busi --root ~/data --output busi.json",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("--dataset", metavar="D", help="evaluate on this dataset instead of the run's own")
    p.add_argument("--root", metavar="DIR", help="data root of --dataset (default: the run's data root)")
    p.add_argument("--split", choices=_SPLITS, default="test", help="split to evaluate")
    p.add_argument("--shots", type=_positive_int, metavar="K",
                   help="for train/val: evaluate the K-shot sample (default: the run's own few-shot split "
                        "on its own dataset, the full split on another)")
    p.add_argument("--split-seed", type=_non_negative_int, metavar="S",
                   help="seed of that K-shot sample (default: the run's split seed, else 1)")
    p.add_argument("--subsample", choices=("all", "base", "novel"),
                   help="classes to evaluate: all, base (first half) or novel (second half); default: the "
                        "run's own subset on its own dataset, all on another")
    p.add_argument("--backbone", metavar="SPEC",
                   help="load the backbone from this spec instead of the one in card.json (e.g. a moved "
                        "local-dir:PATH); its fingerprint must match")
    _add_device(p)
    _add_cache_dir(p, "feature cache directory (default: the run's cache_dir)")
    p.add_argument("--batch-size", type=_positive_int, default=100, metavar="N",
                   help="images per encoder batch")
    p.add_argument("--output", metavar="FILE.json", help="also write the metrics to this JSON file")
    p.set_defaults(handler=cmd_eval)

    # ---------------------------------------------------------------- predict
    p = _subparser(
        sub, "predict", "classify image files with a saved run",
        "Classify image files (or folders, searched recursively for .png .jpg .jpeg .bmp .tif .tiff .webp) "
        "with a saved run on its backbone. Probabilities are the softmax of the run's logits.",
        "examples:\n"
        "  biomedap predict --run runs/coop-btmri-k16-s1-1a2b3c4d scans/ --topk 3\n"
        "  biomedap predict --run RUN a.png b.png --output results/preds.csv\n"
        "  biomedap predict --run RUN scans/ --output - > preds.csv",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=_positive_int, default=3, metavar="K", help="classes listed per image")
    p.add_argument("--output", default="preds.csv", metavar="FILE.csv",
                   help="CSV with columns path,rank,class,probability, one row per image and rank; "
                        "'-' prints the CSV to stdout instead of the table")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per batch")
    p.add_argument("--backbone", metavar="SPEC",
                   help="load the backbone from this spec instead of the one in card.json; its fingerprint "
                        "must match")
    _add_device(p)
    p.set_defaults(handler=cmd_predict)

    # ---------------------------------------------------------------- cache
    p = _subparser(sub, "cache", "build, inspect or clear the feature cache",
                   "Manage the content-addressed cache of frozen image features, shared by every method, "
                   "seed and shot count.",
                   "examples:\n"
                   "  biomedap cache build --dataset btmri --root ~/data --backbone biomedclip\n"
                   "  biomedap cache build --dataset btmri --root ~/data --shots 16 --split-seed 1 "
                   "--augment dassl --views 10 --seed 1\n"
                   "  biomedap cache info\n"
                   "  biomedap cache clear --yes")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", title="actions")
    p.set_defaults(handler=lambda args, parser=p: _missing_action(parser))

    c = _subparser(cache_sub, "build", "encode a dataset's images into the cache",
                   "Encode the eval view of each image of the chosen splits (and, with --augment/--views, "
                   "the augmented training views a run with --seed S would use). Cached images are not "
                   "encoded again.",
                   "example:\n  biomedap cache build --dataset btmri --root ~/data --splits train,val,test")
    c.add_argument("--dataset", required=True, metavar="D",
                   help="catalog name or key, an image folder or a CSV of path,label")
    c.add_argument("--root", metavar="DIR", help="data root holding the catalog datasets")
    c.add_argument("--backbone", default="biomedclip", metavar="SPEC",
                   help="backbone spec (see `biomedap list backbones`)")
    c.add_argument("--splits", type=_split_list, default=",".join(_SPLITS), metavar="LIST",
                   help="comma-separated splits to encode: train,val,test")
    c.add_argument("--shots", type=_positive_int, metavar="K",
                   help="only the K-shot sample of train (and min(K, 4) of val) instead of the full splits")
    c.add_argument("--split-seed", type=_non_negative_int, default=1, metavar="S",
                   help="seed of that K-shot sample")
    c.add_argument("--augment", choices=("dassl", "lp"),
                   help="also encode augmented training views: dassl (RandomResizedCrop scale (0.08, 1)) "
                        "or lp (scale (0.5, 1) + flip); needs --views")
    c.add_argument("--views", type=_positive_int, metavar="N",
                   help="number of augmented views per training image, as a run's data.views (without "
                        "--augment: dassl)")
    c.add_argument("--seed", type=_non_negative_int, default=1, metavar="S",
                   help="run seed the augmented views belong to")
    c.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="feature precision namespace (bf16 only differs on CUDA); the presets use fp32")
    c.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="images per encoder batch")
    _add_device(c)
    _add_cache_dir(c)
    c.set_defaults(handler=cmd_cache_build)

    c = _subparser(cache_sub, "info", "show the cache location, entries and size per backbone",
                   "Show the cache location and, per backbone fingerprint, the number of cached features and "
                   "their size on disk.")
    _add_cache_dir(c)
    c.set_defaults(handler=cmd_cache_info)

    c = _subparser(cache_sub, "clear", "delete every cached feature",
                   "Delete the feature cache directory. Asks for confirmation unless --yes; refuses "
                   "directories that do not look like a biomedap feature cache.")
    _add_cache_dir(c)
    c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    c.set_defaults(handler=cmd_cache_clear)

    # ---------------------------------------------------------------- demo
    p = _subparser(
        sub, "demo", "offline demo: zero-shot and CoOp on a synthetic dataset with a tiny model",
        "Generate a small synthetic 4-class dataset, run zero-shot and CoOp few-shot training on a tiny "
        "random BiomedCLIP-shaped backbone (CPU, nothing downloaded) and print a results table. The tiny "
        "model has no pretrained knowledge: the numbers only show that the pipeline learns.",
        "examples:\n  biomedap demo\n  biomedap demo --output-dir /tmp/demo --shots 1,2,4,8,16 --epochs 50\n"
        "  biomedap demo --quick",
    )
    p.add_argument("--output-dir", default="biomedap-demo", metavar="DIR",
                   help="where the data, cache, runs and results.md go")
    p.add_argument("--shots", type=_int_list, metavar="LIST",
                   help="comma-separated CoOp shot counts (default: 1,4,16; --quick: 4)")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help="CoOp training epochs (default: 30; --quick: 10)")
    p.add_argument("--quick", action="store_true",
                   help="a few-second version for CI: one shot count, few epochs, fewer images")
    p.add_argument("--force", action="store_true", help="rerun finished demo runs instead of reusing them")
    p.set_defaults(handler=cmd_demo)

    # ---------------------------------------------------------------- prompts
    from .cli_prompts import add_prompts_commands  # here: that module imports this one's helpers

    add_prompts_commands(sub)
    return parser


def _missing_action(parser: argparse.ArgumentParser, actions: str = "build, info or clear") -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: choose an action: {actions}", file=sys.stderr)
    return EXIT_USAGE


# ================================================================================================
# commands
# ================================================================================================


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from .methods import list_methods

        rows = [[cls.name, cls.input_kind, "yes" if cls.trainable else "no",
                 "yes" if cls.supports_unseen_classes else "no", cls.summary] for cls in list_methods()]
        print(_table(["method", "input", "trains", "unseen classes", "summary"], rows))
        print("\ninput: features = trains on cached image features; pixels = runs the image tower.")
        print("unseen classes: whether a trained run can classify class names it was not trained on.")
        print("Options of a method: biomedap train --method NAME --help-config")
    elif args.what == "datasets":
        from .data import list_all_datasets

        def names(spec) -> str:
            text = "; ".join(spec.classnames)
            return text if len(text) <= 70 else text[:67] + "..."

        rows = [[spec.name, spec.key, spec.family, spec.modality, spec.num_classes, names(spec)]
                for spec in list_all_datasets()]
        print(_table(["dataset", "key", "family", "modality", "classes", "class names"], rows, right=(4,)))
        print("\nBenchmark datasets are read from --root ROOT as ROOT/<NAME>/<NAME>/<class>/<image> + "
              "ROOT/<NAME>/split_<NAME>.json.")
        print("MedMNIST+ datasets (key medmnist/<flag>) have class names, templates and description banks here; "
              "their .npz reader comes with the data commands.")
        print("Descriptions of each class: biomedap prompts show --dataset KEY")
        print("Your own data: --dataset PATH with an ImageFolder tree, a split-json folder or a CSV of "
              "path,label.")
    elif args.what == "presets":
        from .config import _presets_root, list_presets

        root = _presets_root(None)
        rows = []
        for name in list_presets():
            first = ""
            try:
                for line in (root / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
                    if line.startswith("#"):
                        first = line.lstrip("#").strip().rstrip(":")
                        break
            except OSError:
                pass
            rows.append([name, first])
        print(_table(["preset", "description"], rows))
        print(f"\nPresets live in {root}; `biomedap train --method NAME --help-config` shows their values.")
    else:
        from .backbone import ALIASES

        rows = [[alias, f"alias of {target}"] for alias, target in ALIASES.items()]
        rows += [
            ["hf-hub:ORG/REPO",
             "an open_clip model on the Hugging Face Hub (read from its cache when offline)"],
            ["local-dir:PATH", "a folder with open_clip_config.json, the checkpoint and tokenizer files"],
            ["tiny[:SEED]", "a tiny random BiomedCLIP-shaped model for tests and the demo (no download)"],
            ["random-biomedclip[:SEED]", "the full BiomedCLIP architecture with random weights (benchmarks)"],
        ]
        print(_table(["--backbone", "meaning"], rows))
        print("\nOffline: set HF_HUB_OFFLINE=1; a missing model's error lists the files needed and where "
              "to put them.")
    return EXIT_OK


# ---------------------------------------------------------------------------------- train


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``--set`` items, placed before the user's own ``--set`` items (which win)."""
    flags = (
        ("dataset", "data.dataset", True), ("root", "data.root", True), ("shots", "data.shots", False),
        ("seed", "seed", False), ("split_seed", "data.split_seed", False), ("backbone", "backbone", True),
        ("output_dir", "output_dir", True), ("device", "device", True), ("cache_dir", "cache_dir", True),
    )
    items = []
    for attr, key, is_text in flags:
        value = getattr(args, attr)
        if value is not None:
            items.append(f"{key}={_yaml_quote(value) if is_text else value}")
    return items + list(args.overrides)


def _method_name(args: argparse.Namespace) -> str:
    """The method from --method, else from --set method=... or the --config file; else a usage error."""
    from .config import ConfigError, load_yaml, parse_set_overrides

    if args.method:
        return args.method
    named = parse_set_overrides(args.overrides).get("method")
    if isinstance(named, str) and named:
        return named
    if args.config:
        named = load_yaml(args.config).get("method")
        if isinstance(named, str) and named:
            return named
    raise ConfigError("train needs --method NAME (see `biomedap list methods`)")


def _help_config(method_cls, config) -> str:
    from .config import config_from_dict, describe_config

    rows = [row for row in describe_config(config) if row[0] != "method_config"]
    method_config = config_from_dict(method_cls.Config, config.method_config, where="method_config")
    rows += describe_config(method_config, prefix="method_config.")
    header = ("option", "type", "default", "help")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        f"Options of `biomedap train --method {method_cls.name}` (defaults: RunConfig < "
        f"presets/{config.method}.yaml < --config < flags < --set).",
        "Set any of them with --set NAME=VALUE; method_config.X can be written method.X.",
        "",
    ]
    for row in [header, *rows]:
        lines.append("  ".join([row[i].ljust(widths[i]) for i in range(3)] + [row[3]]).rstrip())
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, resolve_run_config
    from .methods import get_method

    method_cls = get_method(_method_name(args))  # KeyError with "did you mean" for unknown names
    config = resolve_run_config(method_cls.name, config_file=args.config, overrides=_train_overrides(args))
    if args.help_config:
        print(_help_config(method_cls, config))
        return EXIT_OK
    if not config.data.dataset:
        raise ConfigError("train needs a dataset: --dataset NAME|FOLDER|FILE.csv "
                          "(see `biomedap list datasets`)")

    from .runs import run_experiment

    print(f"{method_cls.name} on {config.data.dataset}: {config.data.shots} shots, seed {config.seed}, "
          f"backbone {config.backbone}, device {config.device}", file=sys.stderr)
    result = run_experiment(config, progress=_progress(args), force=args.force)
    if result.skipped:
        print(f"Skipped: a finished run with the same settings already exists: {result.run_dir}\n"
              "(its stored results are shown; pass --force to run it again)")
    print(metrics_table(result.metrics))
    timings = result.timings
    if not result.skipped and timings.get("total_s") is not None:
        print(f"\ntime: {timings['total_s']:.1f} s (features {timings.get('features_s', 0):.1f} s, "
              f"training {timings.get('train_s', 0):.1f} s)")
    print(f"run directory: {result.run_dir}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- eval / predict


def _maybe_backbone(spec: str | None, device: str):
    if spec is None:
        return None
    from .backbone import load_backbone
    from .runs import resolve_device

    return load_backbone(spec, device=resolve_device(device))


def cmd_eval(args: argparse.Namespace) -> int:
    from .features import FeatureCache
    from .io import atomic_write_json
    from .predict import evaluate_run

    report = evaluate_run(
        args.run, dataset=args.dataset, root=args.root, split=args.split, shots=args.shots,
        split_seed=args.split_seed, subsample=args.subsample,
        backbone=_maybe_backbone(args.backbone, args.device),
        cache=FeatureCache(args.cache_dir) if args.cache_dir else None, device=args.device,
        batch_size=args.batch_size, progress=_progress(args),
    )
    metrics = report["metrics"]
    scope = f"{report['split']} split"
    if report["shots"] is not None and report["split"] != "test":
        scope += f", {report['shots']}-shot sample (split seed {report['split_seed']})"
    if report["subsample"] != "all":
        scope += f", {report['subsample']} classes"
    print(f"{report['method']} run {report['run_id']} on {report['dataset']} ({scope}):")
    print(metrics_table({report["split"]: metrics}))
    per_class = _per_class_table(metrics)
    if per_class:
        print()
        print(per_class)
    if args.output:
        path = Path(args.output)
        if path.parent != Path("."):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, report)
        print(f"\nmetrics written to {path}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import collect_images, predict_images, write_predictions_csv
    from .runs import load_run, resolve_precision

    images = collect_images(args.paths)
    backbone = _maybe_backbone(args.backbone, args.device)
    method, card = load_run(args.run, backbone=backbone, device=args.device)
    precision = resolve_precision(_run_precision(Path(args.run)), method.backbone.device)
    predictions = predict_images(method, images, topk=args.topk, batch_size=args.batch_size,
                                 precision=precision, progress=_progress(args))
    k = min(args.topk, len(method.classnames))
    if k < args.topk:
        print(f"note: the run has {len(method.classnames)} classes; listing {k} per image", file=sys.stderr)
    run_id = card.get("run_id", args.run)
    summary = f"{len(predictions)} image(s) classified by {card.get('method')} run {run_id}"
    if args.output == "-":
        write_predictions_csv(predictions, sys.stdout)
        print(summary, file=sys.stderr)
        return EXIT_OK
    rows = []
    for item in predictions:
        for p in item["predictions"]:
            rows.append([item["path"] if p["rank"] == 1 else "", p["rank"], p["class"],
                         f"{p['probability']:.4f}"])
    print(_table(["image", "rank", "class", "probability"], rows, right=(1, 3)))
    print(f"\n{summary}")
    path = write_predictions_csv(predictions, args.output)
    print(f"predictions written to {path}")
    return EXIT_OK


def _run_precision(run_dir: Path) -> str:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "auto"
    return str(config.get("precision", "auto")) if isinstance(config, dict) else "auto"


# ---------------------------------------------------------------------------------- cache


def _cache(args: argparse.Namespace):
    from .features import FeatureCache

    return FeatureCache(args.cache_dir)


def _entries(stats: dict, fingerprint: str | None = None) -> int:
    if fingerprint is not None:
        return stats.get(fingerprint, {}).get("entries", 0)
    return sum(s["entries"] for s in stats.values())


def cmd_cache_build(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .data import DASSL_AUGMENT, LP_AUGMENT, load_dataset, sample_few_shot
    from .features import ViewSpec, encode_samples, train_views
    from .runs import resolve_device

    augment = args.augment
    if args.views is not None and augment is None:
        augment = "dassl"
    if augment is not None and args.views is None:
        raise ValueError("--augment needs --views N: the number of augmented views per training image")
    if augment is not None and "train" not in args.splits:
        raise ValueError("--augment/--views encode training views: include train in --splits")

    cache = _cache(args)
    splits = load_dataset(args.dataset, root=args.root)
    if args.shots is not None:
        data = sample_few_shot(splits, args.shots, args.split_seed)
        scope = f"{args.shots}-shot sample (split seed {args.split_seed}) of train/val, full test"
    else:
        data = splits
        scope = "full splits"
    backbone = load_backbone(args.backbone, device=resolve_device(args.device))
    fingerprint = backbone.identity.fingerprint
    before = _entries(cache.stats(), fingerprint)
    print(f"encoding {splits.name} ({scope}) with backbone {args.backbone} into {cache.root}",
          file=sys.stderr)

    rows = []
    progress = _progress(args)
    for split in args.splits:
        samples = data.split(split)
        start = _entries(cache.stats(), fingerprint)
        if samples:
            encode_samples(backbone, samples, ViewSpec(), cache=cache, batch_size=args.batch_size,
                           precision=args.precision, progress=progress, desc=f"{split} features")
        rows.append([split, "eval", len(samples), _entries(cache.stats(), fingerprint) - start])
    if augment is not None:
        spec = {"dassl": DASSL_AUGMENT, "lp": LP_AUGMENT}[augment]
        samples = data.split("train")
        start = _entries(cache.stats(), fingerprint)
        encode_samples(backbone, samples, train_views(spec, args.seed, args.views), cache=cache,
                       batch_size=args.batch_size, precision=args.precision, progress=progress,
                       desc=f"train views ({args.views})")
        rows.append(["train", f"{augment} x{args.views} (seed {args.seed})", len(samples) * args.views,
                     _entries(cache.stats(), fingerprint) - start])
    after = _entries(cache.stats(), fingerprint)
    print(_table(["split", "view", "features", "newly encoded"], rows, right=(2, 3)))
    print(f"\n{after - before} new feature(s) encoded; backbone {fingerprint} now has {after} cached in "
          f"{cache.root}")
    return EXIT_OK


def _cache_backbone_spec(backbone_dir: Path) -> str:
    """The backbone spec recorded in one shard manifest of a fingerprint folder ('?' if none)."""
    for manifest in backbone_dir.glob("*/shard-*.json"):
        try:
            return str(json.loads(manifest.read_text(encoding="utf-8"))["backbone"]["spec"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "?"


def cmd_cache_info(args: argparse.Namespace) -> int:
    cache = _cache(args)
    stats = cache.stats()
    print(f"feature cache: {cache.root}")
    if not stats:
        print("empty (`biomedap cache build` or any `biomedap train` fills it)")
        return EXIT_OK
    rows = [[fingerprint, _cache_backbone_spec(cache.root / fingerprint), s["entries"], _size(s["bytes"])]
            for fingerprint, s in stats.items()]
    total_entries = sum(s["entries"] for s in stats.values())
    total_bytes = sum(s["bytes"] for s in stats.values())
    rows.append(["total", "", total_entries, _size(total_bytes)])
    print(_table(["backbone fingerprint", "backbone", "entries", "size"], rows, right=(2, 3)))
    return EXIT_OK


def cmd_cache_clear(args: argparse.Namespace) -> int:
    cache = _cache(args)
    root = cache.root
    if not root.exists():
        print(f"nothing to clear: {root} does not exist")
        return EXIT_OK
    cache.check_is_cache()
    stats = cache.stats()
    entries = sum(s["entries"] for s in stats.values())
    size = sum(s["bytes"] for s in stats.values())
    if not args.yes:
        if not sys.stdin or not sys.stdin.isatty():
            raise ValueError(f"refusing to delete {root} ({entries} features, {_size(size)}) without "
                             "confirmation: pass --yes")
        answer = input(f"Delete {root} ({entries} features, {_size(size)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    cache.clear()
    print(f"deleted {entries} cached feature(s) ({_size(size)}) from {root}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import NOTE, format_demo_table, run_demo

    output = Path(args.output_dir)
    print(f"biomedap demo: synthetic data, tiny random backbone, CPU; writing to {output}", file=sys.stderr)
    rows = run_demo(output, shots=args.shots, epochs=args.epochs, quick=args.quick, progress=_progress(args),
                    force=args.force)
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    print("Test accuracy (%):\n")
    print(format_demo_table(rows, shots))
    print()
    print(NOTE)
    print(f"\ntable written to {output / 'results.md'}")
    print(f"run directories under {output / 'runs'}, e.g. {rows[-1]['run_dir']}")
    print(f"next: biomedap predict --run {rows[-1]['run_dir']} {output / 'data'} --topk 2")
    return EXIT_OK


# ================================================================================================
# entry point
# ================================================================================================


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Known user errors. Library exception classes are looked up only if their module is loaded
    (an exception of a class whose module was never imported cannot have been raised)."""
    types: list[type[BaseException]] = [ValueError, KeyError, FileNotFoundError, FileExistsError,
                                        NotImplementedError, FloatingPointError]  # DataError, ConfigError are ValueErrors
    modules = {
        "biomedap.runs": ("RunError",),
        "biomedap.backbone.loading": ("BackboneLoadError", "MissingWeightsError"),
        "biomedap.backbone.towers": ("UnsupportedBackboneError",),
    }
    for module_name, names in modules.items():
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                types.append(cls)
    return tuple(types)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) would add quotes
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, FloatingPointError):
        text += " (training diverged: lower optim.lr, e.g. --set optim.lr=0.001)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 internal error, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        code = exit_.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    debug = bool(getattr(args, "debug", False))
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _logging_to_stderr(int(getattr(args, "verbose", 0) or 0)):
            return int(handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted (finished epochs and cached features are kept; rerun to resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        if isinstance(err, _user_error_types()):
            print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc()
        print(f"{PROG}: internal error: {type(err).__name__}: {err}\n"
              "This is probably a bug in biomedap; please report it with the traceback above.",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
