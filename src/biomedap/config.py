"""Typed configuration: dataclasses, their coercion from dicts and strings, presets and overrides.

Every option lives in a dataclass field with a default and ``metadata={"help": ...}`` (PEFT style);
methods define their own ``Config`` dataclass in their file, the run-level options are
:class:`RunConfig` (with :class:`OptimConfig` and :class:`DataConfig` nested in it).

A run's options are resolved from four sources, each overriding the previous one::

    dataclass defaults  <  presets/<method>.yaml (+ its per-dataset table)
                        <  --config FILE.yaml  <  --set key=value

The machinery is generic and works for any dataclass: :func:`config_from_dict` builds an instance
from a partial, possibly string-valued dict (YAML files, ``--set`` items), coercing each value to
its annotated type and failing with the full dotted key, the expected type and a "did you mean"
suggestion. Importing this module stays light (standard library + PyYAML, no torch) so that a CLI
can print help and validate configs instantly.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "RUN_ALIASES",
    "RunConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "format_config_help",
    "list_presets",
    "load_preset",
    "load_yaml",
    "lr_at",
    "merge_dicts",
    "parse_set_overrides",
    "resolve_run_config",
]

T = TypeVar("T")

# Dotted prefixes that ``--set`` and config files may use as shorthands: ``method.n_ctx=8`` is
# ``method_config.n_ctx=8`` (``method`` itself is the method's name, a string).
RUN_ALIASES: Mapping[str, str] = types.MappingProxyType({"method": "method_config"})

_TRUE = frozenset({"true", "yes", "y", "on", "1", "t"})
_FALSE = frozenset({"false", "no", "n", "off", "0", "f"})
_NONE = frozenset({"none", "null", "~", ""})


class ConfigError(ValueError):
    """An invalid configuration: unknown option, wrong type or value, unreadable file or preset."""


# --------------------------------------------------------------------------------------------------
# Type introspection and coercion
# --------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields.

    ``typing.get_type_hints`` resolves the string annotations of ``from __future__ import
    annotations`` modules. When one name cannot be resolved (imported only under TYPE_CHECKING),
    resolve field by field and treat the unresolvable ones as ``Any`` (no coercion) rather than fail.
    """
    try:
        return typing.get_type_hints(cls)
    except Exception:  # NameError, TypeError on exotic annotations: fall back per field below
        pass
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        namespace = dict(vars(module)) if module is not None else {}
        namespace.setdefault("typing", typing)
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            if isinstance(annotation, str):
                try:
                    # Only the class's own annotation strings are evaluated, as get_type_hints does.
                    annotation = eval(annotation, namespace, dict(vars(klass)))  # noqa: S307
                except Exception:
                    annotation = Any
            hints[name] = annotation
    return hints


def _init_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """Fields that can be set from a config (``init=False`` fields are derived, not options)."""
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _type_name(tp: Any) -> str:
    """Short human-readable name of a type annotation, for errors and help tables."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin is not None:
        args = typing.get_args(tp)
        base = getattr(origin, "__name__", str(origin))
        if origin in (dict, collections.abc.Mapping) or not args:
            return base
        parts = ["..." if a is Ellipsis else _type_name(a) for a in args]
        return f"{base}[{', '.join(parts)}]"
    return getattr(tp, "__name__", str(tp))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_error(where: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where or 'value'}: expected {_type_name(tp)}, got {_short_repr(value)}")


def _split_sequence_string(text: str) -> list[Any]:
    """Items of a command-line list: ``"[5, 8]"``, ``"(0.9, 0.99)"``, ``"5,8"`` or a single item."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "[(" and text[-1] in "])":
        inner = text[1:-1]
        try:
            parsed = yaml.safe_load("[" + inner + "]")
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
        text = inner
    if "," in text:
        return [part.strip() for part in text.split(",")]
    return [text]


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a :class:`ConfigError` naming ``where``.

    Strings are accepted for every scalar type because ``--set`` values and YAML 1.1 scalars such as
    ``1e-3`` (read by PyYAML as a string: YAML 1.1 floats need a dot) arrive as text.
    """
    if tp is Any or tp is object or isinstance(tp, TypeVar):
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        raise _type_error(where, tp, value)
    if _is_union(tp):
        return _coerce_union(tp, value, where)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return _coerce_literal(tp, args, value, where)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is None or isinstance(value, Mapping):
            return config_from_dict(tp, value or {}, where=where)
        raise _type_error(where, tp, value)
    if tp is bool:
        return _coerce_bool(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        # Numbers are accepted as names (a dataset called "2018" reads as an int from YAML);
        # booleans and None are not, they are almost always a mistake.
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(where, tp, value)
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, (str, Path)):
            return tp(value)
        raise _type_error(where, tp, value)
    if origin in (tuple, list, set, frozenset, collections.abc.Sequence) or tp in (tuple, list):
        return _coerce_sequence(tp, origin or tp, args, value, where)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        return _coerce_mapping(tp, args, value, where)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(where, tp, value)
    return value  # an annotation we do not understand (Callable, Protocol, ...): leave it alone


def _coerce_union(tp: Any, value: Any, where: str) -> Any:
    members = typing.get_args(tp)
    allows_none = type(None) in members
    others = [m for m in members if m is not type(None)]
    if value is None:
        if allows_none:
            return None
        raise _type_error(where, tp, value)
    if allows_none and isinstance(value, str) and value.strip().lower() in _NONE:
        # A literal member spelled "none" (e.g. augment="none") wins over null.
        for member in others:
            if typing.get_origin(member) is Literal and value in typing.get_args(member):
                return value
        return None
    # Keep a value that already has one of the plain member types (str | int given 5 stays 5).
    for member in others:
        if isinstance(member, type) and type(value) is member:
            return value
    if len(others) == 1:  # the common ``X | None``: report X's own, more precise error
        return _coerce(others[0], value, where)
    for member in others:
        try:
            return _coerce(member, value, where)
        except ConfigError:
            continue
    raise _type_error(where, tp, value)


def _coerce_literal(tp: Any, allowed: tuple, value: Any, where: str) -> Any:
    for choice in allowed:
        # ``True == 1`` in Python: require the same type so that Literal[1] does not accept True.
        if type(choice) is type(value) and choice == value:
            return choice
    if isinstance(value, str):
        text = value.strip()
        string_matches = [c for c in allowed if isinstance(c, str) and c.lower() == text.lower()]
        if len(string_matches) == 1:
            return string_matches[0]
        for choice in allowed:
            if not isinstance(choice, str) and str(choice) == text:
                return choice
    choices = ", ".join(repr(c) for c in allowed)
    raise ConfigError(f"{where or 'value'}: expected one of {choices}, got {_short_repr(value)}")


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _type_error(where, bool, value)


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass, but epochs=true is a mistake
        raise _type_error(where, int, value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:  # "1e3" is a common way to write 1000
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise _type_error(where, int, value)


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise _type_error(where, float, value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _type_error(where, float, value)


def _coerce_sequence(tp: Any, container: Any, args: tuple, value: Any, where: str) -> Any:
    if isinstance(value, str):
        items = _split_sequence_string(value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif value is not None and not isinstance(value, Mapping):
        items = [value]  # a lone scalar for a list option: epochs=5 for tuple[int, ...] -> (5,)
    else:
        raise _type_error(where, tp, value)

    if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):  # fixed-length tuple such as tuple[float, float]
            raise ConfigError(
                f"{where or 'value'}: expected {_type_name(tp)} ({len(args)} items), got {_short_repr(value)}"
            )
        return tuple(_coerce(a, item, f"{where}[{i}]") for i, (a, item) in enumerate(zip(args, items)))
    element = args[0] if args else Any
    coerced = [_coerce(element, item, f"{where}[{i}]") for i, item in enumerate(items)]
    if container in (list,):
        return coerced
    if container in (set, frozenset):
        return container(coerced)
    return tuple(coerced)


def _coerce_mapping(tp: Any, args: tuple, value: Any, where: str) -> dict:
    if isinstance(value, str):  # --set method_config="{n_ctx: 8}"
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise _type_error(where, tp, value) from None
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _type_error(where, tp, value)
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    return {
        _coerce(key_type, k, f"{where}.<key>"): _coerce(value_type, copy.deepcopy(v), f"{where}.{k}")
        for k, v in value.items()
    }


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else str(name)


def _prefix_message(where: str, message: str, names: Iterable[str]) -> str:
    """Put the dotted location in front of a validation message from ``__post_init__``.

    Messages are written "<option>: <problem>" (or "<option> must ..."), so "lr: must be > 0" raised
    inside the ``optim`` group becomes "optim.lr: must be > 0".
    """
    if not where:
        return message
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name) and (len(message) == len(name) or not (
                message[len(name)].isalnum() or message[len(name)] == "_")):
            return f"{where}.{message}"
    return f"{where}: {message}"


def _coerce_fields(obj: Any) -> None:
    """Coerce every field of a dataclass instance in place (used by ``__post_init__``).

    This lets ``OptimConfig(lr="1e-3")`` or ``RunConfig(optim={"lr": 0.01})`` work when built in
    code, with the same rules and errors as :func:`config_from_dict`. Works on frozen instances.
    """
    hints = _field_types(type(obj))
    for f in _init_fields(obj):
        value = getattr(obj, f.name)
        coerced = _coerce(hints.get(f.name, Any), value, f.name)
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict
# --------------------------------------------------------------------------------------------------


def _unknown_key_error(key: Any, valid: Sequence[str], where: str, source: str = "") -> ConfigError:
    dotted = _join(where, str(key))
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{_join(where, close[0])}'?" if close else "."
    group = f"'{where}'" if where else "the top level"
    origin = f"{source}: " if source else ""
    return ConfigError(f"{origin}unknown option '{dotted}'{hint} "
                       f"Valid options at {group}: {', '.join(valid)}")


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build a dataclass instance from a possibly partial dict, coercing values to the annotations.

    Missing options keep their defaults; nested dataclass fields are built recursively from nested
    dicts. Strings are converted to the annotated type (``"1e-3"`` → 0.001, ``"true"`` → True,
    ``"none"`` → None for ``X | None``, ``"[5, 8]"`` or ``"5,8"`` → ``(5, 8)``), so ``--set`` values
    and YAML scalars need no special handling by the caller.

    Args:
        cls: the dataclass to build (any dataclass; method ``Config`` classes included).
        data: option name → value; ``None`` is an empty dict. An instance of ``cls`` is returned as-is.
        where: dotted location of ``data`` inside a larger config (``"optim"``,
            ``"coop.method_config"``), used to name keys in errors.

    Raises:
        ConfigError: an unknown key (with the valid keys and the closest match), a value of the wrong
            type (with the expected type and the given value), a missing required option, or a
            value rejected by the dataclass's own ``__post_init__`` validation.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of options, got {_short_repr(data)}")

    fields_ = {f.name: f for f in _init_fields(cls)}
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields_:
            raise _unknown_key_error(key, list(fields_), where)
        kwargs[key] = _coerce(hints.get(key, Any), value, _join(where, key))
    missing = [
        name for name, f in fields_.items()
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required option(s): "
                          + ", ".join(_join(where, m) for m in missing))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(_prefix_message(where, str(exc), fields_)) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(_prefix_message(where, str(exc), fields_)) from exc


def _plain(value: Any) -> Any:
    """A YAML/JSON-serialisable copy: dataclasses → dicts, tuples and sets → lists, paths → strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(value)}
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a dataclass instance (nested ones included).

    Tuples become lists; :func:`config_from_dict` turns them back into tuples, so
    ``config_from_dict(type(c), config_to_dict(c)) == c``.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def merge_dicts(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: values of ``override`` win; nested dicts present in both are merged key by key.

    Lists are replaced, not concatenated. Neither input is modified.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set_overrides(items: Iterable[str], *, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn ``--set`` items into a nested dict.

    ``["optim.lr=0.01", "method_config.fusion_layers=[5,8]"]`` →
    ``{"optim": {"lr": 0.01}, "method_config": {"fusion_layers": [5, 8]}}``. Values are read with
    ``yaml.safe_load`` (numbers, booleans, lists, ``null``; an empty value is ``null``); a value that
    is not valid YAML stays a string. Later items win. Dashes in keys become underscores
    (``optim.batch-size`` = ``optim.batch_size``): option names are Python identifiers.

    Args:
        items: ``key=value`` strings with dotted keys.
        aliases: first-component renames applied to dotted keys, e.g. ``{"method": "method_config"}``
            so that ``method.n_ctx=8`` sets ``method_config.n_ctx`` while ``method=coop`` still sets
            the method name (:func:`resolve_run_config` passes :data:`RUN_ALIASES`).

    Raises:
        ConfigError: an item without ``=``, with an empty key or key part, or a key that both sets a
            value and a sub-option (``optim=1`` with ``optim.lr=0.1``).
    """
    result: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.001")
        key, raw = item.split("=", 1)
        parts = [p.strip().replace("-", "_") for p in key.strip().split(".")]
        if not key.strip() or any(not p for p in parts):
            raise ConfigError(f"--set {item!r}: empty option name; expected key=value, e.g. optim.lr=0.001")
        if aliases and len(parts) > 1 and parts[0] in aliases:
            parts[0] = aliases[parts[0]]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw.strip()  # e.g. a template "a: {}" - keep the text, the field type decides
        node = result
        for depth, part in enumerate(parts[:-1]):
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: '{prefix}' was already set to {existing!r}, "
                                  f"it cannot also have sub-options")
            node = existing
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            node[last] = merge_dicts(node[last], value)
        else:
            node[last] = value
    return result


def _apply_aliases(data: Mapping[str, Any], aliases: Mapping[str, str] = RUN_ALIASES) -> dict[str, Any]:
    """Rewrite alias groups in a config dict: ``{"method": {"n_ctx": 8}}`` → ``{"method_config": ...}``.

    Only mapping values are moved: ``method: coop`` stays the method name.
    """
    out = dict(data)
    for alias, target in aliases.items():
        if isinstance(out.get(alias), Mapping):
            out[target] = merge_dicts(out.get(target) or {}, out.pop(alias))
    return out


def _check_keys(cls: type, data: Mapping[str, Any], where: str, source: str) -> None:
    """Reject unknown keys of one config source, naming the source (file, preset, --set)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping of options, "
                          f"got {_short_repr(data)}")
    fields_ = {f.name: f for f in _init_fields(cls)}
    hints = _field_types(cls)
    for key, value in data.items():
        if key not in fields_:
            raise _unknown_key_error(key, list(fields_), where, source)
        tp = hints.get(key, Any)
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            _check_keys(tp, value, _join(where, key), source)


def _format_default(f: dataclasses.Field, obj: Any = None) -> str:
    if obj is not None:
        value = getattr(obj, f.name)
    elif f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return json.dumps(_plain(value), ensure_ascii=False, default=str)


def describe_config(cls: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows ``(dotted name, type, default, help)`` for every option, nested dataclasses expanded.

    Args:
        cls: a dataclass type (defaults shown) or instance (its current values shown).
        prefix: prepended to every name, e.g. ``"method_config."`` for a method's ``Config``.
    """
    obj = None if isinstance(cls, type) else cls
    klass = cls if isinstance(cls, type) else type(cls)
    if not _is_dataclass_type(klass):
        raise TypeError(f"describe_config needs a dataclass, got {cls!r}")
    hints = _field_types(klass)
    rows: list[tuple[str, str, str, str]] = []
    for f in _init_fields(klass):
        tp = hints.get(f.name, Any)
        name = prefix + f.name
        if _is_dataclass_type(tp):
            nested = getattr(obj, f.name) if obj is not None else tp
            rows.extend(describe_config(nested, prefix=name + "."))
            continue
        rows.append((name, _type_name(tp), _format_default(f, obj), str(f.metadata.get("help", ""))))
    return rows


def format_config_help(cls: Any, prefix: str = "") -> str:
    """:func:`describe_config` as an aligned text table (``--help-config``)."""
    header = ("option", "type", "default", "help")
    rows = [header] + describe_config(cls, prefix)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        lines.append("  ".join(cells + [row[3]]).rstrip())
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is ``{}``).

    Raises:
        ConfigError: the file is missing, is not valid YAML (the message has the line and column),
            or its top level is not a mapping of options.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return _parse_yaml_text(text, str(path))


def _parse_yaml_text(text: str, name: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of options (key: value), "
                          f"got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Run-level configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, learning-rate schedule and batching of one training run.

    Defaults are the Dassl settings of the CoOp family as run on BiomedCLIP: SGD lr 0.002,
    momentum 0.9, weight decay 5e-4, batch 32, 100 epochs, one warm-up epoch at a constant 1e-5,
    then a per-epoch cosine (see :func:`lr_at`).
    """

    optimizer: Literal["sgd", "adamw"] = field(
        default="sgd", metadata={"help": "optimiser: sgd (Dassl methods) | adamw (Tip-Adapter-F)"})
    lr: float = field(default=0.002, metadata={"help": "base learning rate, reached after the warm-up"})
    momentum: float = field(
        default=0.9, metadata={"help": "SGD momentum (no dampening, no Nesterov), in [0, 1)"})
    weight_decay: float = field(
        default=5e-4, metadata={"help": "L2 weight decay (SGD) / decoupled decay (AdamW)"})
    adam_betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2), each in [0, 1)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon (Tip-Adapter-F uses 1e-4)"})
    epochs: int = field(
        default=100, metadata={"help": "number of training epochs (the last epoch is evaluated)"})
    batch_size: int = field(default=32, metadata={"help": "training mini-batch size"})
    schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "learning rate after the warm-up: cosine decay | constant"})
    schedule_step: Literal["epoch", "iteration"] = field(
        default="epoch",
        metadata={"help": "schedule granularity: epoch (Dassl: one value per epoch) | iteration "
                          "(LP++ harness: the same formula over the global iteration index)"})
    warmup_epochs: int = field(
        default=1,
        metadata={"help": "epochs of constant warm-up at warmup_lr before the schedule (0 = none)"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "constant learning rate during the warm-up"})
    warmup_iterations: int | None = field(
        default=None,
        metadata={"help": "schedule_step=iteration only: warm-up length in iterations; null = warmup_epochs × "
                          "iterations per epoch"})
    cosine_period: int | None = field(
        default=None,
        metadata={"help": "period T of the cosine in schedule steps (epochs or iterations); null = the whole run. "
                          "The released CLIP-Adapter used T = 20 iterations whatever the run length"})
    drop_last: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "drop the last partial batch: auto (only when at least one full batch exists, "
                          "as Dassl) | always | never"})
    grad_clip: float | None = field(
        default=None, metadata={"help": "clip the gradient norm to this value; null = no clipping"})

    def __post_init__(self):
        # Coercion also rejects values outside a Literal's choices.
        _coerce_fields(self)
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay: must be ≥ 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas: each beta must be in [0, 1), got {list(self.adam_betas)}")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps: must be > 0, got {self.adam_eps}")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be ≥ 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs: must be in [0, epochs) = [0, {self.epochs}), "
                              f"got {self.warmup_epochs}")
        if not self.warmup_lr >= 0:
            raise ConfigError(f"warmup_lr: must be ≥ 0, got {self.warmup_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
        if self.warmup_iterations is not None and self.warmup_iterations < 0:
            raise ConfigError(f"warmup_iterations: must be ≥ 0 or null, got {self.warmup_iterations}")
        if self.cosine_period is not None and self.cosine_period < 1:
            raise ConfigError(f"cosine_period: must be ≥ 1 or null, got {self.cosine_period}")


def lr_at(optim: OptimConfig, epoch: int, step_in_epoch: int = 0, steps_per_epoch: int = 1) -> float:
    """Learning rate of one optimisation step, exactly as the published schedules.

    ``schedule_step="epoch"`` (Dassl: ``ConstantWarmupScheduler`` around ``CosineAnnealingLR`` with
    ``T_max = max_epoch``, stepped after each epoch)::

        e < W:   warmup_lr
        e >= W:  lr · ½ · (1 + cos(π · (e − W) / E))        E = epochs, W = warmup_epochs

    The cosine runs over E, not E − W, so the first post-warm-up epoch has the full lr and the last
    epoch's lr never reaches 0 (Dassl's wrapper shifts the cosine by the warm-up); reproduced as is.
    ``step_in_epoch`` is ignored.

    ``schedule_step="iteration"``: the same formula on the global iteration index
    ``t = epoch · steps_per_epoch + step_in_epoch`` with ``T = epochs · steps_per_epoch`` and a
    warm-up of ``warmup_epochs · steps_per_epoch`` iterations (with ``warmup_epochs=0`` this is
    PyTorch's ``CosineAnnealingLR`` over all iterations, as Tip-Adapter-F).

    ``warmup_iterations`` (iteration mode) replaces the warm-up length, and ``cosine_period`` the
    period T; past T the cosine keeps going (it rises again), as PyTorch's ``CosineAnnealingLR`` does.

    ``schedule="constant"``: ``lr`` after the warm-up.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be ≥ 0, got {epoch}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
    if not 0 <= step_in_epoch < steps_per_epoch:
        raise ValueError(f"step_in_epoch must be in [0, {steps_per_epoch}), got {step_in_epoch}")
    if optim.schedule_step == "iteration":
        t = epoch * steps_per_epoch + step_in_epoch
        warmup = (optim.warmup_epochs * steps_per_epoch if optim.warmup_iterations is None
                  else optim.warmup_iterations)
        total = optim.epochs * steps_per_epoch
    else:
        t, warmup, total = epoch, optim.warmup_epochs, optim.epochs
    if optim.cosine_period is not None:
        total = optim.cosine_period
    if t < warmup:
        return optim.warmup_lr
    if optim.schedule == "constant":
        return optim.lr
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / total))


_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataConfig:
    """Which data a run uses and how training images are sampled and augmented."""

    dataset: str = field(
        default="",
        metadata={"help": "catalog name or key (BTMRI / btmri), an image folder or a CSV of path,label"})
    root: str | None = field(
        default=None, metadata={"help": "data root holding the catalog datasets (ROOT/<NAME>/...)"})
    shots: int = field(default=16, metadata={"help": "training images per class (K); val gets min(K, 4)"})
    split_seed: int | None = field(
        default=None,
        metadata={"help": "seed of the few-shot sampling; null = the run seed (some published baselines "
                          "reused one split for all seeds)"})
    augment: Literal["dassl", "lp", "none"] = field(
        default="dassl",
        metadata={"help": "training augmentation: dassl (RandomResizedCrop scale (0.08, 1), no flip) | "
                          "lp (scale (0.5, 1) + horizontal flip) | none (the eval transform)"})
    views: int | None = field(
        default=None,
        metadata={"help": "null = a fresh augmented view per epoch (faithful); N = a fixed pool of N "
                          "views cycled over the epochs (faster, an approximation)"})
    subsample: Literal["all", "base", "novel"] = field(
        default="all", metadata={"help": "classes used: all | base (first half) | novel (second half)"})
    eval_splits: tuple[str, ...] = field(
        default=("test",), metadata={"help": "splits evaluated after training: any of train, val, test"})
    num_workers: int = field(default=0, metadata={"help": "image-loading worker processes (0 = in process)"})

    def __post_init__(self):
        # Coercion also rejects values outside a Literal's choices.
        _coerce_fields(self)
        if self.shots < 1:
            raise ConfigError(f"shots: must be ≥ 1, got {self.shots}")
        if self.split_seed is not None and self.split_seed < 0:
            raise ConfigError(f"split_seed: must be ≥ 0 or null, got {self.split_seed}")
        if self.views is not None and self.views < 1:
            raise ConfigError(f"views: must be ≥ 1 or null (a fresh view per epoch), got {self.views}")
        if not self.eval_splits:
            raise ConfigError(f"eval_splits: give at least one of {', '.join(_SPLITS)}")
        for split in self.eval_splits:
            if split not in _SPLITS:
                raise ConfigError(f"eval_splits: unknown split {split!r}; "
                                  f"expected any of {', '.join(_SPLITS)}")
        if len(set(self.eval_splits)) != len(self.eval_splits):
            raise ConfigError(f"eval_splits: a split is listed twice: {list(self.eval_splits)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be ≥ 0, got {self.num_workers}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run: method and its options, optimisation, data, seed, backbone.

    ``method_config`` stays a plain dict here: it is validated by the method's own ``Config``
    dataclass when the method is built (that class lives with the method, and importing it would
    import torch).
    """

    method: str = field(default="coop", metadata={"help": "method name (see `biomedap list`)"})
    method_config: dict[str, Any] = field(
        default_factory=dict,
        hash=False,  # a dict is unhashable; the rest of the frozen config still hashes
        metadata={"help": "options of the method's own Config (set as method.<option>=value)"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimisation"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    seed: int = field(default=1, metadata={"help": "run seed (initialisation, batch order, augmentation)"})
    backbone: str = field(
        default="biomedclip",
        metadata={"help": "biomedclip | hf-hub:ORG/REPO | local-dir:PATH | tiny[:SEED] | random-biomedclip[:SEED] "
                          "(see docs/backbones.md)"})
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda[:N]"})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16"})
    output_dir: str = field(default="runs", metadata={"help": "directory that receives the run directories"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "feature cache directory; null = the default cache location"})
    eval_batch_size: int = field(default=100, metadata={"help": "batch size of evaluation passes"})

    def __post_init__(self):
        # Coercion also rejects values outside a Literal's choices.
        _coerce_fields(self)
        if not self.method.strip():
            raise ConfigError("method: must not be empty")
        if not self.backbone.strip():
            raise ConfigError("backbone: must not be empty")
        if not self.device.strip():
            raise ConfigError("device: must not be empty (use auto, cpu or cuda)")
        if self.seed < 0:
            raise ConfigError(f"seed: must be ≥ 0, got {self.seed}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be ≥ 1, got {self.eval_batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-serialisable); :meth:`from_dict` inverts it."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a (partial) dict; ``method: {...}`` is accepted for ``method_config: {...}``."""
        return config_from_dict(cls, _apply_aliases(data or {}))


# --------------------------------------------------------------------------------------------------
# Presets and resolution
# --------------------------------------------------------------------------------------------------


def _presets_root(presets_dir: Path | str | None):
    # importlib.resources works from a wheel, a zip or an editable install alike.
    return Path(presets_dir) if presets_dir is not None else resources.files("biomedap") / "presets"


def _normalize_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def list_presets(presets_dir: Path | str | None = None) -> list[str]:
    """Names of the available method presets (``<name>.yaml`` files), sorted."""
    root = _presets_root(presets_dir)
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[: -len(".yaml")] for e in entries if e.name.endswith(".yaml") and e.is_file())


def _find_preset(method: str, presets_dir: Path | str | None):
    """``(file, canonical name)`` of a method's preset; names match ignoring case, '-' and '_'."""
    root = _presets_root(presets_dir)
    available = list_presets(presets_dir)
    wanted = _normalize_name(method)
    for name in available:
        if _normalize_name(name) == wanted:
            return root / f"{name}.yaml", name
    close = difflib.get_close_matches(str(method).lower(), available, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"no preset for method {method!r} in {root}; available presets: "
                      f"{', '.join(available) or '(none)'}.{hint}")


def _dataset_entries(table: Mapping[str, Any], dataset: str) -> list[str]:
    """Keys of a preset's ``datasets`` table that apply to ``dataset``, compared case-insensitively.

    A dataset may be given by catalog key (``covid``), catalog name (``COVID_19``) or as a path whose
    last component is one of them; the table may use either spelling.
    """
    text = str(dataset).strip()
    path = Path(text)
    lowered = text.lower()
    if lowered.startswith(("medmnist/", "medmnist-")):
        # A MedMNIST+ catalog key, not a path: "medmnist/octmnist" must not pick up the benchmark's
        # "octmnist" entry through its last component.
        names = {lowered, lowered.replace("/", "-", 1), lowered.replace("-", "/", 1)}
    else:
        names = {lowered, path.name.lower(), path.stem.lower()} - {""}
    keys = [k for k in table if str(k).strip().lower() in names]
    if keys or not table:
        return keys
    # No direct match: the name may be the other spelling of a catalog entry (COVID_19 <-> covid).
    # Imported here: the data package imports torch, which `import biomedap.config` must not.
    try:
        from .data.catalog import get_dataset_spec
    except ImportError:
        return []
    for candidate in (text,) if lowered.startswith("medmnist") else (text, path.name):
        try:
            spec = get_dataset_spec(candidate)
        except (LookupError, ValueError):
            continue  # not a catalog dataset (a folder or a CSV): only its own name can match
        names.update({spec.name.lower(), spec.key.lower()})
    return [k for k in table if str(k).strip().lower() in names]


PROTOCOL_TABLES = ("base2novel",)


def load_preset(
    method: str,
    dataset: str | None = None,
    presets_dir: Path | str | None = None,
    variant: str | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    """A method's preset as a config dict, with its protocol, variant and per-dataset overrides applied.

    Reads ``presets/<method>.yaml`` (package data, or ``presets_dir``). The ``protocols`` table, if
    any, is removed and the entry named ``protocol`` (``"base2novel"``: chosen when the run trains
    on the base classes, ``data.subsample: base``) deep-merged on top; if that entry has a
    ``datasets`` table of its own, it replaces the preset's (published base-to-novel settings are a
    table of their own, not edits of the few-shot one). Then the ``variants`` table is removed and
    the entry named ``variant`` deep-merged on top (a variant such as ``released`` changes the
    optimiser or protocol along with the method's options); then the ``datasets`` table is removed
    and the entry matching ``dataset`` (case-insensitively, by catalog name or key, or a folder's
    name) is deep-merged on top of the rest.

    Raises:
        ConfigError: no preset for ``method`` (the message lists the available ones), invalid YAML,
            a malformed ``datasets`` or ``variants`` table.
    """
    entry, _ = _find_preset(method, presets_dir)
    data = _apply_aliases(_parse_yaml_text(entry.read_text(encoding="utf-8"), f"preset {entry}"))
    protocols = data.pop("protocols", None) or {}
    if not isinstance(protocols, Mapping) or set(protocols) - set(PROTOCOL_TABLES):
        raise ConfigError(f"preset {entry}: 'protocols' must map protocol names {list(PROTOCOL_TABLES)} to "
                          f"overrides, got {_short_repr(protocols)}")
    if protocol is not None and protocols.get(protocol):
        overrides = dict(protocols[protocol])
        if "datasets" in overrides:
            data["datasets"] = overrides.pop("datasets")
        data = merge_dicts(data, _apply_aliases(overrides))
    variants = data.pop("variants", None) or {}
    if not isinstance(variants, Mapping):
        raise ConfigError(f"preset {entry}: 'variants' must map variant names to overrides, "
                          f"got {_short_repr(variants)}")
    if variant is not None and variant in variants:
        overrides = variants[variant] or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"preset {entry}: variants.{variant} must be a mapping of options, "
                              f"got {_short_repr(overrides)}")
        data = merge_dicts(data, _apply_aliases(overrides))
        data = merge_dicts(data, {"method_config": {"variant": variant}})
    table = data.pop("datasets", None) or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"preset {entry}: 'datasets' must map dataset keys to overrides, "
                          f"got {_short_repr(table)}")
    for key in _dataset_entries(table, dataset) if dataset else []:
        overrides = table[key] or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"preset {entry}: datasets.{key} must be a mapping of options, "
                              f"got {_short_repr(overrides)}")
        data = merge_dicts(data, _apply_aliases(overrides))
    return data


def _variant_of(source: Mapping[str, Any]) -> str | None:
    method_config = source.get("method_config")
    if isinstance(method_config, Mapping) and method_config.get("variant") not in (None, ""):
        return str(method_config["variant"])
    return None


def _subsample_of(source: Mapping[str, Any]) -> str | None:
    data = source.get("data")
    if isinstance(data, Mapping) and data.get("subsample") not in (None, ""):
        return str(data["subsample"])
    return None


def _dataset_of(source: Mapping[str, Any]) -> str | None:
    data = source.get("data")
    if isinstance(data, Mapping) and data.get("dataset") not in (None, ""):
        return str(data["dataset"])
    return None


def resolve_run_config(
    method: str | None,
    *,
    dataset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    presets_dir: Path | str | None = None,
) -> RunConfig:
    """Resolve a run's configuration from all its sources, later ones winning::

        RunConfig defaults < preset (+ its protocol, + its variant, + its datasets entry) < base
        < config_file < dataset < overrides

    The preset's ``protocols.base2novel`` entry applies when a source sets ``data.subsample: base``
    (training on the base classes is the base-to-novel protocol).

    The dataset that selects the preset's per-dataset entry, and the ``method_config.variant``
    that selects its variant entry, are known only after reading the later sources (they may come
    from ``--config`` or ``--set``), so they are looked up there first; then the preset is applied
    underneath them.

    Args:
        method: method name; picks ``presets/<method>.yaml``. ``None`` = the ``method`` set by the
            sources (else ``"coop"``). A source naming a different method is an error.
        dataset: shorthand for ``data.dataset`` (a ``--dataset`` flag); ``--set`` still wins.
        config_file: a YAML file with any subset of the :class:`RunConfig` options.
        overrides: ``--set`` items, e.g. ``["optim.lr=0.01", "method.n_ctx=8"]``.
        base: a dict of options from code (a sweep's run spec), between the preset and the file.
        presets_dir: a folder of preset files instead of the packaged ones.

    Raises:
        ConfigError: unknown options (naming the source), invalid values, a missing preset.
    """
    sources: list[tuple[str, dict[str, Any]]] = []
    if base:
        sources.append(("base config", _apply_aliases(base)))
    if config_file is not None:
        sources.append((f"config file {config_file}", _apply_aliases(load_yaml(config_file))))
    if dataset:
        sources.append(("dataset argument", {"data": {"dataset": dataset}}))
    if overrides:
        sources.append(("--set", parse_set_overrides(overrides, aliases=RUN_ALIASES)))
    for name, source in sources:
        _check_keys(RunConfig, source, "", name)

    # The method: the explicit argument, unless a source names another one (ambiguous: refuse).
    named = [(name, str(src["method"])) for name, src in sources if src.get("method") not in (None, "")]
    if method is None:
        method = named[-1][1] if named else RunConfig.method
    for name, other in named:
        if _normalize_name(other) != _normalize_name(method):
            raise ConfigError(f"method: {name} sets {other!r} but the run is for {method!r}; "
                              f"drop one of them")
    _, method = _find_preset(method, presets_dir)  # canonical spelling: the preset's file name

    chosen_dataset = chosen_variant = chosen_subsample = None
    for _, source in sources:
        chosen_dataset = _dataset_of(source) or chosen_dataset
        chosen_variant = _variant_of(source) or chosen_variant
        chosen_subsample = _subsample_of(source) or chosen_subsample
    protocol = "base2novel" if chosen_subsample == "base" else None
    preset = load_preset(method, chosen_dataset, presets_dir, variant=chosen_variant, protocol=protocol)
    _check_keys(RunConfig, preset, "", f"preset {method}")

    merged: dict[str, Any] = preset
    for _, source in sources:
        merged = merge_dicts(merged, source)
    merged["method"] = method
    return RunConfig.from_dict(merged)
