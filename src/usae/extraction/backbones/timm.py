"""timm models, read with ``forward_intermediates`` at a block."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone, Replace, SpliceHook, from_bdhw, to_bdhw
from usae.extraction.backbones.offline import hub_offline_if_unreachable, offline_error
from usae.extraction.backbones.spec import int_layer


class TimmBackbone(Backbone):
    """A timm model read with ``forward_intermediates`` at block ``layer`` (default: the last).

    Prefix tokens (CLS, registers) are dropped by timm; preprocessing comes from the model's data
    config (input size, mean, std; the crop is ours: the canonical square).

    Splicing: a model with a classifier head (``num_classes > 0``) is a ``"classifier"``; its full
    forward (``forward_features`` + ``forward_head``) runs with a hook on the module that produced
    intermediate ``layer`` — ``feature_info[layer]["module"]``, else ``blocks.<layer>``,
    ``stages.<layer>`` or ``layers.<layer>`` — at any block, not just the last. :meth:`splice_check`
    keeps the first candidate (read as NCHW, else as NHWC: Swin's stages) whose output is exactly what
    ``forward_intermediates`` returned on a probe image; models whose intermediates are
    post-processed (e.g. normalised) have none and report so.
    """

    def __init__(self, model: nn.Module, name: str, spec: str, layer: int = -1) -> None:
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        size = int(cfg["input_size"][-1])
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if fixed:  # a ViT built with another img_size than its pretrained config says
            size = int(fixed[-1])
        super().__init__(name, spec, size, tuple(cfg["mean"]), tuple(cfg["std"]), layer=int(layer))
        if not hasattr(model, "forward_intermediates"):
            raise UsaeError(f"{spec}: this timm model has no forward_intermediates; wrap it with TorchBackbone")
        self.model = model
        self.n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self._hook_module: str | None = None
        self._hook_nhwc = False
        if int(getattr(model, "num_classes", 0) or 0) > 0:
            self.task = "classifier"
        else:
            self.splice_unavailable_reason = "the model has no classifier head (num_classes = 0)"

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True, stop_early=True)
        return to_bdhw(out[0])

    def hook_candidates(self) -> list[str]:
        """Module names that may produce intermediate ``layer``, most likely first."""
        names = []
        info = getattr(self.model, "feature_info", None)
        if isinstance(info, list) and info and isinstance(info[0], dict):
            names.append(str(info[int(self.layer) % len(info)].get("module", "")))
        for attr in ("blocks", "stages", "layers"):
            seq = getattr(self.model, attr, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
                names.append(f"{attr}.{int(self.layer) % len(seq)}")
        found = []
        for n in names:
            try:
                self.model.get_submodule(n)
            except AttributeError:
                continue
            if n and n not in found:
                found.append(n)
        return found

    def splice_check(self) -> str | None:
        if self.task is None:
            return self._unavailable()
        tried = self.hook_candidates()
        reason = f"{self._unavailable_prefix()}no module found for block {self.layer}"
        for name in tried:
            for nhwc in (False, True):
                self._hook_module, self._hook_nhwc = name, nhwc
                found = super().splice_check()
                if found is None:
                    return None
                if not nhwc:
                    reason = found
        self._hook_module, self._hook_nhwc = None, False
        if len(tried) > 1:
            reason = f"{reason} (tried {', '.join(tried)})"
        return reason

    def _splice(self, x: Tensor, replace: Replace) -> Any:
        if self._hook_module is None:
            reason = self.splice_check()
            if reason is not None:
                raise UsaeError(reason)
        if self._hook_nhwc:
            hook = SpliceHook(replace, _nhwc_to_map, _nhwc_from_map)
        else:
            hook = SpliceHook(
                replace, lambda y: to_bdhw(y, self.n_prefix), lambda y, new: from_bdhw(y, new, self.n_prefix)
            )
        with hook.on(self.model.get_submodule(self._hook_module)):
            out = self.model(x)
        if not hook.calls:
            raise UsaeError(f"{self.spec}: module {self._hook_module} did not run in the forward pass")
        return out


def _nhwc_to_map(y: Any) -> Tensor:
    y = y[0] if isinstance(y, (tuple, list)) else y
    if not isinstance(y, Tensor) or y.ndim != 4:
        raise UsaeError(f"layer output is {type(y).__name__}, not an NHWC map")
    return y.permute(0, 3, 1, 2)


def _nhwc_from_map(y: Any, new_bdhw: Tensor) -> Any:
    if isinstance(y, (tuple, list)):
        return type(y)([_nhwc_from_map(y[0], new_bdhw), *y[1:]])
    if tuple(new_bdhw.shape) != tuple(y.permute(0, 3, 1, 2).shape):
        raise UsaeError(
            f"splice: replacement map has shape {tuple(new_bdhw.shape)}, the layer's is NHWC {tuple(y.shape)}"
        )
    return new_bdhw.to(y.dtype).permute(0, 2, 3, 1)


def load_timm(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True, **kwargs: Any) -> Backbone:
    import timm

    try:
        with hub_offline_if_unreachable():
            model = timm.create_model(ident, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsaeError(f"{spec}: timm has no model {ident!r}") from None
        raise offline_error(spec, e) from None
    except Exception as e:  # hub errors (offline, gated, missing file) come in many types
        raise offline_error(spec, e) from None
    return TimmBackbone(model, name, spec, int_layer(layer, spec))
