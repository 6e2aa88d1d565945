"""Vision backbones behind one small interface, and the token-grid alignment rule.

A :class:`Backbone` maps the canonical view (RGB pixels in [0, 1], shape (b, 3, S, S); see
``images.canonical_view``) to a feature map (b, d, h, w) of one layer:

* ``prepare`` resizes the view to the model's own input size (antialiased) and normalises it the way
  the model was trained (mean/std from the library's data config, channel order, 0-255 scale,
  NHWC input for graphs that want it);
* ``feature_map`` runs the model up to the chosen layer (hooks stop the forward there);
* ``tokens`` resamples the map to the store's common grid and flattens it to (b, h·w, d).

Everything is differentiable, so activation maximisation uses the same path as extraction.

**Alignment rule.** All models see the same square; a model's (h_i, w_i) feature map therefore tiles
that square with cells of side S/h_i. The common grid (H, W) — by default the smallest native grid
among the models — is obtained by bilinear resampling with antialiasing (``align_corners=False``,
pixel centres aligned), the rule the paper used to bring DINOv2's 16×16 patches to 14×14. So token
``k`` of every model covers the same region ``(k // W, k % W)`` of the same image.

Specs (the CLI's ``--models``): ``[ALIAS=]KIND:ID[@LAYER]`` with KIND one of ``timm``, ``hf``,
``openclip``, ``onnx``, ``fake``, or a built-in name (``effnet-lite0``, ``open-nsfw``, ``craft-vgg16``,
whose weights ship inside installed packages and work offline).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.errors import UsaeError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ALIAS_BAD = re.compile(r"[^A-Za-z0-9_-]+")  # no ".": model names key nn.ModuleDicts


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the wanted layer has run."""

    def __init__(self, value: Any) -> None:
        self.value = value


def to_bdhw(y: Any, n_prefix: int | None = None, grid: tuple[int, int] | None = None) -> Tensor:
    """A layer's output as a (b, d, h, w) map: CNN maps pass through, (b, n, d) tokens lose prefix tokens.

    For token sequences the grid is ``grid`` or the largest square that fits; tokens before the
    last h·w (CLS, registers) are dropped unless ``n_prefix`` says how many there are.
    """
    if isinstance(y, (tuple, list)):
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
    if not isinstance(y, Tensor):
        raise UsaeError(f"layer output is {type(y).__name__}, not a tensor")
    if y.ndim == 4:
        return y
    if y.ndim != 3:
        raise UsaeError(f"layer output has shape {tuple(y.shape)}; expected (b, d, h, w) or (b, tokens, d)")
    n = y.shape[1]
    if grid is None:
        side = int((n - (n_prefix or 0)) ** 0.5)
        grid = (side, side)
    h, w = grid
    prefix = n - h * w if n_prefix is None else n_prefix
    if prefix < 0 or prefix + h * w != n:
        raise UsaeError(f"cannot lay {n} tokens on a {h}x{w} grid with {prefix} prefix tokens")
    return y[:, prefix:].reshape(y.shape[0], h, w, y.shape[2]).permute(0, 3, 1, 2)


def align(fmap_bdhw: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a feature map onto the common token grid and flatten it: (b, d, h, w) -> (b, H·W, d)."""
    if tuple(fmap_bdhw.shape[-2:]) != tuple(grid):
        fmap_bdhw = F.interpolate(fmap_bdhw, size=grid, mode="bilinear", align_corners=False, antialias=True)
    return fmap_bdhw.flatten(2).transpose(1, 2)


class Backbone(nn.Module):
    """One frozen vision model read at one layer. Subclasses implement :meth:`feature_map`.

    Attributes: ``name`` (store alias), ``spec`` (how it was asked for), ``input_size`` (square side
    the model is fed), ``width`` (d) and ``native_grid`` (h, w) — the last two found by a probe forward.
    """

    def __init__(
        self,
        name: str,
        spec: str,
        input_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        *,
        pixel_scale: float = 1.0,
        bgr: bool = False,
        channels_last: bool = False,
        layer: str | int | None = None,
    ) -> None:
        super().__init__()
        self.name, self.spec, self.input_size, self.layer = name, spec, int(input_size), layer
        self.pixel_scale, self.bgr, self.channels_last = float(pixel_scale), bool(bgr), bool(channels_last)
        self.register_buffer("mean_c", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_c", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.width = 0
        self.native_grid = (0, 0)

    def probe(self) -> Backbone:
        """Run one blank image through the model to learn ``width`` and ``native_grid``; freeze it."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        with torch.inference_mode():
            fmap = self.forward(torch.full((1, 3, self.input_size, self.input_size), 0.5, device=self.mean_c.device))
        self.width, self.native_grid = int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3]))
        return self

    def prepare(self, pixels_b3hw: Tensor) -> Tensor:
        """Canonical view in [0, 1] -> the model's input (its size, normalisation and layout)."""
        x = pixels_b3hw
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        if self.bgr:
            x = x.flip(1)
        x = (x * self.pixel_scale - self.mean_c) / self.std_c
        return x.permute(0, 2, 3, 1) if self.channels_last else x

    def feature_map(self, x: Tensor) -> Tensor:
        """The chosen layer's output for a prepared input, as (b, d, h, w)."""
        raise NotImplementedError

    def forward(self, pixels_b3hw: Tensor) -> Tensor:
        return self.feature_map(self.prepare(pixels_b3hw))

    def tokens(self, pixels_b3hw: Tensor, grid: tuple[int, int]) -> Tensor:
        """(b, 3, S, S) pixels in [0, 1] -> (b, H·W, d) tokens on the common grid (row-major)."""
        return align(self.forward(pixels_b3hw), grid)

    def describe(self) -> dict[str, Any]:
        """What the store records about this backbone."""
        return {
            "name": self.name,
            "spec": self.spec,
            "layer": self.layer,
            "width": self.width,
            "input_size": self.input_size,
            "native_grid": list(self.native_grid),
        }


class TorchBackbone(Backbone):
    """Any ``torch.nn.Module`` read at a named submodule (or through a custom function).

    ``layer`` is a dotted module path (``"layer3"``, ``"blocks.7"``); its output is captured with a
    forward hook that stops the forward pass there. ``features`` instead takes a callable
    ``(module, x) -> output``. Token-sequence outputs lose their prefix tokens (see :func:`to_bdhw`).
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
        self.model, self._features, self.n_prefix = module, features, n_prefix

    def feature_map(self, x: Tensor) -> Tensor:
        if self._features is not None:
            return to_bdhw(self._features(self.model, x), self.n_prefix)

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            raise _Stop(output)

        handle = self.model.get_submodule(self.layer).register_forward_hook(stop)
        try:
            self.model(x)
        except _Stop as s:
            return to_bdhw(s.value, self.n_prefix)
        finally:
            handle.remove()
        raise UsaeError(f"backbone {self.name}: layer {self.layer!r} did not run in the forward pass")


class TimmBackbone(Backbone):
    """A timm model read with ``forward_intermediates`` at block ``layer`` (default: the last).

    Prefix tokens (CLS, registers) are dropped by timm; preprocessing comes from the model's data
    config (input size, mean, std; the crop is ours: the canonical square).
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

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True, stop_early=True)
        return to_bdhw(out[0])


class HFBackbone(Backbone):
    """A Hugging Face ``transformers`` vision model read at ``hidden_states[layer]``."""

    def __init__(self, model: nn.Module, name: str, spec: str, layer: int, input_size: int, mean: Any, std: Any) -> None:
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


class OpenClipBackbone(Backbone):
    """An open_clip image tower read with its ``forward_intermediates`` at block ``layer``."""

    def __init__(self, visual: nn.Module, name: str, spec: str, layer: int, input_size: int, mean: Any, std: Any) -> None:
        super().__init__(name, spec, input_size, tuple(mean), tuple(std), layer=int(layer))
        if not hasattr(visual, "forward_intermediates"):
            raise UsaeError(f"{spec}: this open_clip tower has no forward_intermediates")
        self.model = visual

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True, stop_early=True)
        return to_bdhw(out["image_intermediates"][0])


# ---------------------------------------------------------------------------------------------
# loaders by spec


def _default_alias(ident: str, layer: str | None) -> str:
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
        raise UsaeError(f"model spec {spec!r}: expected [ALIAS=]KIND:ID[@LAYER], e.g. timm:vit_small_patch14_dinov2.lvd142m@-1")
    return alias or None, kind, ident, layer or None


def _int_layer(layer: str | None, spec: str, default: int = -1) -> int:
    if layer is None:
        return default
    try:
        return int(layer)
    except ValueError:
        raise UsaeError(f"model spec {spec!r}: layer {layer!r} must be a block index (e.g. -1, 11)") from None


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while loading if its endpoint cannot be reached.

    Without this, a machine with no network spends about a minute in connection retries before
    failing; offline mode answers from the local cache at once (or fails at once when it is empty).
    """
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        yield
        return
    if hub.HF_HUB_OFFLINE:
        yield
        return
    host = urllib.parse.urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    log.info("%s is unreachable: loading weights from the local cache only", host)
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _offline_error(spec: str, e: Exception) -> UsaeError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UsaeError(
        f"{spec}: could not load pretrained weights (needs a download or a local copy; offline here?): "
        f"{type(e).__name__}: {first[:200]}"
    )


def load_timm(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True, **kwargs: Any) -> Backbone:
    import timm

    try:
        with _hub_offline_if_unreachable():
            model = timm.create_model(ident, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsaeError(f"{spec}: timm has no model {ident!r}") from None
        raise _offline_error(spec, e) from None
    except Exception as e:  # hub errors (offline, gated, missing file) come in many types
        raise _offline_error(spec, e) from None
    return TimmBackbone(model, name, spec, _int_layer(layer, spec))


def load_hf(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    import transformers

    try:
        with _hub_offline_if_unreachable():
            if pretrained:
                model = transformers.AutoModel.from_pretrained(ident)
            else:
                model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(ident))
    except Exception as e:
        raise _offline_error(spec, e) from None
    model = getattr(model, "vision_model", model)  # CLIP / SigLIP pairs: keep the image tower
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    try:
        with _hub_offline_if_unreachable():
            proc = transformers.AutoImageProcessor.from_pretrained(ident)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        s = proc.crop_size if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None) else proc.size
        size = int(s.get("height") or s.get("shortest_edge") or 224) if isinstance(s, dict) else int(s)
    except Exception:  # no processor config saved: the model config's image size, ImageNet stats
        size = int(getattr(model.config, "image_size", 224) or 224)
    return HFBackbone(model, name, spec, _int_layer(layer, spec), size, mean, std)


def load_openclip(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    try:
        import open_clip
    except ImportError:
        raise UsaeError(f"{spec}: needs the open_clip package: pip install 'usae[openclip]'") from None
    arch, _, tag = ident.partition("/")
    try:
        with _hub_offline_if_unreachable():
            model = open_clip.create_model(arch, pretrained=(tag or None) if pretrained else None)
    except Exception as e:
        raise _offline_error(spec, e) from None
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenClipBackbone(visual, name, spec, _int_layer(layer, spec), int(size), mean, std)


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


def _onnx_submodel(path: Path, tensor: str | None, spec: str) -> tuple[nn.Module, list[int]]:
    """Convert an ONNX graph, cut at ``tensor`` (default: its first output), to torch; return its input shape."""
    import onnx
    from onnx2torch import convert

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
    try:
        return convert(model), shape
    except Exception as e:
        raise UsaeError(f"{spec}: onnx2torch cannot convert this graph: {type(e).__name__}: {e}") from None


def load_onnx(
    ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True, **kwargs: Any
) -> Backbone:
    """An ONNX graph cut at tensor ``layer`` (image input NCHW or NHWC with 3 channels)."""
    path = Path(ident).expanduser()
    if not path.is_file():
        raise UsaeError(f"{spec}: ONNX file {path} not found")
    module, shape = _onnx_submodel(path, layer, spec)
    channels_last = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
    size = kwargs.pop("input_size", None) or (shape[1] if channels_last else shape[2] if len(shape) == 4 else 0) or 224
    feature_layout = kwargs.pop("feature_layout", "auto")
    return OnnxBackbone(module, name, spec, int(size), layer, channels_last, feature_layout, **kwargs)


class OnnxBackbone(Backbone):
    """An ONNX graph (converted by onnx2torch) whose output is the chosen intermediate tensor."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        spec: str,
        input_size: int,
        layer: str | None,
        channels_last: bool,
        feature_layout: Literal["auto", "NCHW", "NHWC", "NLC"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, spec, input_size, channels_last=channels_last, layer=layer, **kwargs)
        self.model, self.feature_layout = module, feature_layout

    def feature_map(self, x: Tensor) -> Tensor:
        y = self.model(x)
        y = y[0] if isinstance(y, (tuple, list)) else y
        layout = self.feature_layout
        if layout == "auto" and y.ndim == 4:
            # square maps: (b, h, h, c) with c != h reads as NHWC; pass feature_layout when ambiguous
            layout = "NHWC" if y.shape[1] == y.shape[2] != y.shape[3] else "NCHW"
        if layout == "NHWC":
            y = y.permute(0, 3, 1, 2)
        return to_bdhw(y)


def load_fake(ident: str, name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """``fake:w16s8[i32]`` — a seeded random CNN (width 16, stride 8, input 32): for tests and dry runs."""
    m = re.fullmatch(r"w(\d+)s(\d+)(?:i(\d+))?", ident)
    if not m:
        raise UsaeError(f"{spec}: fake backbones are named like fake:w16s8 or fake:w16s8i64 (width, stride, input)")
    width, stride, size = int(m[1]), int(m[2]), int(m[3] or 64)
    gen = torch.Generator().manual_seed(zlib.crc32(spec.split("=")[-1].encode()))
    net = nn.Sequential(nn.Conv2d(3, width, stride, stride), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    return TorchBackbone(net, name, size, features=lambda mod, x: mod(x), spec=spec)


LOADERS: dict[str, Callable[..., Backbone]] = {
    "timm": load_timm,
    "hf": load_hf,
    "openclip": load_openclip,
    "onnx": load_onnx,
    "fake": load_fake,
}


def load_backbone(spec: str, pretrained: bool = True, device: str | torch.device = "cpu") -> Backbone:
    """Build, freeze and probe the backbone a spec names (see the module docstring)."""
    from usae import zoo

    alias, kind, ident, layer = parse_spec(spec)
    name = alias or (ident if kind == "builtin" and layer is None else _default_alias(ident, layer))
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
