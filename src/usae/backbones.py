"""Deprecated path: use ``usae.extraction.backbones`` (this thin re-export stays for code written before 0.2)."""

import warnings

from usae.extraction.backbones import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOADERS,
    Backbone,
    HFBackbone,
    OnnxBackbone,
    OpenClipBackbone,
    TimmBackbone,
    TorchBackbone,
    align,
    load_backbone,
    parse_spec,
    to_bdhw,
)

warnings.warn("usae.backbones is deprecated; import from usae.extraction.backbones", DeprecationWarning, stacklevel=2)
