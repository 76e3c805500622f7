"""``biomedap prompts …``: show, check, perturb and start description banks; list templates.

Each action is a thin layer over :mod:`biomedap.prompts`. Imported by :func:`biomedap.cli.build_parser`
(after :mod:`biomedap.cli` is loaded, so the shared helpers below are available).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import EXIT_OK, EXIT_USAGE, _missing_action, _subparser, _table
from .io import atomic_write_text

_KINDS = ("descriptions", "attributes")


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"the noise level is a fraction of words in [0, 1], got {value}")
    return value


def add_prompts_commands(sub) -> None:
    """Register ``biomedap prompts`` and its actions on the top-level subparsers ``sub``."""
    from .prompts.perturb import NOISE_KINDS

    p = _subparser(
        sub, "prompts", "show, check, perturb or start description banks; list prompt templates",
        "Description banks ({class: [sentence, ...]}) and attribute lists ship for every catalog dataset "
        "(the 11 benchmark datasets and the 11 MedMNIST+ ones). These actions show them, check a bank "
        "against a dataset's classes, degrade one with seeded noise for robustness studies, write a "
        "skeleton bank for your own data, and list the prompt templates by id.",
        "examples:\n"
        "  biomedap prompts show --dataset btmri --class \"glioma tumor\"\n"
        "  biomedap prompts show --dataset medmnist/pathmnist --attributes\n"
        "  biomedap prompts perturb --dataset btmri --level 0.3 --seed 1 --output noisy.json\n"
        "  biomedap prompts perturb --template clinical/btmri --level 0.3 --seed 1 --kind typo\n"
        "  biomedap prompts check --dataset btmri --bank my_bank.json\n"
        "  biomedap prompts init --data ./my_images --output bank.json\n"
        "  biomedap prompts templates 'quality/*'",
    )
    actions = p.add_subparsers(dest="prompts_command", metavar="ACTION", title="actions")
    p.set_defaults(handler=lambda args, parser=p: _missing_action(parser, "show, check, perturb, init or templates"))

    # ------------------------------------------------------------------ show
    a = _subparser(actions, "show", "print a dataset's descriptions or attributes",
                   "Print the built-in description bank of a catalog dataset (or a bank file), one class after "
                   "another, or only --class. With --attributes, BioVLM's attribute sentences instead.",
                   "examples:\n  biomedap prompts show --dataset btmri --class \"glioma tumor\" --limit 5\n"
                   "  biomedap prompts show --dataset busi --json > busi.json\n"
                   "  biomedap prompts show --bank published.py:BIOMEDCOOP_TEMPLATES --dataset btmri")
    a.add_argument("--dataset", metavar="D", help="catalog dataset name or key (btmri, medmnist/pathmnist)")
    a.add_argument("--bank", metavar="FILE", help="show this bank file (.json, or .py[:NAME] read as data) instead")
    a.add_argument("--class", dest="classname", metavar="NAME", help="only this class")
    a.add_argument("--attributes", action="store_true", help="show attribute sentences instead of descriptions")
    a.add_argument("--limit", type=int, metavar="N", help="at most N sentences per class")
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    a.set_defaults(handler=cmd_prompts_show)

    # ------------------------------------------------------------------ check
    a = _subparser(actions, "check", "validate a bank against a dataset's classes (and the quality gates)",
                   "Check a bank: which of the dataset's classes it lacks (with close spellings it has), which "
                   "entries are not classes, which are empty. --quality also applies the gates every built-in "
                   "bank passes (50 sentences per class, 60-200 characters, <= 77 CLIP tokens, varied wording, "
                   "modality named, no sibling class named). Without --bank the built-in bank and attribute "
                   "list of --dataset are checked with every gate. Exit status 2 when problems are found.",
                   "examples:\n  biomedap prompts check --dataset btmri --bank my_bank.json\n"
                   "  biomedap prompts check --data ./my_images --bank bank.json\n"
                   "  biomedap prompts check --dataset medmnist/organamnist")
    a.add_argument("--dataset", metavar="D", help="catalog dataset whose classes the bank must cover")
    a.add_argument("--data", metavar="DIR",
                   help="your own dataset (ImageFolder or split-json folder, or a CSV): its classes instead")
    a.add_argument("--bank", metavar="FILE", help="bank file (.json, or .py[:NAME] read as data)")
    a.add_argument("--quality", action="store_true", help="also apply the built-in banks' quality gates")
    a.set_defaults(handler=cmd_prompts_check)

    # ------------------------------------------------------------------ perturb
    a = _subparser(actions, "perturb", "degrade a bank or template with seeded clinical-text noise",
                   "Degrade a description bank (built-in or a file) or a prompt template at noise level L, the "
                   "expected fraction of word tokens changed, with realistic noise: typos, dropped words, "
                   "shuffled clauses, lay-term or wrong-modality substitutions, truncation, or text mixed in "
                   "from other classes (--kind; default mixed draws one per edit). The same seed gives the same "
                   "output. The measured fraction of changed words is printed to stderr.",
                   "examples:\n  biomedap prompts perturb --dataset btmri --level 0.3 --seed 1 --output noisy.json\n"
                   "  biomedap prompts perturb --bank bank.json --level 0.5 --kind lay --seed 2\n"
                   "  biomedap prompts perturb --template clinical/btmri --level 0.4 --seed 1")
    source = a.add_mutually_exclusive_group()
    source.add_argument("--dataset", metavar="D", help="perturb this catalog dataset's built-in bank (default: btmri)")
    source.add_argument("--bank", metavar="FILE", help="perturb this bank file (.json, or .py[:NAME] read as data)")
    source.add_argument("--template", metavar="ID|TEXT", help="perturb one template, by id or text")
    source.add_argument("--text", metavar="TEXT", help="perturb one sentence")
    a.add_argument("--level", type=_level, required=True, metavar="L", help="expected fraction of words changed, 0-1")
    a.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    a.add_argument("--kind", choices=NOISE_KINDS, default="mixed", help="noise kind")
    a.add_argument("--output", metavar="FILE.json", help="write the perturbed bank here (atomically) instead of stdout")
    a.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    a.set_defaults(handler=cmd_prompts_perturb)

    # ------------------------------------------------------------------ init
    a = _subparser(actions, "init", "write a skeleton bank for your own dataset's classes",
                   "Read your dataset's class names (ImageFolder tree, split-json folder or CSV of path,label) and "
                   "write {class: []} for you to fill with one-sentence descriptions of what each class looks like "
                   "in your modality. Methods that need descriptions take the file with "
                   "--set method.descriptions=FILE. docs/prompts.md says what makes a good description.",
                   "example:\n  biomedap prompts init --data ./my_images --output my_images_bank.json")
    a.add_argument("--data", required=True, metavar="DIR", help="your dataset folder or CSV")
    a.add_argument("--output", metavar="FILE.json", help="where to write the skeleton (default: ./<dataset>_bank.json)")
    a.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    a.set_defaults(handler=cmd_prompts_init)

    # ------------------------------------------------------------------ templates
    a = _subparser(actions, "templates", "list prompt templates by id",
                   "List the prompt templates by id with their text and source: 'generic', 'clinical/<dataset>', "
                   "'ctx_init/<dataset>' and the five quality levels 'quality/<level>'. Methods and the "
                   "robustness protocol accept these ids wherever a template is expected.",
                   "examples:\n  biomedap prompts templates\n  biomedap prompts templates 'clinical/*'")
    a.add_argument("pattern", nargs="?", metavar="PATTERN", help="shell-style filter on ids, e.g. 'quality/*'")
    a.set_defaults(handler=cmd_prompts_templates)


# ---------------------------------------------------------------------------------- helpers


def _classnames(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(label, class names) of --dataset or --data; a usage error if neither is given."""
    if getattr(args, "data", None):
        from .data import load_dataset

        splits = load_dataset(args.data, check_files=False)
        return splits.name, list(splits.classnames)
    if getattr(args, "dataset", None):
        from .data import get_dataset_spec

        spec = get_dataset_spec(args.dataset)
        return spec.key, list(spec.classnames)
    raise ValueError("name the classes to check against: --dataset NAME (catalog) or --data DIR (your own data)")


def _write_new(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------- actions


def cmd_prompts_show(args: argparse.Namespace) -> int:
    from .prompts.banks import attribute_sentences, load_attributes, load_bank, load_bank_file

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.bank:
        if args.attributes:
            raise ValueError("--attributes shows the built-in attribute lists; it cannot be combined with --bank")
        bank = load_bank_file(args.bank)
    elif args.attributes:
        frame, table = load_attributes(args.dataset or _need_dataset())
        bank = {name: attribute_sentences((frame, table), name) for name in table}
    else:
        bank = load_bank(args.dataset or _need_dataset())
    if args.classname is not None:
        if args.classname not in bank:
            import difflib

            close = difflib.get_close_matches(args.classname, list(bank), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"no class {args.classname!r} in this bank.{hint} Classes: {list(bank)}")
        bank = {args.classname: bank[args.classname]}
    bank = {name: texts[: args.limit] for name, texts in bank.items()}
    if args.json:
        print(json.dumps(bank, indent=2, ensure_ascii=False))
        return EXIT_OK
    for i, (name, texts) in enumerate(bank.items()):
        if i:
            print()
        print(f"{name} ({len(texts)})")
        for text in texts:
            print(f"  - {text}")
    return EXIT_OK


def _need_dataset() -> str:
    raise ValueError("name a catalog dataset with --dataset (e.g. btmri) or a bank file with --bank")


def cmd_prompts_check(args: argparse.Namespace) -> int:
    from .prompts.banks import check_against, load_attributes, load_bank, load_bank_file
    from .prompts.quality import check_attributes, check_bank

    label, classnames = _classnames(args)
    problems = 0
    if args.bank:
        bank = load_bank_file(args.bank)
        match = check_against(bank, classnames)
        print(f"{args.bank} against {label} ({len(classnames)} classes): {'OK' if match.ok else 'problems'}")
        summary = match.summary()
        if summary:
            print("\n".join(f"  {line}" for line in summary.splitlines()))
        problems += not match.ok
        if args.quality:
            report = check_bank(bank, classnames, label if not args.data else "")
            print(report.summary())
            problems += not report.ok
    else:
        if args.data:
            raise ValueError("--data needs --bank FILE: there is no built-in bank for your own data "
                             "(`biomedap prompts init --data DIR` writes a skeleton)")
        report = check_bank(load_bank(label), classnames, label)
        print(report.summary())
        problems += not report.ok
        frame, table = load_attributes(label)
        attributes = {"frame": {"prefix": frame.prefix, "suffix": frame.suffix}, "attributes": table}
        attr_report = check_attributes(attributes, classnames, label)
        print("attributes " + attr_report.summary())
        problems += not attr_report.ok
    return EXIT_OK if not problems else EXIT_USAGE


def cmd_prompts_perturb(args: argparse.Namespace) -> int:
    from .prompts.banks import load_bank, load_bank_file
    from .prompts.perturb import changed_fraction, perturb_bank, perturb_template, perturb_text

    if args.template is not None or args.text is not None:
        if args.output:
            raise ValueError("--output writes a perturbed bank; a template or sentence is printed to stdout")
        if args.template is not None:
            from .prompts.templates import resolve_template

            original = resolve_template(args.template)
            result = perturb_template(args.template, args.level, args.seed, args.kind)
        else:
            original = args.text
            result = perturb_text(args.text, args.level, args.seed, args.kind)
        print(result)
        print(f"changed {changed_fraction(original, result):.2f} of the words (level {args.level}, kind "
              f"{args.kind}, seed {args.seed})", file=sys.stderr)
        return EXIT_OK
    bank = load_bank_file(args.bank) if args.bank else load_bank(args.dataset or "btmri")
    noisy = perturb_bank(bank, args.level, args.seed, args.kind)
    text = json.dumps(noisy, indent=2, ensure_ascii=False) + "\n"
    if args.output:
        _write_new(Path(args.output), text, args.force)
        where = f"wrote {args.output}"
    else:
        sys.stdout.write(text)
        where = "printed"
    sentences = sum(len(v) for v in noisy.values())
    print(f"{where}: {len(noisy)} classes, {sentences} sentences; changed "
          f"{changed_fraction(bank, noisy):.3f} of the words (level {args.level}, kind {args.kind}, seed "
          f"{args.seed})", file=sys.stderr)
    return EXIT_OK


def cmd_prompts_init(args: argparse.Namespace) -> int:
    from .prompts.banks import find_bank, skeleton_bank

    label, classnames = _classnames(args)
    output = Path(args.output) if args.output else Path(f"{_safe_stem(label)}_bank.json")
    _write_new(output, json.dumps(skeleton_bank(classnames), indent=2, ensure_ascii=False) + "\n", args.force)
    print(f"wrote {output}: {len(classnames)} classes, no descriptions yet")
    try:
        builtin = find_bank(classnames)
    except ValueError:
        builtin = None
    if builtin:
        print(f"note: these are the classes of {builtin}, which has a built-in bank (descriptions=builtin)")
    print("Fill each list with one-sentence descriptions of how the class looks in your modality (50 per "
          "class matches the published methods; see docs/prompts.md), then check it with\n"
          f"  biomedap prompts check --data {args.data} --bank {output} --quality\n"
          f"and pass it to a method with --set method.descriptions={output}")
    return EXIT_OK


def _safe_stem(label: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label).strip("_")
    return stem or "dataset"


def cmd_prompts_templates(args: argparse.Namespace) -> int:
    from .prompts.templates import get_template, list_templates, template_source

    ids = list_templates(args.pattern)
    if not ids:
        raise ValueError(f"no template id matches {args.pattern!r}; `biomedap prompts templates` lists them all")
    rows = [[tid, repr(get_template(tid)), template_source(tid)] for tid in ids]
    print(_table(["id", "text", "source"], rows))
    return EXIT_OK


__all__ = ["add_prompts_commands"]
