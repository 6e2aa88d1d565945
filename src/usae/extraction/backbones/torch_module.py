"""Any ``torch.nn.Module`` as a backbone, read at a named submodule or through a function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone, Replace, SpliceHook, Stop, Task, from_bdhw, to_bdhw


class TorchBackbone(Backbone):
    """Any ``torch.nn.Module`` read at a named submodule (or through a custom function).

    ``layer`` is a dotted module path (``"layer3"``, ``"blocks.7"``); its output is captured with a
    forward hook that stops the forward pass there. ``features`` instead takes a callable
    ``(module, x) -> output``. Token-sequence outputs lose their prefix tokens (see :func:`to_bdhw`).

    Splicing (``evaluation/splice.py``) needs ``task`` ("classifier": the output is logits over
    classes; "dense": a map) and optionally ``head``, a callable from the module's full output to the
    logits or map (e.g. ``lambda out: out.logits``). With ``layer``, the module's own forward is the
    full model and the layer's output is swapped by a hook; with ``features``, give ``rest``, a
    callable ``(module, map_bdhw) -> output`` that runs the rest of the network from the feature map.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        input_size: int,
        layer: str | None = None,
        features: Callable[[nn.Module, Tensor], Any] | None = None,
        n_prefix: int | None = None,
        spec: str | None = None,
        *,
        task: Task | None = None,
        head: Callable[[Any], Tensor] | None = None,
        rest: Callable[[nn.Module, Tensor], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, spec or f"torch:{type(module).__name__}@{layer}", input_size, layer=layer, **kwargs)
        if layer is None and features is None:
            raise UsaeError(f"backbone {name}: give a layer name or a features function")
        if layer is not None:
            try:
                module.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in module.named_modules() if n][:20]
                raise UsaeError(f"backbone {name}: no layer {layer!r} (some layers: {', '.join(names)})") from None
        if task not in (None, "classifier", "dense"):
            raise UsaeError(f"backbone {name}: task must be 'classifier', 'dense' or None, got {task!r}")
        if task is not None and features is not None and layer is None and rest is None:
            raise UsaeError(
                f"backbone {name}: a task with a features function needs rest=(module, map) -> output to run the rest"
            )
        self.model, self._features, self.n_prefix = module, features, n_prefix
        self.task, self.head, self._rest = task, head, rest
        self.splice_unavailable_reason = (
            "no task output declared; build TorchBackbone(..., task='classifier' or 'dense', head=...) in Python"
        )

    def feature_map(self, x: Tensor) -> Tensor:
        if self._features is not None:
            return to_bdhw(self._features(self.model, x), self.n_prefix)

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            raise Stop(output)

        handle = self.model.get_submodule(self.layer).register_forward_hook(stop)
        try:
            self.model(x)
        except Stop as s:
            return to_bdhw(s.value, self.n_prefix)
        finally:
            handle.remove()
        raise UsaeError(f"backbone {self.name}: layer {self.layer!r} did not run in the forward pass")

    def _splice(self, x: Tensor, replace: Replace) -> Any:
        if self._features is not None and self._rest is not None:
            fmap = to_bdhw(self._features(self.model, x), self.n_prefix)
            new = replace(fmap)
            if tuple(new.shape) != tuple(fmap.shape):
                raise UsaeError(
                    f"splice: replacement map has shape {tuple(new.shape)}, the layer's is {tuple(fmap.shape)}"
                )
            return self._rest(self.model, new.to(fmap.dtype))
        hook = SpliceHook(replace, lambda y: to_bdhw(y, self.n_prefix), lambda y, new: from_bdhw(y, new, self.n_prefix))
        with hook.on(self.model.get_submodule(self.layer)):
            out = self.model(x)
        if not hook.calls:
            raise UsaeError(f"backbone {self.name}: layer {self.layer!r} did not run in the forward pass")
        return out
