"""open_clip image towers, read with ``forward_intermediates`` at a block."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone, to_bdhw
from usae.extraction.backbones.offline import hub_offline_if_unreachable, offline_error
from usae.extraction.backbones.spec import int_layer


class OpenClipBackbone(Backbone):
    """An open_clip image tower read with its ``forward_intermediates`` at block ``layer``.

    No splicing: the tower's output is a CLIP embedding, scored only against text prompts.
    """

    splice_unavailable_reason = "the image tower's output is a CLIP embedding, a task only with text prompts"

    def __init__(
        self, visual: nn.Module, name: str, spec: str, layer: int, input_size: int, mean: Any, std: Any
    ) -> None:
        super().__init__(name, spec, input_size, tuple(mean), tuple(std), layer=int(layer))
        if not hasattr(visual, "forward_intermediates"):
            raise UsaeError(f"{spec}: this open_clip tower has no forward_intermediates")
        self.model = visual

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True, stop_early=True)
        return to_bdhw(out["image_intermediates"][0])


def load_openclip(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    try:
        import open_clip
    except ImportError:
        raise UsaeError(f"{spec}: needs the open_clip package: pip install 'usae[openclip]'") from None
    arch, _, tag = ident.partition("/")
    try:
        with hub_offline_if_unreachable():
            model = open_clip.create_model(arch, pretrained=(tag or None) if pretrained else None)
    except Exception as e:
        raise offline_error(spec, e) from None
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenClipBackbone(visual, name, spec, int_layer(layer, spec), int(size), mean, std)
