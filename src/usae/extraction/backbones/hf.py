"""Hugging Face ``transformers`` vision models, read at ``hidden_states[layer]``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from usae.extraction.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, to_bdhw
from usae.extraction.backbones.offline import hub_offline_if_unreachable, offline_error
from usae.extraction.backbones.spec import int_layer


class HFBackbone(Backbone):
    """A Hugging Face ``transformers`` vision model read at ``hidden_states[layer]``.

    No splicing: ``AutoModel`` loads the bare encoder (or a CLIP/SigLIP image tower), whose output is
    hidden states or an embedding, not a task output that can be scored without its task head.
    """

    splice_unavailable_reason = (
        "AutoModel loads the bare encoder without a task head (its output is hidden states, not logits or a map)"
    )

    def __init__(
        self, model: nn.Module, name: str, spec: str, layer: int, input_size: int, mean: Any, std: Any
    ) -> None:
        super().__init__(name, spec, input_size, tuple(mean), tuple(std), layer=int(layer))
        self.model = model
        self.patch_size = getattr(model.config, "patch_size", None)

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x, output_hidden_states=True)
        y = out.hidden_states[self.layer]
        if y.ndim == 3 and isinstance(self.patch_size, int):
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            return to_bdhw(y, grid=(h, w))
        return to_bdhw(y)


def load_hf(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    import transformers

    try:
        with hub_offline_if_unreachable():
            if pretrained:
                model = transformers.AutoModel.from_pretrained(ident)
            else:
                model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(ident))
    except Exception as e:
        raise offline_error(spec, e) from None
    model = getattr(model, "vision_model", model)  # CLIP / SigLIP pairs: keep the image tower
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    try:
        with hub_offline_if_unreachable():
            proc = transformers.AutoImageProcessor.from_pretrained(ident)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        s = proc.crop_size if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None) else proc.size
        size = int(s.get("height") or s.get("shortest_edge") or 224) if isinstance(s, dict) else int(s)
    except Exception:  # no processor config saved: the model config's image size, ImageNet stats
        size = int(getattr(model.config, "image_size", 224) or 224)
    return HFBackbone(model, name, spec, int_layer(layer, spec), size, mean, std)
