"""ONNX graphs cut at a named tensor and converted to torch by onnx2torch.

Extraction runs the graph cut at the layer tensor (only the nodes it depends on). Splicing needs the
rest of the network: the *uncut* graph is converted too (lazily, on the first splice) and a forward
hook on the converted node that produces the layer tensor swaps it, so every other input of the
later nodes (skip connections) stays as computed. Only graphs given a ``task`` from Python (or the
built-in Open-NSFW) can splice: a bare ``onnx:`` spec does not say what the graph's output means.

A graph onnx2torch cannot convert (e.g. a Paddle export whose conv weights are ``Constant`` nodes,
which onnx2torch looks up as initializers: ``KeyError: 'conv2d_0.w_0'``) is run by onnxruntime
instead (:class:`OnnxRuntimeModule`, the same cut graph): extraction works, activation maximisation
(it needs gradients) and splicing (they need the torch graph) raise a one-line UsaeError.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from usae._io import one_line
from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone, Replace, SpliceHook, Task, from_bdhw, to_bdhw

log = logging.getLogger(__name__)

# torch deprecates indexing with a list of slices, which onnx2torch's Slice does on every forward;
# the result is still right (the converted graph matches onnxruntime), so the warning is only noise.
_INDEXING_WARNING = r"Using a non-tuple sequence for multidimensional indexing is deprecated"


@contextlib.contextmanager
def quiet_onnx2torch() -> Iterator[None]:
    """Run converted graphs without onnx2torch's PyTorch-indexing deprecation warning (only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_INDEXING_WARNING, category=UserWarning)
        yield


def _cut_graph(model: Any, tensor: str) -> Any:
    """The ONNX model whose only output is ``tensor``, keeping just the nodes it depends on."""
    import onnx

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, keep = set(), [tensor], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    return model


def read_onnx(path: Path, tensor: str | None, spec: str) -> tuple[Any, list[int]]:
    """The ONNX model at ``path`` cut at ``tensor`` (None: whole), and its one image input's shape."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise UsaeError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise UsaeError(f"{path}: expected one image input, found {len(inputs)}")
    shape = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if tensor is not None:
        if tensor not in {o for n in model.graph.node for o in n.output}:
            raise UsaeError(f"{spec}: no tensor named {tensor!r} in {path}")
        model = _cut_graph(model, tensor)
    return model, shape


def _convert(model: Any) -> nn.Module:
    from onnx2torch import convert

    with quiet_onnx2torch():
        return convert(model)


def onnx_submodel(path: Path, tensor: str | None, spec: str) -> tuple[nn.Module, list[int]]:
    """Convert an ONNX graph, cut at ``tensor`` (default: its first output), to torch; return its input shape."""
    model, shape = read_onnx(path, tensor, spec)
    try:
        return _convert(model), shape
    except Exception as e:
        raise UsaeError(f"{spec}: onnx2torch cannot convert this graph: {type(e).__name__}: {e}") from None


class OnnxRuntimeModule(nn.Module):
    """A (cut) ONNX graph run by onnxruntime, for graphs onnx2torch cannot convert; no gradients.

    ``forward`` takes the prepared input tensor and returns the graph's first output as a tensor on
    the input's device; the CUDA provider runs it when the input is on a GPU and onnxruntime has
    one, else the CPU provider. A graph with a fixed batch size gets the batch in pieces of that size.
    """

    def __init__(self, model: Any, spec: str, why: str) -> None:
        super().__init__()
        self.spec, self.why = spec, why
        inits = {t.name for t in model.graph.initializer}
        image = next(i for i in model.graph.input if i.name not in inits)
        dims = image.type.tensor_type.shape.dim
        self.input_name, self.output_name = image.name, model.graph.output[0].name
        self.fixed_batch = int(dims[0].dim_value) if len(dims) and dims[0].dim_value > 0 else None
        self._graph = model.SerializeToString()
        self._sessions: dict[tuple[str, int | None], Any] = {}
        self.session(torch.device("cpu"))  # a graph onnxruntime cannot run either fails here, at load

    @property
    def reason(self) -> str:
        return f"it runs through onnxruntime because onnx2torch cannot convert it ({self.why})"

    def session(self, device: torch.device) -> Any:
        """The onnxruntime session for ``device`` (made once per device)."""
        key = (device.type, device.index)
        if key not in self._sessions:
            try:
                import onnxruntime as ort
            except ImportError:
                raise UsaeError(
                    f"{self.spec}: onnx2torch cannot convert this graph ({self.why}); "
                    "install onnxruntime to run it as it is: pip install onnxruntime"
                ) from None
            providers: list[Any] = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            try:
                self._sessions[key] = ort.InferenceSession(self._graph, providers=providers)
            except Exception as e:
                raise UsaeError(
                    f"{self.spec}: onnx2torch cannot convert this graph ({self.why}) and onnxruntime cannot "
                    f"run it: {type(e).__name__}: {one_line(e)[:200]}"
                ) from None
        return self._sessions[key]

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            raise UsaeError(
                f"{self.spec}: activation maximisation needs gradients through a graph onnx2torch can convert; "
                f"{self.reason}"
            )
        sess = self.session(x.device)
        arr = x.detach().float().cpu().numpy()
        step = self.fixed_batch or max(len(arr), 1)
        outs = [sess.run([self.output_name], {self.input_name: arr[i : i + step]})[0] for i in range(0, len(arr), step)]
        return torch.from_numpy(np.concatenate(outs)).to(x.device)


def _runnable(path: Path, tensor: str | None, spec: str) -> tuple[nn.Module, list[int]]:
    """The graph cut at ``tensor`` as a torch module: converted by onnx2torch, else run by onnxruntime."""
    model, shape = read_onnx(path, tensor, spec)
    try:
        return _convert(model), shape
    except Exception as e:
        why = f"{type(e).__name__}: {one_line(e)[:200]}"
    module = OnnxRuntimeModule(model, spec, why)
    log.warning(
        "%s: onnx2torch cannot convert this graph (%s); it runs through onnxruntime for extraction — "
        "activation maximisation and splicing need a graph onnx2torch can convert",
        spec,
        why,
    )
    return module, shape


def onnx_full_model(path: Path, tensor: str, spec: str) -> tuple[nn.Module, str, int]:
    """The uncut graph converted to torch, the name of the submodule producing ``tensor``, and which of
    that submodule's outputs it is."""
    import onnx
    from onnx2torch import convert

    try:
        with quiet_onnx2torch():
            module = convert(onnx.load(str(path)), attach_onnx_mapping=True)
    except Exception as e:
        raise UsaeError(f"{spec}: onnx2torch cannot convert the full graph: {type(e).__name__}: {e}") from None
    for name, sub in module.named_modules():
        outputs = tuple(getattr(getattr(sub, "onnx_mapping", None), "outputs", ()) or ())
        if tensor in outputs:
            return module, name, outputs.index(tensor)
    raise UsaeError(f"{spec}: no converted node produces tensor {tensor!r}")


def load_onnx(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True, **kwargs: Any) -> Backbone:
    """An ONNX graph cut at tensor ``layer`` (image input NCHW or NHWC with 3 channels)."""
    path = Path(ident).expanduser()
    if not path.is_file():
        raise UsaeError(f"{spec}: ONNX file {path} not found")
    module, shape = _runnable(path, layer, spec)
    channels_last = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
    size = kwargs.pop("input_size", None) or (shape[1] if channels_last else shape[2] if len(shape) == 4 else 0) or 224
    feature_layout = kwargs.pop("feature_layout", "auto")
    return OnnxBackbone(module, name, spec, int(size), layer, channels_last, feature_layout, source=path, **kwargs)


class OnnxBackbone(Backbone):
    """An ONNX graph (converted by onnx2torch) whose output is the chosen intermediate tensor.

    Splicing needs ``source`` (the .onnx file, for the uncut graph), ``layer`` (the cut tensor) and
    ``task``; ``head`` maps the graph's output to logits or a map (e.g. log of softmax probabilities).
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        spec: str,
        input_size: int,
        layer: str | None,
        channels_last: bool,
        feature_layout: Literal["auto", "NCHW", "NHWC", "NLC"] = "auto",
        *,
        source: str | Path | None = None,
        task: Task | None = None,
        head: Callable[[Any], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, spec, input_size, channels_last=channels_last, layer=layer, **kwargs)
        self.model, self.feature_layout = module, feature_layout
        self.source = Path(source) if source is not None else None
        self.task, self.head = task, head
        self.full_model: nn.Module | None = None
        self._hook: tuple[str, int] | None = None
        if layer is None:
            self.task, self.splice_unavailable_reason = None, "the graph is not cut (no layer): nothing runs after it"
        elif self.source is None:
            self.task, self.splice_unavailable_reason = None, "the full graph is unknown (give source=<.onnx file>)"
        elif task is None:
            self.splice_unavailable_reason = (
                "an ONNX graph's output has no declared task; build OnnxBackbone(..., task=, head=) in Python"
            )
        if isinstance(module, OnnxRuntimeModule):
            self.task = None
            self.splice_unavailable_reason = f"splicing needs a graph onnx2torch can convert; {module.reason}"

    def _layout(self, y: Tensor) -> str:
        layout = self.feature_layout
        if layout == "auto" and y.ndim == 4:
            # square maps: (b, h, h, c) with c != h reads as NHWC; pass feature_layout when ambiguous
            layout = "NHWC" if y.shape[1] == y.shape[2] != y.shape[3] else "NCHW"
        return layout

    def _to_map(self, y: Any) -> Tensor:
        y = y[0] if isinstance(y, (tuple, list)) else y
        if self._layout(y) == "NHWC":
            y = y.permute(0, 3, 1, 2)
        return to_bdhw(y)

    def feature_map(self, x: Tensor) -> Tensor:
        with quiet_onnx2torch():
            return self._to_map(self.model(x))

    def _from_map(self, y: Tensor, new_bdhw: Tensor) -> Tensor:
        old = self._to_map(y)
        if tuple(new_bdhw.shape) != tuple(old.shape):
            raise UsaeError(
                f"splice: replacement map has shape {tuple(new_bdhw.shape)}, the layer's is {tuple(old.shape)}"
            )
        new_bdhw = new_bdhw.to(y.dtype)
        if self._layout(y) == "NHWC":
            return new_bdhw.permute(0, 2, 3, 1)
        if y.ndim == 3:  # NLC tokens: prefix tokens (a ViT's CLS) are kept from the clean pass
            return from_bdhw(y, new_bdhw)
        return new_bdhw

    def _splice(self, x: Tensor, replace: Replace) -> Any:
        if self.full_model is None:
            with torch.inference_mode(False):  # plain tensors even when first called under inference mode
                full, name, index = onnx_full_model(self.source, str(self.layer), self.spec)
                for p in full.parameters():
                    p.requires_grad_(False)
                self.full_model, self._hook = full.to(self.mean_c.device).eval(), (name, index)
        name, index = self._hook

        def from_map(y: Any, new_bdhw: Tensor) -> Any:
            if isinstance(y, (tuple, list)):
                return type(y)(self._from_map(v, new_bdhw) if i == index else v for i, v in enumerate(y))
            return self._from_map(y, new_bdhw)

        def to_map(y: Any) -> Tensor:
            return self._to_map(y[index] if isinstance(y, (tuple, list)) else y)

        hook = SpliceHook(replace, to_map, from_map)
        with hook.on(self.full_model.get_submodule(name)), quiet_onnx2torch():
            out = self.full_model(x)
        if not hook.calls:
            raise UsaeError(f"{self.spec}: the node producing {self.layer!r} did not run in the full graph")
        return out
