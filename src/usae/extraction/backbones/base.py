"""Vision backbones behind one small interface, and the token-grid alignment rule.

A :class:`Backbone` maps the canonical view (RGB pixels in [0, 1], shape (b, 3, S, S); see
``images.canonical_view``) to a feature map (b, d, h, w) of one layer:

* ``prepare`` resizes the view to the model's own input size (antialiased) and normalises it the way
  the model was trained (mean/std from the library's data config, channel order, 0-255 scale,
  NHWC input for graphs that want it);
* ``feature_map`` runs the model up to the chosen layer (hooks stop the forward there);
* ``tokens`` resamples the map to the store's common grid and flattens it to (b, h·w, d).

Everything is differentiable, so activation maximisation uses the same path as extraction.

**Splicing** (optional; ``evaluation/splice.py``). A backbone whose ``task`` is ``"classifier"``
(its output: logits over classes) or ``"dense"`` (its output: a map, e.g. a detector's heatmaps) can
run the whole model with the chosen layer's output replaced: ``splice_forward(pixels, replace)``
calls ``replace`` with the layer's native (b, d, h, w) map and puts the returned map where the
layer output was; prefix tokens (CLS, registers) and the other entries of a tuple output are kept
from the clean pass, and everything downstream (skip connections from earlier layers included) runs
as usual. The generic mechanism is a forward hook on the layer's module (:class:`SpliceHook`) around
the model's full forward; ``splice_check`` verifies on a probe image that the hooked module's output
is exactly the extracted feature map. Backbones with ``task = None`` say why in
``splice_unavailable_reason``.

**Alignment rule.** All models see the same square; a model's (h_i, w_i) feature map therefore tiles
that square with cells of side S/h_i. The common grid (H, W) — by default the smallest native grid
among the models — is obtained by bilinear resampling with antialiasing (``align_corners=False``,
pixel centres aligned), the rule the paper used to bring DINOv2's 16×16 patches to 14×14. So token
``k`` of every model covers the same region ``(k // W, k % W)`` of the same image.

Specs (the CLI's ``--models``): ``[ALIAS=]KIND:ID[@LAYER][?OPTIONS]`` with KIND one of ``timm``,
``hf``, ``openclip``, ``onnx``, ``fake``, or a built-in name (``effnet-lite0``, ``open-nsfw``,
``craft-vgg16``, whose weights ship inside installed packages and work offline); OPTIONS override
the preprocessing (``?size=320&mean=0,0,0&std=1,1,1&scale=255&bgr=1``; ``spec.py``, docs/backbones.md)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.errors import UsaeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Task = Literal["classifier", "dense"]
"""What a backbone's full output is, for splicing: logits over classes, or a dense map."""
Replace = Callable[[Tensor], Tensor]
"""A splice: the layer's clean native map (b, d, h, w) -> the map to put in its place (same shape)."""


class Stop(Exception):
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


def from_bdhw(y: Any, new_bdhw: Tensor, n_prefix: int | None = None, grid: tuple[int, int] | None = None) -> Any:
    """The inverse of :func:`to_bdhw`: layer output ``y`` with its spatial map replaced by ``new_bdhw``.

    Prefix tokens of a (b, n, d) sequence, the other entries of a tuple/list output and the other
    values of a dict output are kept as they were.
    """
    if isinstance(y, (tuple, list)):
        items = [from_bdhw(y[0], new_bdhw, n_prefix, grid), *y[1:]]
        if isinstance(y, list):
            return items
        return type(y)(*items) if hasattr(y, "_fields") else type(y)(items)
    if isinstance(y, dict):
        out = copy.copy(y)
        key = next(iter(y))
        out[key] = from_bdhw(y[key], new_bdhw, n_prefix, grid)
        return out
    old = to_bdhw(y, n_prefix, grid)
    if tuple(new_bdhw.shape) != tuple(old.shape):
        raise UsaeError(f"splice: replacement map has shape {tuple(new_bdhw.shape)}, the layer's is {tuple(old.shape)}")
    new_bdhw = new_bdhw.to(dtype=y.dtype, device=y.device)
    if y.ndim == 4:
        return new_bdhw
    prefix = y.shape[1] - old.shape[2] * old.shape[3]
    return torch.cat([y[:, :prefix], new_bdhw.flatten(2).transpose(1, 2)], 1)


class SpliceHook:
    """A forward hook that replaces the output of the first call of its module (later calls pass).

    ``to_map`` reads the layer output as a (b, d, h, w) map, ``replace`` maps it to its substitute,
    ``from_map`` writes the substitute back into the output's structure. ``calls`` counts the calls,
    so a layer that did not run in the forward pass is noticed.
    """

    def __init__(
        self,
        replace: Replace,
        to_map: Callable[[Any], Tensor] = to_bdhw,
        from_map: Callable[[Any, Tensor], Any] = from_bdhw,
    ) -> None:
        self.replace, self.to_map, self.from_map, self.calls = replace, to_map, from_map, 0

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        self.calls += 1
        if self.calls > 1:  # a module run twice (shared activations): the extracted output is the first
            return None
        return self.from_map(output, self.replace(self.to_map(output)))

    @contextlib.contextmanager
    def on(self, module: nn.Module) -> Iterator[SpliceHook]:
        """Registered on ``module`` for the duration of the ``with`` block."""
        handle = module.register_forward_hook(self)
        try:
            yield self
        finally:
            handle.remove()


def align(fmap_bdhw: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a feature map onto the common token grid and flatten it: (b, d, h, w) -> (b, H·W, d)."""
    if tuple(fmap_bdhw.shape[-2:]) != tuple(grid):
        fmap_bdhw = F.interpolate(fmap_bdhw, size=grid, mode="bilinear", align_corners=False, antialias=True)
    return fmap_bdhw.flatten(2).transpose(1, 2)


class Backbone(nn.Module):
    """One frozen vision model read at one layer. Subclasses implement :meth:`feature_map`.

    Attributes: ``name`` (store alias), ``spec`` (how it was asked for), ``input_hw`` (the (h, w)
    the model is fed; ``input_size`` is its larger side), ``width`` (d) and ``native_grid`` (h, w) — the last two found by a probe forward.

    Splicing (optional): ``task`` ("classifier", "dense" or None), ``head`` (maps the model's full
    output to logits or a map; None: the output as is) and ``splice_unavailable_reason`` (why not,
    when ``task`` is None). Subclasses that can splice implement :meth:`_splice`.
    """

    task: Task | None = None
    splice_unavailable_reason: str = "this kind of backbone has no task output to splice into"

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
        self.name, self.spec, self.layer = name, spec, layer
        self.input_hw = (int(input_size), int(input_size))
        self.pixel_scale, self.bgr, self.channels_last = float(pixel_scale), bool(bgr), bool(channels_last)
        self.register_buffer("mean_c", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_c", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._mean_std = (tuple(float(v) for v in mean), tuple(float(v) for v in std))  # as given, for describe()
        self.width = 0
        self.native_grid = (0, 0)
        self.head: Callable[[Any], Tensor] | None = None

    @property
    def input_size(self) -> int:
        """The larger side of the model's input (``input_hw``): the canonical view's default side."""
        return max(self.input_hw)

    def set_preprocessing(
        self,
        size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        scale: float | None = None,
        bgr: bool | None = None,
        layout: Literal["NCHW", "NHWC"] | None = None,
    ) -> Backbone:
        """Override how :meth:`prepare` feeds the model (a spec's ``?size=…&mean=…`` options); None keeps.

        ``size`` (h, w) in pixels; ``mean``/``std`` per channel R,G,B in the units of ``scale``, the
        value of a white pixel (1 or 255); ``bgr`` reverses the channels; ``layout`` NHWC feeds
        channels last. Call before :meth:`probe`.
        """
        if size is not None:
            self.input_hw = (int(size[0]), int(size[1]))
        if mean is not None:
            self.mean_c = torch.tensor(mean, dtype=torch.float32, device=self.mean_c.device).view(1, 3, 1, 1)
            self._mean_std = (tuple(float(v) for v in mean), self._mean_std[1])
        if std is not None:
            self.std_c = torch.tensor(std, dtype=torch.float32, device=self.std_c.device).view(1, 3, 1, 1)
            self._mean_std = (self._mean_std[0], tuple(float(v) for v in std))
        if scale is not None:
            self.pixel_scale = float(scale)
        if bgr is not None:
            self.bgr = bool(bgr)
        if layout is not None:
            self.channels_last = layout == "NHWC"
        return self

    def preprocessing(self) -> dict[str, Any]:
        """The resolved preprocessing, as the store records it (the spec's option names)."""
        return {
            "size": list(self.input_hw),
            "mean": list(self._mean_std[0]),
            "std": list(self._mean_std[1]),
            "scale": self.pixel_scale,
            "bgr": self.bgr,
            "layout": "NHWC" if self.channels_last else "NCHW",
            "resize": "bilinear, antialiased, from the canonical square view",
        }

    def probe(self) -> Backbone:
        """Run one blank image through the model to learn ``width`` and ``native_grid``; freeze it."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        with torch.inference_mode():
            fmap = self.forward(torch.full((1, 3, *self.input_hw), 0.5, device=self.mean_c.device))
        self.width, self.native_grid = int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3]))
        return self

    def prepare(self, pixels_b3hw: Tensor) -> Tensor:
        """Canonical view in [0, 1] -> the model's input (its size, normalisation and layout)."""
        x = pixels_b3hw
        if tuple(x.shape[-2:]) != self.input_hw:
            x = F.interpolate(x, size=self.input_hw, mode="bilinear", antialias=True)
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

    # -- splicing ------------------------------------------------------------------------------
    def _splice(self, x: Tensor, replace: Replace) -> Any:
        """The full model's raw output on a prepared input with the layer's map replaced (subclasses)."""
        raise UsaeError(self._unavailable())

    def _unavailable_prefix(self) -> str:
        return f"splice is not available for {self.spec}: "

    def _unavailable(self) -> str:
        return f"{self._unavailable_prefix()}{self.splice_unavailable_reason}"

    def _task_output(self, raw: Any) -> Tensor:
        out = self.head(raw) if self.head is not None else raw
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor):
            raise UsaeError(f"{self.spec}: the model's output is {type(out).__name__}, not a tensor; give a head")
        return out

    def splice_forward(self, pixels_b3hw: Tensor, replace: Replace) -> Tensor:
        """The task output (logits (b, classes) or a dense map (b, ...)) with the layer's map replaced.

        ``replace`` receives the clean native (b, d, h, w) map and returns the map to use instead;
        ``lambda f: f`` gives the clean output. A one-line UsaeError when ``task`` is None.
        """
        if self.task is None:
            raise UsaeError(self._unavailable())
        return self._task_output(self._splice(self.prepare(pixels_b3hw), replace))

    def splice_check(self) -> str | None:
        """None when splicing works; else the one-line reason (``"splice is not available for …: why"``).

        Runs one seeded probe image through the full model and checks that the map handed to
        ``replace`` is the extracted feature map, that the task output has a usable shape, and that
        it depends on the map at all (noise added to the map must change it).
        """
        if self.task is None:
            return self._unavailable()
        gen = torch.Generator().manual_seed(0)
        pixels = torch.rand((1, 3, self.input_size, self.input_size), generator=gen).to(self.mean_c.device)
        seen: list[Tensor] = []

        def capture(fmap_bdhw: Tensor) -> Tensor:
            seen.append(fmap_bdhw.detach().clone())
            return fmap_bdhw

        def perturb(fmap_bdhw: Tensor) -> Tensor:
            noise = torch.randn(fmap_bdhw.shape, generator=torch.Generator().manual_seed(1)).to(fmap_bdhw)
            return fmap_bdhw + noise * (fmap_bdhw.float().std() + 1.0)

        try:
            with torch.inference_mode():
                want = self.forward(pixels)
                out = self.splice_forward(pixels, capture)
                moved = self.splice_forward(pixels, perturb)
        except UsaeError as e:
            return str(e) if str(e).startswith("splice is not available") else f"{self._unavailable_prefix()}{e}"
        except Exception as e:  # the full forward pass fails with this layer swapped: not splice-able
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"{self._unavailable_prefix()}the full forward pass fails: {type(e).__name__}: {first}"
        why = None
        if not seen:
            why = "the layer did not run in the full forward pass"
        elif tuple(seen[0].shape) != tuple(want.shape):
            why = f"the full forward pass's layer map is {tuple(seen[0].shape)}, the extracted one {tuple(want.shape)}"
        else:
            tol = 1e-3 * float(want.abs().max()) + 1e-6
            err = float((seen[0].float() - want.float()).abs().max())
            if not err <= tol:
                why = f"the full forward pass's layer map differs from the extracted one (max |diff| {err:.3g})"
        if why is None and torch.equal(out, moved):
            why = "the task output does not depend on the layer's spatial map (a ViT's CLS-token head after its last block?)"
        if why is None and self.task == "classifier" and (out.ndim != 2 or out.shape[1] < 2):
            why = f"a classifier's output must be (b, classes >= 2), got {tuple(out.shape)}"
        if why is None and self.task == "dense" and out.ndim < 2:
            why = f"a dense output must be (b, ...), got {tuple(out.shape)}"
        return None if why is None else f"{self._unavailable_prefix()}{why}"

    def describe(self) -> dict[str, Any]:
        """What the store records about this backbone."""
        return {
            "name": self.name,
            "spec": self.spec,
            "layer": self.layer,
            "width": self.width,
            "input_size": self.input_size,
            "native_grid": list(self.native_grid),
            "preprocessing": self.preprocessing(),
        }
