"""Seeded random CNNs named ``fake:w16s8``: backbones for tests and dry runs."""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone
from usae.extraction.backbones.spec import split_options
from usae.extraction.backbones.torch_module import TorchBackbone


def load_fake(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """``fake:w16s8[i32]`` — a seeded random CNN (width 16, stride 8, input 32): for tests and dry runs."""
    m = re.fullmatch(r"w(\d+)s(\d+)(?:i(\d+))?", ident)
    if not m:
        raise UsaeError(f"{spec}: fake backbones are named like fake:w16s8 or fake:w16s8i64 (width, stride, input)")
    width, stride, size = int(m[1]), int(m[2]), int(m[3] or 64)
    if not (1 <= width <= 4096 and 1 <= stride <= size <= 4096):
        raise UsaeError(f"{spec}: a fake backbone needs width in [1, 4096] and stride in [1, input size <= 4096]")
    # seeded by KIND:ID[@LAYER] alone: an alias or preprocessing options do not change the weights
    gen = torch.Generator().manual_seed(zlib.crc32(split_options(spec)[0].split("=")[-1].encode()))
    net = nn.Sequential(nn.Conv2d(3, width, stride, stride), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    backbone = TorchBackbone(net, name, size, features=lambda mod, x: mod(x), spec=spec)
    backbone.splice_unavailable_reason = "a seeded random CNN ends at its layer: it has no task output"
    return backbone
