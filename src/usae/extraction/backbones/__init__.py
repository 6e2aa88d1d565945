"""Vision backbones behind one interface (``base``), one adapter per library, and their registry.

``load_backbone(spec)`` turns a spec ``[ALIAS=]KIND:ID[@LAYER][?OPTIONS]`` into a probed, frozen
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
from usae.extraction.backbones.spec import ModelSpec, check_alias, default_alias, parse_model_spec, parse_spec
from usae.extraction.backbones.timm import TimmBackbone, load_timm
from usae.extraction.backbones.torch_module import TorchBackbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADERS",
    "Backbone",
    "ModelSpec",
    "HFBackbone",
    "OnnxBackbone",
    "OpenClipBackbone",
    "TimmBackbone",
    "TorchBackbone",
    "align",
    "check_alias",
    "check_spec",
    "load_backbone",
    "parse_model_spec",
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


def check_spec(spec: str) -> tuple[ModelSpec, str]:
    """Parse ``spec`` and check, before anything is loaded or written, its kind and its model name.

    Returns the parsed spec and the model's name (its alias, else one derived from the id); a
    one-line UsaeError for an unknown kind or built-in, bad options, or a name that is not safe.
    """
    parsed = parse_model_spec(spec)
    alias, kind, ident, layer = parsed.alias, parsed.kind, parsed.ident, parsed.layer
    if kind == "builtin" and ident not in zoo.BUILTIN:
        known = ", ".join([*zoo.BUILTIN, *(f"{k}:…" for k in LOADERS)])
        raise UsaeError(f"unknown model {spec!r}; known: {known}")
    if kind != "builtin" and kind not in LOADERS:
        raise UsaeError(f"model spec {spec!r}: unknown kind {kind!r} (known: {', '.join(LOADERS)}, or a built-in name)")
    name = alias or (ident if kind == "builtin" and layer is None else default_alias(ident, layer))
    return parsed, check_alias(name, spec)


def load_backbone(spec: str, pretrained: bool = True, device: str | torch.device = "cpu") -> Backbone:
    """Build, freeze and probe the backbone a spec names (see ``base`` for the interface).

    The spec's ``?OPTIONS`` (``spec.py``) override the preprocessing the library's config gives.
    """
    (_, kind, ident, layer, options), name = check_spec(spec)
    if kind == "builtin":
        backbone = zoo.BUILTIN[ident](name, spec, layer, pretrained)
    else:
        backbone = LOADERS[kind](ident, name, spec, layer, pretrained=pretrained)
    backbone = backbone.set_preprocessing(**options).to(device)
    if not options.keys() & {"size", "layout"}:
        return backbone.probe()
    try:
        return backbone.probe()
    except UsaeError:
        raise
    except Exception as e:  # the model refuses the input the options ask for (a fixed-size graph, a ViT)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsaeError(
            f"{spec}: the model fails on a {backbone.input_hw[0]}x{backbone.input_hw[1]} "
            f"{'NHWC' if backbone.channels_last else 'NCHW'} input: {type(e).__name__}: {first}"
        ) from None
