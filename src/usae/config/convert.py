"""Config dataclasses <-> JSON: strict keys, typed coercion, and the one-line field check."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

from usae.errors import UsaeError


def refuse_invalid(what: str, cfg: Any, checks: dict[str, bool]) -> None:
    """Raise a one-line UsaeError naming the first field of ``cfg`` whose check is False."""
    for name, ok in checks.items():
        if not ok:
            raise UsaeError(f"{what}: invalid {name}={getattr(cfg, name)!r}")


# Field metadata of a group of fields (e.g. TrainConfig.arch) that config.json holds flat, as the CLI
# shows it (tyro.conf.OmitArgPrefixes): grouping fields changes neither the flags nor the file.
FLAT = {"flat": True}
# A FLAT group that config.json holds only when some field differs from its default (a feature's
# settings: files of runs that do not use it stay as they were).
FLAT_UNLESS_DEFAULT = {"flat": True, "unless_default": True}


def to_json_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready dict (paths as str, tuples as lists; a ``FLAT`` group's fields in its place)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(a): conv(b) for a, b in v.items()}
        return v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("unless_default") and value == f.default_factory():
            continue
        if f.metadata.get("flat"):
            out.update(to_json_dict(value))
        else:
            out[f.name] = conv(value)
    return out


def from_json_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Rebuild dataclass ``cls`` from ``data``; unknown or missing keys raise UsaeError naming ``where``."""
    if not isinstance(data, dict):
        raise UsaeError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = _leaf_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsaeError(f"{where}: unknown config key(s) {unknown}")
    values = {}
    for name, (f, hint) in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsaeError(f"{where}: missing config key {name!r}")
            continue
        values[name] = _coerce(hint, data[name], f"{where}: field {name!r}")
    return _build(cls, values)


def _leaf_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``cls``'s fields and their types by name, each ``FLAT`` group's fields in the group's place."""
    hints = typing.get_type_hints(cls, include_extras=False)
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            out.update(_leaf_fields(hints[f.name]))
        else:
            out[f.name] = (f, hints[f.name])
    return out


def _build(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` from field values by name; each ``FLAT`` group built from its own fields' values."""
    hints = typing.get_type_hints(cls, include_extras=False)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            kwargs[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _coerce(args[0], v, where)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except UsaeError:
                continue
        raise UsaeError(f"{where}: value {v!r} has the wrong type")
    if origin is Literal:
        if v not in args:
            raise UsaeError(f"{where}: {v!r} is not one of {list(args)}")
        return v
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise UsaeError(f"{where}: expected a list, got {v!r}")
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None and len(args) != len(v):
            raise UsaeError(f"{where}: expected {len(args)} items, got {len(v)}")
        # a variadic tuple[X, ...] has args (X, Ellipsis): coerce every item as X, not zip with args
        item_types = [inner] * len(v) if inner is not None else list(args) or [None] * len(v)
        return tuple(_coerce(t, x, where) for t, x in zip(item_types, v, strict=True))
    if origin is dict:
        if not isinstance(v, dict):
            raise UsaeError(f"{where}: expected an object, got {v!r}")
        return {str(a): _coerce(args[1], b, where) for a, b in v.items()}
    if tp is Path:
        if not isinstance(v, str):
            raise UsaeError(f"{where}: expected a path string, got {v!r}")
        return Path(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UsaeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp in (int, bool, str):
        if type(v) is not tp:
            raise UsaeError(f"{where}: expected {tp.__name__}, got {v!r}")
        return v
    return v
