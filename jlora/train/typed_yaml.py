"""YAML to typed, frozen dataclasses and back: what `jlora.train.config` reads and writes its schema with.

Generic over dataclasses (it knows no section of a run): a YAML loader that reads 1e-4 as a float and refuses
a key written twice, the conversion of a value to a field's type hint (`coerce`, `build`), `KEY=VALUE`
overrides walked down the hints (`set_override`, `parse_value`), and the plain dict of a config (`to_dict`).
A bad key, type or value raises `ConfigError`, a one-line message naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from jlora.errors import JloraError


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 1e-4 (no dot) as a float, as YAML 1.2 does."""


def _mapping_without_duplicates(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping; a key written twice (two `lora:` sections, say: YAML keeps the last) is an error."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges; its keys may repeat
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is set twice (first on line {seen[key] + 1}); keep one", key_node.start_mark
            )
        seen.setdefault(key, key_node.start_mark.line)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9_]+[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


class ConfigError(JloraError, ValueError):
    """A bad config. The message names the dotted key; `load` adds the file or --set argument."""

    def __init__(self, msg: str, key: str | None = None):
        self.key, self.msg = key, msg
        super().__init__(f"{key}: {msg}" if key else msg)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _is_pair(hint: Any) -> bool:
    args = typing.get_args(hint)
    return typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is not Ellipsis


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _unknown(key: str, part: str, prefix: str, names: Sequence[str]) -> ConfigError:
    near = difflib.get_close_matches(part, list(names), n=1)
    return ConfigError(f"unknown key '{key}'" + (f" (did you mean '{prefix}{near[0]}'?)" if near else ""))


def coerce(v: Any, hint: Any, key: str) -> Any:
    """`v` (from YAML or Python) as the type `hint`, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ConfigError(f"expected {_type_name(hint)}, got {v!r}", key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(v, (hint, Mapping)):
            raise bad
        return v if isinstance(v, hint) else build(hint, v, key + ".")
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise ConfigError(f"must be one of {_type_name(hint)}, got {v!r}", key)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        # the member of v's own type first, so True stays a bool and 2 an int in `bool | int | str`
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is not type(v)):
            try:
                return coerce(v, a, key)
            except ConfigError:
                pass
        raise bad
    if hint in _SCALARS:
        if isinstance(v, _SCALARS[hint]) and (hint is bool or not isinstance(v, bool)):
            return hint(v)
        if hint is int and isinstance(v, float) and v.is_integer():
            return int(v)
        raise bad
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(v, Mapping) and _is_pair(args[0]):  # {regex: value} -> ((regex, value), ...)
                v = list(v.items())
            if isinstance(v, (list, tuple)):
                return tuple(coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(v))
            raise bad
        if isinstance(v, (list, tuple)) and len(v) == len(args):
            return tuple(coerce(x, a, f"{key}[{i}]") for i, (x, a) in enumerate(zip(v, args)))
        raise bad
    raise TypeError(f"config field {key}: unsupported type hint {hint!r}")


def build(cls: type, raw: Mapping, prefix: str) -> Any:
    """Construct dataclass `cls` from mapping `raw`, rejecting unknown and missing keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in fields:
            raise _unknown(f"{prefix}{k}", str(k), prefix, fields)
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}'")
    # a field's own default is always a valid value (LoraConfig.targets: None means the family's default)
    kwargs = {
        k: v if v is None and fields[k].default is None else coerce(v, hints[k], prefix + k) for k, v in raw.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(e.msg, prefix + e.key if e.key else None) from None
    except (ValueError, TypeError) as e:  # a section we don't own (LoraConfig) validating itself
        field_name, sep, rest = str(e).partition(": ")
        if sep and field_name in fields:  # its message names a field: "targets: ..." -> key lora.targets
            raise ConfigError(rest, prefix + field_name) from None
        raise ConfigError(str(e), prefix.rstrip(".") or None) from None


def parse_value(text: str, hint: Any, key: str) -> Any:
    """A `--set` right-hand side as the type `hint`: YAML syntax for lists, mappings, numbers,
    booleans and null; a str field takes the text verbatim."""
    args = typing.get_args(hint)
    str_like = hint is str or (typing.get_origin(hint) is Literal and all(isinstance(a, str) for a in args))
    optional_str = typing.get_origin(hint) in (Union, types.UnionType) and set(args) == {str, type(None)}
    if str_like or (optional_str and text.strip() not in ("null", "~", "None")):
        return coerce(text, hint, key)
    try:
        v = None if text.strip() == "None" else yaml.load(text, Loader=Loader) if text.strip() else ""
    except yaml.YAMLError:
        v = text  # e.g. a regex like "[qv]_proj": not YAML, so a plain string
    return coerce(v, hint, key)


def set_override(root: type, raw: dict, override: str) -> None:
    """Apply `override` ("a.b=value") to the nested mapping `raw` of dataclass `root`, typed by its hints."""
    key, eq, text = override.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"expected KEY=VALUE, got {override!r}")
    hint: Any = root
    node, parts = raw, key.split(".")
    for i, part in enumerate(parts):  # walk the dataclass hints and the raw mapping together
        names = [f.name for f in dataclasses.fields(hint)] if dataclasses.is_dataclass(hint) else []
        if part not in names:
            raise _unknown(key, part, ".".join(parts[:i] + [""]).lstrip("."), names)
        hint = typing.get_type_hints(hint)[part]
        if i < len(parts) - 1:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("is not a mapping in the file", ".".join(parts[: i + 1]))
    value = parse_value(text, hint, key)
    node[parts[-1]] = to_dict(value) if dataclasses.is_dataclass(value) else value


def _plain(v: Any, hint: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    if not isinstance(v, tuple):
        return v
    tuples = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is tuple]  # `X | None`
    elem = typing.get_args(tuples[0])[0] if tuples else None
    return dict(v) if _is_pair(elem) else [_plain(x, elem) for x in v]


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (YAML/JSON-ready) of a config; `from_dict(to_dict(c)) == c`."""
    hints = typing.get_type_hints(type(cfg))
    return {f.name: _plain(getattr(cfg, f.name), hints[f.name]) for f in dataclasses.fields(cfg)}
