"""Model specs ``[ALIAS=]KIND:ID[@LAYER]``: parsing, default aliases, block indices."""

from __future__ import annotations

import re
from pathlib import Path

from usae.errors import UsaeError

_ALIAS_BAD = re.compile(r"[^A-Za-z0-9_-]+")  # no ".": model names key nn.ModuleDicts


def default_alias(ident: str, layer: str | None) -> str:
    base = Path(ident).stem if ident.endswith(".onnx") else ident.rstrip("/").split("/")[-1]
    alias = _ALIAS_BAD.sub("_", base + (f"_l{layer}" if layer is not None else "")).strip("_-")
    return alias[:128] or "model"


def parse_spec(spec: str) -> tuple[str | None, str, str, str | None]:
    """``[ALIAS=]KIND:ID[@LAYER]`` -> (alias, kind, id, layer); built-in names have kind 'builtin'."""
    alias, _, rest = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else (None, "", spec)
    body, at, layer = rest.rpartition("@")
    if not at:
        body, layer = rest, None
    kind, colon, ident = body.partition(":")
    if not colon:
        kind, ident = "builtin", body
    if not ident:
        raise UsaeError(
            f"model spec {spec!r}: expected [ALIAS=]KIND:ID[@LAYER], e.g. timm:vit_small_patch14_dinov2.lvd142m@-1"
        )
    return alias or None, kind, ident, layer or None


def int_layer(layer: str | None, spec: str, default: int = -1) -> int:
    if layer is None:
        return default
    try:
        return int(layer)
    except ValueError:
        raise UsaeError(f"model spec {spec!r}: layer {layer!r} must be a block index (e.g. -1, 11)") from None
