"""ONNX graphs onnx2torch cannot convert run through onnxruntime; onnx2torch's indexing warning stays local."""

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from usae.errors import UsaeError
from usae.extraction.backbones import load_backbone
from usae.extraction.backbones.onnx import OnnxRuntimeModule

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _paddle_like(path: Path, batch: int | str = "N") -> None:
    """Conv -> Relu ('feat') -> Conv, as Paddle exports it: weights and bias are Constant nodes, not initializers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def const(name: str, shape: tuple[int, ...]):
        value = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        return helper.make_node("Constant", [], [name], value=value)

    nodes = [
        const("conv2d_0.w_0", (4, 3, 3, 3)),
        const("conv2d_0.b_0", (4,)),
        helper.make_node("Conv", ["image", "conv2d_0.w_0", "conv2d_0.b_0"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["feat"]),
        const("conv2d_1.w_0", (2, 4, 1, 1)),
        helper.make_node("Conv", ["feat", "conv2d_1.w_0"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "paddle_like", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _ort_tensor(path: Path, tensor: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime's own value of ``tensor``: the full graph with that tensor added as an output."""
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([tensor], {"image": x[i : i + 1]})[0] for i in range(len(x))])


def test_onnx2torch_really_fails_on_constant_weights(tmp_path):
    # the Paddle failure: onnx2torch's Conv reads its weight from graph.initializers by name
    from onnx2torch import convert

    _paddle_like(tmp_path / "p.onnx")
    with pytest.raises(KeyError, match="conv2d_0.w_0"):
        convert(onnx.load(str(tmp_path / "p.onnx")))


@pytest.mark.parametrize("batch", ["N", 1])
def test_unconvertible_graph_runs_through_onnxruntime_and_matches_it(tmp_path, caplog, batch):
    path = tmp_path / "p.onnx"
    _paddle_like(path, batch)
    with caplog.at_level(logging.INFO):
        b = load_backbone(f"det=onnx:{path}@feat?size=16")
    said = [r.getMessage() for r in caplog.records if "onnxruntime" in r.getMessage()]
    assert len(said) == 1 and "KeyError" in said[0] and "maximisation" in said[0] and "splicing" in said[0]
    assert isinstance(b.model, OnnxRuntimeModule)
    assert (b.width, b.native_grid, b.input_hw) == (4, (8, 8), (16, 16))
    x = torch.rand(3, 3, 16, 16)  # 3 images: a batch-1 graph gets them one at a time
    with torch.no_grad():
        prepared = b.prepare(x)
        got = b.feature_map(prepared).numpy()
    want = _ort_tensor(path, "feat", prepared.numpy())
    assert got.shape == want.shape == (3, 4, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_onnxruntime_backbone_refuses_maximisation_and_splicing_in_one_line(tmp_path):
    path = tmp_path / "p.onnx"
    _paddle_like(path)
    b = load_backbone(f"onnx:{path}@feat?size=16")
    pixels = torch.rand(1, 3, 16, 16, requires_grad=True)  # what activation maximisation optimises
    with pytest.raises(UsaeError, match="maximisation needs gradients .* onnxruntime") as e:
        b.tokens(pixels, (4, 4))
    assert "\n" not in str(e.value)
    with pytest.raises(UsaeError, match="splicing needs a graph onnx2torch can convert") as e:
        b.splice_forward(torch.rand(1, 3, 16, 16), lambda f: f)
    assert "\n" not in str(e.value) and "onnxruntime" in str(e.value)
    assert "onnxruntime" in (b.splice_check() or "")


def _sliced(path: Path) -> None:
    """Conv -> Slice (channels 0..2, named 'feat'): onnx2torch's Slice indexes with a list of slices."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 2, 2), np.float32), "w")
    ints = {n: numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s", [0]), ("e", [2]), ("a", [1]))}
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Slice", ["c", "s", "e", "a"], ["feat"]),
    ]
    graph = helper.make_graph(
        nodes, "sliced", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, None)], [w, *ints.values()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_onnx2torch_indexing_warning_is_filtered_where_the_model_runs_only(tmp_path):
    _sliced(tmp_path / "s.onnx")
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = load_backbone(f"onnx:{tmp_path / 's.onnx'}")
        with torch.no_grad():
            b.tokens(torch.rand(2, 3, 16, 16), (4, 4))
        assert b.width == 2
        assert not [w for w in caught if "multidimensional indexing" in str(w.message)]
        # the same converted module run outside the backbone still warns: the filter is not global
        with torch.no_grad():
            b.model(torch.rand(1, 3, 16, 16))
        assert [w for w in caught if "multidimensional indexing" in str(w.message)]
    assert warnings.filters == before


def test_store_rows_of_an_unconvertible_graph_are_onnxruntime_values(tmp_path):
    from PIL import Image

    from usae.config import ExtractConfig
    from usae.data.store import open_store
    from usae.extraction.extract import extract
    from usae.extraction.images import canonical_view, load_rgb

    path = tmp_path / "p.onnx"
    _paddle_like(path)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    cfg = ExtractConfig(
        images=str(tmp_path / "imgs"), models=(f"det=onnx:{path}@feat?size=16",), out=tmp_path / "s",
        device="cpu", dtype="float32", progress=False,
    )  # fmt: skip
    store = open_store(extract(cfg))
    assert list(store.grid) == [8, 8]
    views = [canonical_view(load_rgb(tmp_path / "imgs" / f"{i}.png"), 16) for i in range(3)]
    pixels = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255
    b = load_backbone(f"det=onnx:{path}@feat?size=16")
    want_bdhw = _ort_tensor(path, "feat", b.prepare(pixels).numpy())
    want = want_bdhw.transpose(0, 2, 3, 1).reshape(-1, 4)  # image j, token k = row j*64 + k
    np.testing.assert_allclose(store.rows("det", 0, len(store)), want, rtol=1e-5, atol=1e-6)
