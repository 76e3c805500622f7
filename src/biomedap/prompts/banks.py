"""Description banks and attribute lists: the built-in ones, and the user's.

A *bank* is ``{classname: [sentence, ...]}`` for one dataset: LLM-style descriptions of how each
class looks in the dataset's modality, as BiomedCoOp, Biomed-DPT and BiomedAP use for their
teacher / anchor text and the zero-shot ensemble. An *attribute list* is BioVLM's: a frame
(``prefix``, ``suffix``) and ten short predicate phrases per class, turned into sentences
"{prefix} {classname} {suffix}, which {attribute}." by :func:`attribute_sentences`.

Built-in files are package data, one per catalog dataset, named by the dataset's resource id
(its key with ``/`` as ``-``)::

    biomedap/resources/descriptions/btmri.json               {class: [sentence, ...]}
    biomedap/resources/attributes/medmnist-pathmnist.json    {"frame": {"prefix", "suffix"},
                                                               "attributes": {class: [phrase, ...]}}

User banks are JSON files, or Python files that define dicts of lists (such as the published
``trainers/prompt_templates.py``). Python files are **parsed as data, never executed**: only
top-level ``NAME = {...}`` assignments of literal values are accepted (:func:`load_external_bank`).
"""

from __future__ import annotations

import ast
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Union

from ..data.catalog import DatasetSpec, get_dataset_spec, list_all_datasets

__all__ = [
    "AmbiguousBankError",
    "AttributeFrame",
    "BankError",
    "BankFormatError",
    "BankMatch",
    "MissingBankError",
    "attribute_sentences",
    "check_against",
    "find_bank",
    "list_banks",
    "load_attributes",
    "load_bank",
    "load_bank_file",
    "load_external_bank",
    "require_bank",
    "resolve_descriptions",
    "skeleton_bank",
]

Bank = dict[str, list[str]]
ResourceKind = Literal["descriptions", "attributes"]
INIT_HINT = ("`biomedap prompts init --data DIR` writes a skeleton bank.json with one entry per class of your "
             "dataset; fill in descriptions (docs/prompts.md says how) and pass that file instead")


class BankError(ValueError):
    """Base class of the errors of this module (a ``ValueError``: bad input, not a bug)."""


class MissingBankError(BankError):
    """No built-in bank (or attribute list) exists for a dataset or a set of class names."""


class AmbiguousBankError(BankError):
    """Several built-in banks cover the given class names; the dataset must be named."""


class BankFormatError(BankError):
    """A bank file is not structured as ``{classname: [sentence, ...]}`` or is not pure data."""


# ------------------------------------------------------------------------------------ built-in


def _resource(kind: ResourceKind, spec: DatasetSpec):
    """The package-data file of ``spec``'s bank or attribute list (a Traversable; may not exist)."""
    return resources.files("biomedap").joinpath("resources", kind, f"{spec.resource_id}.json")


def _read_resource(kind: ResourceKind, spec: DatasetSpec) -> object:
    resource = _resource(kind, spec)
    where = f"biomedap/resources/{kind}/{spec.resource_id}.json"
    if not resource.is_file():
        available = ", ".join(list_banks(kind)) or "none"
        what = "description bank" if kind == "descriptions" else "attribute list"
        raise MissingBankError(
            f"No built-in {what} for {spec.name} ({spec.key}): {where} does not exist. "
            f"Built-in {kind} exist for: {available}. For other data, {INIT_HINT}."
        )
    try:
        return json.loads(resource.read_text(encoding="utf-8"))
    except ValueError as err:
        raise BankFormatError(f"{where} is not valid JSON: {err}") from None


def list_banks(kind: ResourceKind = "descriptions") -> list[str]:
    """Keys of the catalog datasets that have a built-in description bank (or attribute list), in catalog order."""
    if kind not in ("descriptions", "attributes"):
        raise ValueError(f"kind must be 'descriptions' or 'attributes', got {kind!r}")
    return [spec.key for spec in list_all_datasets() if _resource(kind, spec).is_file()]


def load_bank(dataset: str | DatasetSpec) -> Bank:
    """The built-in description bank of a catalog dataset (name, key or spec), in label order.

    Classes are ordered as the dataset's labels, not as the file lists them (BioVLM stacked
    descriptions in file order, which silently mismatched five datasets); entries for other
    class names follow. The result is a fresh dict that the caller may modify.

    Raises:
        UnknownDatasetError: not a catalog dataset.
        MissingBankError: no bank file for it; the message lists the datasets that have one.
        BankFormatError: the file is not ``{classname: [sentence, ...]}``.
    """
    spec = get_dataset_spec(dataset)
    data = _read_resource("descriptions", spec)
    bank = _as_bank(data, f"biomedap/resources/descriptions/{spec.resource_id}.json")
    return _in_label_order(bank, spec.classnames)


def _in_label_order(bank: Mapping[str, list[str]], classnames: Sequence[str]) -> Bank:
    ordered = {name: list(bank[name]) for name in classnames if name in bank}
    ordered.update({name: list(texts) for name, texts in bank.items() if name not in ordered})
    return ordered


def find_bank(classnames: Sequence[str], dataset: str | DatasetSpec | None = None) -> str | None:
    """The key of the built-in bank that covers every name in ``classnames``, or ``None``.

    For methods that are given only class names. Names must match exactly (the split files'
    spelling). A bank whose classes equal ``classnames`` wins over banks that merely contain
    them (a base-to-novel half is covered by its dataset's bank). ``dataset`` restricts the
    search to that dataset's bank.

    Raises:
        AmbiguousBankError: several banks cover the names equally well (e.g. the three MedMNIST+
            Organ datasets share their class names); the message lists them: pass ``dataset``.
    """
    wanted = list(dict.fromkeys(classnames))
    if not wanted:
        raise BankError("find_bank: no class names given")
    if dataset is not None:
        spec = get_dataset_spec(dataset)
        specs: Sequence[DatasetSpec] = [spec] if _resource("descriptions", spec).is_file() else []
    else:
        specs = [spec for spec in list_all_datasets() if _resource("descriptions", spec).is_file()]
    # The catalog's class list stands for the file's (the bank tests hold them equal), so no file
    # is parsed to answer the question.
    covering = [spec for spec in specs if set(wanted) <= set(spec.classnames)]
    exact = [spec for spec in covering if set(spec.classnames) == set(wanted)]
    best = exact or covering
    if not best:
        return None
    if len(best) > 1:
        names = ", ".join(spec.key for spec in best)
        raise AmbiguousBankError(
            f"The class names {wanted} are covered by several built-in banks ({names}); name the dataset "
            "(dataset=... in the library, descriptions_dataset=... for the zero-shot method)."
        )
    return best[0].key


def require_bank(
    classnames: Sequence[str],
    dataset: str | DatasetSpec | None = None,
    *,
    method: str | None = None,
    limit: int | None = None,
) -> Bank:
    """The built-in descriptions of exactly ``classnames`` (in that order), or a helpful error.

    For methods that need class descriptions (zero-shot ensembles, BiomedCoOp, Biomed-DPT,
    BiomedAP): ``limit`` keeps the first ``limit`` sentences of each class.

    Raises:
        MissingBankError: no built-in bank covers these classes; the message points to
            ``biomedap prompts init --data DIR``.
        AmbiguousBankError: see :func:`find_bank`.
    """
    key = find_bank(classnames, dataset)
    who = f"{method} needs" if method else "This needs"
    if key is None:
        if dataset is None:
            scope = "no built-in bank covers them"
        elif _resource("descriptions", get_dataset_spec(dataset)).is_file():
            scope = f"the built-in bank of {get_dataset_spec(dataset).key} does not cover them"
        else:
            scope = f"{get_dataset_spec(dataset).key} has no built-in bank"
        raise MissingBankError(
            f"{who} class descriptions for {list(classnames)}, but {scope} (built-in banks: "
            f"{', '.join(list_banks()) or 'none'}; class names must match exactly). For your own data, {INIT_HINT}."
        )
    bank = load_bank(key)
    missing = [name for name in classnames if not bank.get(name)]
    if missing:  # the file disagrees with the catalog: a packaging bug worth a clear message
        raise BankFormatError(f"The built-in bank of {key} has no descriptions for {missing}.")
    return {name: bank[name][:limit] for name in classnames}


BUILTIN = "builtin"


def resolve_descriptions(
    source: str | os.PathLike,
    classnames: Sequence[str],
    *,
    limit: int | None = None,
    method: str | None = None,
) -> Bank:
    """The descriptions of exactly ``classnames`` (in that order) from a bank source.

    ``source`` is what a method's ``descriptions`` option holds:

    * ``"builtin"`` — the built-in bank whose classes cover ``classnames`` (:func:`find_bank`);
    * ``"builtin:<dataset>"`` — the built-in bank of that catalog dataset (needed for the three
      MedMNIST+ Organ datasets, which share their class names);
    * a path to a ``.json`` file, or to a ``.py`` file of dict literals (never executed); append
      ``:NAME`` to pick one bank of a file that defines several (``prompt_templates.py:BIOMEDCOOP_TEMPLATES``).

    ``limit`` keeps the first ``limit`` sentences of each class.

    Raises:
        MissingBankError: no built-in bank covers the classes, or a user bank lacks some of them
            (all missing classes are named, with close spellings the bank has).
        BankFormatError, FileNotFoundError: see :func:`load_external_bank`.
    """
    text = os.fspath(source).strip()
    if text == BUILTIN or text.startswith(BUILTIN + ":"):
        dataset = text[len(BUILTIN) + 1:].strip() or None
        return require_bank(classnames, dataset, method=method, limit=limit)
    bank = load_bank_file(text)
    match = check_against(bank, classnames)
    if not match.ok:
        who = f"{method}: " if method else ""
        raise MissingBankError(f"{who}the bank {text} does not describe every class:\n{match.summary()}")
    return {cls: bank[cls][:limit] for cls in classnames}


# ------------------------------------------------------------------------------------ user banks


def _as_bank(data: object, where: str) -> Bank:
    """``data`` as ``{str: [str, ...]}`` (tuples accepted), or an error naming ``where`` and the class."""
    if not isinstance(data, Mapping):
        raise BankFormatError(f"{where} must map each class name to a list of sentences, got {type(data).__name__}")
    bank: Bank = {}
    for name, texts in data.items():
        if not isinstance(name, str):
            raise BankFormatError(f"{where}: class names must be strings, got {name!r}")
        if not isinstance(texts, (list, tuple)):
            raise BankFormatError(f"{where}: {name!r} must map to a list of sentences, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BankFormatError(f"{where}: {name!r}[{i}] is {type(text).__name__}, not a string")
        bank[name] = list(texts)
    return bank


def _is_bank(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
        for k, v in value.items()
    )


# Node types a literal value may contain; anything else (a call, a name, an attribute, an
# f-string, an operator) is code, and the file is rejected before anything is evaluated.
_LITERAL_NODES = (ast.Constant, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd)
_NODE_NAMES = {
    ast.Call: "a function call", ast.Attribute: "an attribute access", ast.Name: "a variable reference",
    ast.Import: "an import", ast.ImportFrom: "an import", ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition", ast.ClassDef: "a class definition",
    ast.JoinedStr: "an f-string", ast.BinOp: "an operator expression", ast.Subscript: "a subscript",
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.Expr: "an expression statement", ast.If: "an if statement", ast.For: "a loop", ast.While: "a loop",
    ast.With: "a with statement", ast.Try: "a try statement", ast.AugAssign: "an augmented assignment",
    ast.Delete: "a del statement", ast.Global: "a global statement", ast.Assert: "an assert",
}


def _describe(node: ast.AST) -> str:
    return _NODE_NAMES.get(type(node), f"a {type(node).__name__} node")


def _python_literals(path: Path) -> dict[str, object]:
    """Top-level ``NAME = literal`` assignments of a Python file, read with ``ast`` (never executed)."""
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise BankFormatError(f"{path}:{err.lineno}: not valid Python ({err.msg}); "
                              "a bank file must be JSON or Python dict literals") from None
    rule = ("a Python bank file may only contain top-level NAME = {...} assignments of literal dicts, lists and "
            "strings (it is read as data, never executed); remove that line or save the bank as JSON")
    values: dict[str, object] = {}
    for index, statement in enumerate(tree.body):
        if (index == 0 and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str)):
            continue  # the module docstring
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            target, value = statement.targets[0].id, statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            target, value = statement.target.id, statement.value
        else:
            raise BankFormatError(f"{path}:{statement.lineno}: found {_describe(statement)}; {rule}")
        for node in ast.walk(value):
            if not isinstance(node, _LITERAL_NODES):
                line = getattr(node, "lineno", statement.lineno)
                raise BankFormatError(f"{path}:{line}: the value of {target} contains {_describe(node)}; {rule}")
        try:
            values[target] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
            raise BankFormatError(f"{path}:{statement.lineno}: the value of {target} is not a literal ({err}); "
                                  f"{rule}") from None
    return values


def load_bank_file(spec: str | os.PathLike) -> Bank:
    """A user bank named as on the command line: ``PATH`` or ``PATH:NAME`` (one bank of a file defining several).

    The ``:NAME`` suffix is read as a bank name only when it is an identifier and ``PATH:NAME`` is not
    itself an existing file; see :func:`load_external_bank`.
    """
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and tail.isidentifier() and not Path(os.path.expanduser(text)).exists():
        return load_external_bank(head, tail)
    return load_external_bank(text)


def load_external_bank(path: str | os.PathLike, name: str | None = None) -> Bank:
    """A user bank from a JSON file or a Python file of dict literals.

    * ``.json``: ``{classname: [sentence, ...]}``; or an object of several such banks, one of
      which ``name`` picks.
    * ``.py``: the file is parsed with :mod:`ast` and **never executed**. Only top-level
      ``NAME = {...}`` assignments (and a docstring) are allowed, with values that
      :func:`ast.literal_eval` accepts; a function call, import, attribute access or any other
      statement is rejected with an error that names its line. ``name`` picks one dict when the
      file defines several banks (e.g. ``"BIOMEDCOOP_TEMPLATES"`` in the published
      ``prompt_templates.py``).

    Raises:
        FileNotFoundError: no such file.
        BankFormatError: not a bank, not pure data, or ``name`` missing / unknown.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(f"bank file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise BankFormatError(f"{path} is not valid JSON: {err}") from None
        looks_like_one_bank = isinstance(data, Mapping) and all(isinstance(v, (list, tuple)) for v in data.values())
        if (name is None and looks_like_one_bank) or not isinstance(data, Mapping):
            return _as_bank(data, str(path))
        candidates = {key: value for key, value in data.items() if _is_bank(value)}
    elif suffix == ".py":
        candidates = {key: value for key, value in _python_literals(path).items() if _is_bank(value)}
    else:
        raise BankFormatError(f"{path}: a bank file must be .json or .py (Python dict literals), not {suffix or 'no suffix'!r}")
    if name is not None:
        if name not in candidates:
            raise BankFormatError(f"{path} defines no bank named {name!r}; its banks (dicts of lists of strings): "
                                  f"{sorted(candidates) or 'none'}")
        return _as_bank(candidates[name], f"{path} ({name})")
    if len(candidates) == 1:
        only = next(iter(candidates))
        return _as_bank(candidates[only], f"{path} ({only})")
    if not candidates:
        raise BankFormatError(f"{path} defines no bank: expected a dict mapping class names to lists of sentences")
    raise BankFormatError(f"{path} defines several banks ({', '.join(sorted(candidates))}); pick one with name=... "
                          "(--name on the command line)")


@dataclass
class BankMatch:
    """How a bank's classes compare with a dataset's: see :func:`check_against`."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    suggestions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every class has at least one sentence (extra entries are allowed)."""
        return not self.missing and not self.empty

    def summary(self) -> str:
        if self.ok and not self.extra:
            return "every class has descriptions"
        lines = []
        for name in self.missing:
            near = self.suggestions.get(name)
            lines.append(f"missing class {name!r}" + (f" (the bank has {near!r}: spelling must match)" if near else ""))
        lines += [f"class {name!r} has no sentences" for name in self.empty]
        if self.extra:
            lines.append(f"{len(self.extra)} bank entr{'y is' if len(self.extra) == 1 else 'ies are'} not classes of "
                         f"the dataset (ignored): {self.extra[:10]}{' …' if len(self.extra) > 10 else ''}")
        return "\n".join(lines)


def check_against(bank: Mapping[str, Sequence[str]], classnames: Sequence[str]) -> BankMatch:
    """Which of ``classnames`` the bank lacks (with close spellings it has), which it has in excess."""
    match = BankMatch()
    lowered = {key.lower(): key for key in bank}
    for name in classnames:
        if name not in bank:
            match.missing.append(name)
            near = lowered.get(name.lower()) or next(iter(difflib.get_close_matches(name, list(bank), n=1, cutoff=0.8)), None)
            if near:
                match.suggestions[name] = near
        elif not bank[name]:
            match.empty.append(name)
    wanted = set(classnames)
    match.extra = [key for key in bank if key not in wanted]
    return match


def skeleton_bank(classnames: Sequence[str]) -> Bank:
    """``{classname: []}`` for each class, in order: the starting point of a bank for custom data."""
    return {name: [] for name in dict.fromkeys(classnames)}


# ------------------------------------------------------------------------------------ attributes


@dataclass(frozen=True)
class AttributeFrame:
    """BioVLM's descriptor frame: ``"{prefix} {classname} {suffix}, which {attribute}."``."""

    prefix: str
    suffix: str = ""

    def sentence(self, classname: str, attribute: str) -> str:
        head = " ".join(part.strip() for part in (self.prefix, classname, self.suffix) if part and part.strip())
        return f"{head}, which {attribute.strip().rstrip('.')}."


def load_attributes(dataset: str | DatasetSpec) -> tuple[AttributeFrame, Bank]:
    """The built-in attribute list of a catalog dataset: its frame and ``{class: [phrase, ...]}`` in label order.

    Raises:
        MissingBankError: no attribute file for this dataset.
        BankFormatError: the file lacks ``frame`` / ``attributes`` or has the wrong types.
    """
    spec = get_dataset_spec(dataset)
    where = f"biomedap/resources/attributes/{spec.resource_id}.json"
    data = _read_resource("attributes", spec)
    if not isinstance(data, Mapping) or "attributes" not in data or "frame" not in data:
        raise BankFormatError(f"{where} must hold {{\"frame\": {{\"prefix\", \"suffix\"}}, \"attributes\": {{...}}}}")
    return _as_frame(data["frame"], where), _in_label_order(_as_bank(data["attributes"], where), spec.classnames)


def _as_frame(frame: object, where: str) -> AttributeFrame:
    if isinstance(frame, AttributeFrame):
        return frame
    if isinstance(frame, Mapping) and isinstance(frame.get("prefix"), str) and isinstance(frame.get("suffix", ""), str):
        return AttributeFrame(frame["prefix"], frame.get("suffix", ""))
    raise BankFormatError(f"{where}: frame must be {{\"prefix\": str, \"suffix\": str}}, got {frame!r}")


AttributeSource = Union[str, DatasetSpec, tuple]


def attribute_sentences(source: AttributeSource, classname: str) -> list[str]:
    """The attribute sentences of one class: ``"{prefix} {classname} {suffix}, which {attribute}."``.

    ``source`` is a catalog dataset (its built-in attribute list is loaded) or a ``(frame, table)``
    pair as :func:`load_attributes` returns (``frame`` may also be a ``{"prefix", "suffix"}`` dict).

    Raises:
        KeyError: ``classname`` has no attributes; the message lists the classes that do.
    """
    if isinstance(source, tuple):
        frame, table = source
        frame = _as_frame(frame, "attribute frame")
    else:
        frame, table = load_attributes(source)
    if classname not in table:
        raise KeyError(f"no attributes for class {classname!r}; classes with attributes: {list(table)}")
    return [frame.sentence(classname, attribute) for attribute in table[classname]]
