"""Model specs ``[ALIAS=]KIND:ID[@LAYER][?OPTIONS]``: parsing, aliases, preprocessing options, block indices.

OPTIONS override how the canonical view is turned into the model's input (``Backbone.prepare``):
``key=value`` pairs joined by ``&``, e.g. ``onnx:det.onnx@feat?size=320&scale=255&mean=0,0,0&std=1,1,1&bgr=1``.
The keys are those of :data:`OPTIONS`; ``docs/backbones.md`` describes them. Every alias is checked
here, at parse time, with the store's model-name rule: it becomes a file name before any model runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from usae.data.store_format import check_model
from usae.errors import UsaeError

_ALIAS_BAD = re.compile(r"[^A-Za-z0-9_-]+")  # no ".": model names key nn.ModuleDicts

OPTIONS = {
    "size": "input side in pixels, or HxW (e.g. 320 or 384x640)",
    "mean": "3 numbers subtracted per channel (R,G,B; in the units of scale)",
    "std": "3 positive numbers dividing each channel after the mean",
    "scale": "what a white pixel is before mean/std: 1 (pixels in 0..1) or 255 (0..255); needs mean and std",
    "bgr": "1: feed the channels as B,G,R; 0: R,G,B",
    "layout": "nchw or nhwc (channels last, for graphs that want it)",
}


class ModelSpec(NamedTuple):
    """A parsed spec."""

    alias: str | None
    """The name given before ``=``, checked to be a safe model name; None when not given."""
    kind: str
    """``timm``, ``hf``, ``openclip``, ``onnx``, ``fake`` ... or ``builtin`` for a built-in name."""
    ident: str
    """What the kind's loader is given (a model name, a path)."""
    layer: str | None
    """The text after ``@``; None when not given."""
    options: dict[str, Any]
    """Preprocessing overrides, as :meth:`Backbone.set_preprocessing` takes them (only those given)."""


def check_alias(name: str, spec: str) -> str:
    """``name`` if it can name a model (a store directory, a .npy file, an SAE head), else a one-line UsaeError."""
    where = f"model spec {spec!r}"
    check_model(name, 1, where, set())  # the store's own rule: no '/', no '..', no leading '.'
    if "." in name:
        raise UsaeError(f"{where}: model name {name!r} must not contain '.' (names key the SAE's per-model heads)")
    return name


def default_alias(ident: str, layer: str | None) -> str:
    base = Path(ident).stem if ident.endswith(".onnx") else ident.rstrip("/").split("/")[-1]
    alias = _ALIAS_BAD.sub("_", base + (f"_l{layer}" if layer is not None else "")).strip("_-")
    return alias[:128] or "model"


def split_options(spec: str) -> tuple[str, str | None]:
    """``spec`` without its ``?OPTIONS`` tail, and the tail (None when there is none)."""
    body, q, query = spec.rpartition("?")
    return (body, query) if q else (spec, None)


def parse_model_spec(spec: str) -> ModelSpec:
    """``[ALIAS=]KIND:ID[@LAYER][?OPTIONS]`` -> :class:`ModelSpec`; built-in names have kind 'builtin'."""
    rest, query = split_options(spec)
    alias, _, rest = rest.rpartition("=") if "=" in rest.split(":", 1)[0] else (None, "", rest)
    body, at, layer = rest.rpartition("@")
    if not at:
        body, layer = rest, None
    kind, colon, ident = body.partition(":")
    if not colon:
        kind, ident = "builtin", body
    if not ident:
        raise UsaeError(
            f"model spec {spec!r}: expected [ALIAS=]KIND:ID[@LAYER][?OPTIONS], "
            "e.g. timm:vit_small_patch14_dinov2.lvd142m@-1"
        )
    if alias is not None:
        check_alias(alias, spec)
    return ModelSpec(alias or None, kind, ident, layer or None, parse_options(query, spec))


def parse_spec(spec: str) -> tuple[str | None, str, str, str | None]:
    """``[ALIAS=]KIND:ID[@LAYER][?OPTIONS]`` -> (alias, kind, id, layer); see :func:`parse_model_spec`."""
    return tuple(parse_model_spec(spec))[:4]  # type: ignore[return-value]


def parse_options(query: str | None, spec: str) -> dict[str, Any]:
    """``size=320&bgr=1`` -> ``{"size": (320, 320), "bgr": True}``; one-line UsaeError naming the option."""
    if query is None:
        return {}
    out: dict[str, Any] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        where = f"model spec {spec!r}: option {item!r}"
        if not eq or not key or not value:
            raise UsaeError(f"{where}: expected KEY=VALUE (options: {', '.join(OPTIONS)})")
        if key not in OPTIONS:
            raise UsaeError(f"model spec {spec!r}: unknown option {key!r} (options: {', '.join(OPTIONS)})")
        if key in out:
            raise UsaeError(f"model spec {spec!r}: option {key!r} is given twice")
        out[key] = _OPTION_PARSERS[key](value.strip(), where)
    if "scale" in out and not {"mean", "std"} <= out.keys():
        raise UsaeError(
            f"model spec {spec!r}: option scale needs mean and std too (in the units of the scaled pixels, "
            "e.g. scale=255&mean=0,0,0&std=1,1,1)"
        )
    return out


def _size(value: str, where: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) >= 1 for p in parts):
        h, w = int(parts[0]), int(parts[-1])
        return h, w
    raise UsaeError(f"{where}: size must be a positive int or HxW (e.g. 320 or 384x640)")


def _floats3(value: str, where: str, positive: bool = False) -> tuple[float, float, float]:
    try:
        xs = [float(v) for v in value.split(",")]
    except ValueError:
        xs = []
    if len(xs) != 3 or not all(math.isfinite(x) for x in xs):
        raise UsaeError(f"{where}: expected 3 numbers R,G,B (e.g. 0.5,0.5,0.5)")
    if positive and not all(x > 0 for x in xs):
        raise UsaeError(f"{where}: every std must be > 0")
    return xs[0], xs[1], xs[2]


def _scale(value: str, where: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise UsaeError(f"{where}: scale must be a positive number (1: pixels in 0..1, 255: pixels in 0..255)")
    return x


def _flag(value: str, where: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise UsaeError(f"{where}: expected 0 or 1")


def _layout(value: str, where: str) -> str:
    if value.upper() in ("NCHW", "NHWC"):
        return value.upper()
    raise UsaeError(f"{where}: layout must be nchw or nhwc")


_OPTION_PARSERS = {
    "size": _size,
    "mean": _floats3,
    "std": lambda v, where: _floats3(v, where, positive=True),
    "scale": _scale,
    "bgr": _flag,
    "layout": _layout,
}


def int_layer(layer: str | None, spec: str, default: int = -1) -> int:
    if layer is None:
        return default
    try:
        return int(layer)
    except ValueError:
        raise UsaeError(f"model spec {spec!r}: layer {layer!r} must be a block index (e.g. -1, 11)") from None
