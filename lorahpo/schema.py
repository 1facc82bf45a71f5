"""Frozen dataclasses from plain YAML data: every value coerced to the type its field declares (`1e-4` read as a
string becomes a float, `q_proj,v_proj` a tuple, `null` None), every unknown key named with the nearest valid one.
And the generic halves of overrides and dumps: `KEY=VALUE` strings parsed, nested dicts flattened to dotted keys,
values made plain for JSON and YAML; and the generic checks of values: a bound (`at_least`), a search-space entry
(`ParamSpec.validate`). Generic: it knows nothing of lorahpo's sections (config.py declares those)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from lorahpo.errors import UserError

# Far beyond any real config, and cheap to walk: a YAML file of a few lines of anchors and aliases can stand for 10^9
# values (safe_load shares them), which every later walk over the config (coercion, checks, dumps) would visit.
MAX_VALUES = 100_000
MAX_DEPTH = 50


@dataclass(frozen=True)
class ParamSpec:
    """One search-space entry, keyed in the config by the dotted path it overrides (e.g. `train.lr`)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def validate(self, key: str) -> None:
        """An entry a searcher can sample (`key` names it in the error): choices, or a range low..high."""
        if self.type == "categorical":
            if not self.choices:
                raise UserError(f"{key}: categorical with an empty choice list; give at least one choice")
            return
        if self.low is None or self.high is None:
            raise UserError(f"{key}: {self.type} needs low and high")
        if self.low > self.high:
            raise UserError(f"{key}: low={self.low} is above high={self.high}; swap them")
        if self.log and self.low <= 0:
            raise UserError(f"{key}: a log scale needs low > 0 (got low={self.low})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise UserError(f"{key}: int bounds must be whole numbers")


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config of this class accepts (sections expanded)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def unknown_key(key: str, candidates: list[str]) -> UserError:
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(candidates)}"
    return UserError(f"unknown config key {key!r}: {hint}")


def load_yaml(text: str, what: str, lenient: bool = False) -> Any:
    """Parsed YAML text, or a UserError naming `what`: invalid YAML (with `lenient`, the text itself is the value, as a
    KEY=VALUE override that is no YAML is a plain string), nesting deeper than MAX_DEPTH (the parser itself fails
    with a RecursionError a few hundred levels down), or more than MAX_VALUES values once aliases are expanded."""
    deep = UserError(f"{what} is nested more than {MAX_DEPTH} levels deep; no config needs that")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if lenient:
            return text
        raise UserError(f"{what} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise deep from None
    todo, count = [(value, 0)], 0
    while todo:  # iterative: a list that contains itself (`&a [*a]`) ends at the count, not at the recursion limit
        item, depth = todo.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise deep
        if count > MAX_VALUES:
            raise UserError(f"{what} holds more than {MAX_VALUES} values once its YAML aliases are expanded; refused")
        inner = [*item.keys(), *item.values()] if isinstance(item, dict) else item if isinstance(item, list) else []
        todo.extend((v, depth + 1) for v in inner)
    return value


def at_least(key: str, value: float | None, low: float, above: bool = False, hint: str = "") -> None:
    """The one form of a bound's error: `KEY=VALUE must be >= LOW` (`> LOW` with `above`), then `hint` (e.g. what
    null means). None passes: a field that may be null means off, or all, by it."""
    if value is not None and (value <= low if above else value < low):
        raise UserError(f"{key}={value} must be {'>' if above else '>='} {low}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared field type, or raise a UserError naming the key."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):  # numpy scalars from pandas/parquet
        value = value.item()
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is tuple:
        if value is None:  # an empty YAML list (`key:` with nothing after it)
            return ()
        if isinstance(value, str):
            value = load_yaml(value, key) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise UserError(f"{key}={list(value)} must have {len(args)} entries")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"{key}={value!r} must be true or false")
    if tp in (int, float):
        try:
            # a bool is no number; an int is written as one (`3`, `"3"`), never as a float (`3.0`)
            if isinstance(value, bool) or (tp is int and not isinstance(value, (int, str))):
                raise ValueError
            number = tp(value)  # YAML reads `1e-4` (no dot) as a string
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r} must be {'an integer' if tp is int else 'a number'}") from None
        return _finite(number, key)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):  # `KEY=` gives None: not the string "None"
            raise UserError(f"{key}={value!r} must be a string")
        return str(value)
    if tp is Any:
        return _finite(value, key)
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise UserError(f"{key}: the key {bad[0]!r} is not a name; keys are dotted config keys such as train.lr")
        inner = args[1]
        if dataclasses.is_dataclass(inner):  # e.g. the search space: {dotted key: ParamSpec}
            for k, v in value.items():
                if not isinstance(v, dict):
                    raise UserError(f"{key}.{k} must be a mapping of {', '.join(valid_keys(inner))}")
            return {k: build(inner, v, f"{key}.{k}.") for k, v in value.items()}
        return _finite(dict(value), key)
    return value


def _finite(value: Any, key: str) -> Any:
    """`value` unchanged, unless it holds a NaN or an infinity (at any depth): those are never a setting."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}: {value!r} is not a finite number; give a real value")
    for inner in value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
        _finite(inner, key)
    return value


def build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise unknown_key(f"{prefix}{key}", valid_keys(cls, prefix))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> {key: value}; values parsed as YAML so `lr=1e-3`, `split=[0.7,0.3,0]` work."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=3e-4)")
        out[key.strip()] = load_yaml(value, f"override {key}", lenient=True) if value != "" else None
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: value}; the search space stays one value per key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "search" and not prefix.startswith("search"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plain(value: Any) -> Any:
    """A value as plain Python for JSON and YAML (nested): tuples as lists, numpy/pandas scalars as Python's."""
    if isinstance(value, tuple | list):
        return [plain(x) for x in value]
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    return value.item() if hasattr(value, "item") else value
