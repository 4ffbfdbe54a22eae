"""Reading settings files (the search config, sweep files, target files) and checking their
values against a dataclass's field types: one place for the one-line errors on bad input."""

from __future__ import annotations

import types
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from search.core.errors import UserError


def read_settings(path: Path, what: str, known: set[str], hint: str) -> dict[str, Any]:
    """A YAML file holding a mapping of known settings; anything else is a one-line UserError
    (`what` names the file's kind, `hint` says where a good one is)."""
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist; {hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory; {hint}") from None
    except PermissionError:
        raise UserError(f"{what} {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file (not UTF-8); {hint}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of settings (key: value lines); "
                        f"got {_kind(data)}")
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise UserError(f"{what} {path}: unknown setting(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(sorted(known))}")
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    """Every value of `data` has the type its dataclass field of `cls` declares (a one-line
    UserError naming the key, the value given and the type wanted); unknown keys too."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(sorted(known))}")
    missing = [f.name for f in known.values() if f.name not in data and _default(f) is MISSING]
    if missing:
        raise UserError(f"{where}: missing setting(s) {', '.join(missing)}")
    for key, value in data.items():
        hint = hints[key]
        if not _matches(value, hint):
            example = _default(known[key])
            eg = f", e.g. {_yaml(example)}" if example not in (None, MISSING, {}, []) else ""
            kind = "" if value is None else f" ({_kind(value)})"
            raise UserError(f"{where}: {key} must be {_describe(hint)}{eg}; got "
                            f"{_yaml(value)}{kind}")


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the annotations our dataclasses use; bool is not a number here, and an
    int is a float (YAML writes 1 for 1.0)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value if args)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items() if args)
    return isinstance(value, hint) if isinstance(hint, type) else True


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"),
          type(None): ("null", "nulls"), list: ("a list", "lists"), dict: ("a mapping", "mappings")}


def _describe(hint: Any, plural: bool = False) -> str:
    """A type annotation in words: list[str] -> 'a list of strings'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if hint is Any:
        return "values" if plural else "any value"
    base = origin or hint
    one, many = _NAMES.get(base, (f"a {getattr(base, '__name__', base)}",
                                  f"{getattr(base, '__name__', base)}s"))
    if base is list and args and args[0] is not Any:
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}"
    if base is dict and args and args[1] is not Any:
        return f"{'mappings' if plural else 'a mapping'} to {_describe(args[1], True)}"
    return many if plural else one


def _kind(value: Any) -> str:
    """What YAML made of a value: 'a string', 'a list', ..."""
    if isinstance(value, bool):
        return "a boolean"
    for t in (int, float, str, type(None), list, dict):
        if isinstance(value, t):
            return _NAMES[t][0]
    return type(value).__name__


def _yaml(value: Any) -> str:
    """A value as one line of YAML flow style (how the user would write it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _default(f: Any) -> Any:
    """A field's default value (MISSING if it has none)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING
