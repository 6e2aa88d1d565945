"""Vision backbones behind one interface (``base``), one adapter per library, and their registry.

``load_backbone(spec)`` turns a spec ``[ALIAS=]KIND:ID[@LAYER]`` into a probed, frozen
:class:`Backbone`. KIND is a key of :data:`LOADERS` (timm, hf, openclip, onnx, fake) or a built-in
name of :data:`zoo.BUILTIN`. To add a library: write ``<library>.py`` with a ``Backbone`` subclass
and a ``load_<library>(ident, name, spec, layer, pretrained=True)`` function, and register it here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from usae.errors import UsaeError
from usae.extraction.backbones import zoo
from usae.extraction.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, align, to_bdhw
from usae.extraction.backbones.fake import load_fake
from usae.extraction.backbones.hf import HFBackbone, load_hf
from usae.extraction.backbones.onnx import OnnxBackbone, load_onnx
from usae.extraction.backbones.openclip import OpenClipBackbone, load_openclip
from usae.extraction.backbones.spec import default_alias, parse_spec
from usae.extraction.backbones.timm import TimmBackbone, load_timm
from usae.extraction.backbones.torch_module import TorchBackbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADERS",
    "Backbone",
    "HFBackbone",
    "OnnxBackbone",
    "OpenClipBackbone",
    "TimmBackbone",
    "TorchBackbone",
    "align",
    "load_backbone",
    "parse_spec",
    "to_bdhw",
]

LOADERS: dict[str, Callable[..., Backbone]] = {
    "timm": load_timm,
    "hf": load_hf,
    "openclip": load_openclip,
    "onnx": load_onnx,
    "fake": load_fake,
}


def load_backbone(spec: str, pretrained: bool = True, device: str | torch.device = "cpu") -> Backbone:
    """Build, freeze and probe the backbone a spec names (see ``base`` for the interface)."""
    alias, kind, ident, layer = parse_spec(spec)
    name = alias or (ident if kind == "builtin" and layer is None else default_alias(ident, layer))
    if kind == "builtin":
        if ident not in zoo.BUILTIN:
            known = ", ".join([*zoo.BUILTIN, *(f"{k}:…" for k in LOADERS)])
            raise UsaeError(f"unknown model {spec!r}; known: {known}")
        backbone = zoo.BUILTIN[ident](name, spec, layer, pretrained)
    elif kind in LOADERS:
        backbone = LOADERS[kind](ident, name, spec, layer, pretrained=pretrained)
    else:
        raise UsaeError(f"model spec {spec!r}: unknown kind {kind!r} (known: {', '.join(LOADERS)}, or a built-in name)")
    return backbone.to(device).probe()
