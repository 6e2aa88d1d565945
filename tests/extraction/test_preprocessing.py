"""Model specs: ``?OPTIONS`` preprocessing overrides (parse, errors, the pixels a model sees, metadata) and aliases."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from usae.config import ExtractConfig
from usae.errors import UsaeError
from usae.extraction.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone, parse_model_spec, parse_spec
from usae.extraction.extract import extract
from usae.extraction.images import canonical_view, load_rgb


def test_options_parse_to_known_values_and_old_specs_are_unchanged():
    m = parse_model_spec("det=onnx:/m/det.onnx@x.1?size=320&mean=0,0,0&std=1,1,1&scale=255&bgr=1&layout=nhwc")
    assert (m.alias, m.kind, m.ident, m.layer) == ("det", "onnx", "/m/det.onnx", "x.1")
    assert m.options == {
        "size": (320, 320), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "scale": 255.0, "bgr": True,
        "layout": "NHWC",
    }  # fmt: skip
    assert parse_model_spec("timm:vit@-1?size=384x640&bgr=0").options == {"size": (384, 640), "bgr": False}
    assert parse_model_spec("effnet-lite0?mean=0.5,0.5,0.5") == (
        None, "builtin", "effnet-lite0", None, {"mean": (0.5, 0.5, 0.5)},
    )  # fmt: skip
    # specs without options parse as before
    assert parse_spec("dino=timm:vit_base@-2") == ("dino", "timm", "vit_base", "-2")
    assert parse_spec("onnx:/m/a.onnx@/Relu_3_output_0") == (None, "onnx", "/m/a.onnx", "/Relu_3_output_0")
    assert parse_model_spec("fake:w16s8").options == {}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ("sise=320", "unknown option 'sise'"),
        ("size=0", "option 'size=0': size must be a positive int or HxW"),
        ("size=-3", "option 'size=-3': size must be"),
        ("size=32x", "option 'size=32x': size must be"),
        ("mean=0,0", "option 'mean=0,0': expected 3 numbers"),
        ("mean=a,b,c", "option 'mean=a,b,c': expected 3 numbers"),
        ("std=1,0,1", "option 'std=1,0,1': every std must be > 0"),
        ("std=1,1,nan", "option 'std=1,1,nan': expected 3 numbers"),
        ("scale=0&mean=0,0,0&std=1,1,1", "option 'scale=0': scale must be a positive number"),
        ("scale=255", "option scale needs mean and std too"),
        ("bgr=2", "option 'bgr=2': expected 0 or 1"),
        ("layout=hwc", "option 'layout=hwc': layout must be nchw or nhwc"),
        ("size=32&size=48", "option 'size' is given twice"),
        ("size", "option 'size': expected KEY=VALUE"),
    ],
)
def test_bad_options_are_one_line_errors_naming_option_and_spec(options, error):
    spec = f"fake:w8s4?{options}"
    with pytest.raises(UsaeError) as e:
        load_backbone(spec)
    assert error in str(e.value) and repr(spec) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("alias", ["../../evil", "/abs/victim", "DIR/victim", ".hidden", "a.b", "", "x" * 129])
def test_unsafe_aliases_are_refused_when_parsed(alias):
    spec = f"{alias}=fake:w8s4"
    with pytest.raises(UsaeError, match="model name") as e:
        parse_model_spec(spec)
    assert repr(alias) in str(e.value) and repr(spec) in str(e.value) and "\n" not in str(e.value)


def _recorder(spec: str):
    """The fake backbone of ``spec``, with the input its first conv receives recorded."""
    b = load_backbone(spec)
    seen = []
    b.model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return b, seen


def test_options_change_the_pixels_the_model_sees():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 48, generator=gen)
    looks = {}
    for opts in ("size=32", "size=48", "size=48&bgr=1", "size=48&scale=255&mean=0,0,0&std=1,1,1", "size=24x40"):
        b, seen = _recorder(f"fake:w8s4?{opts}")
        seen.clear()  # the probe's blank image
        with torch.no_grad():
            b(x)
        looks[opts] = seen[0]
    assert looks["size=32"].shape == (1, 3, 32, 32) and looks["size=48"].shape == (1, 3, 48, 48)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(looks["size=48"], (x - mean) / std, atol=1e-6)  # the default: ImageNet stats
    assert torch.allclose(looks["size=48&bgr=1"], (x.flip(1) - mean) / std, atol=1e-6)
    raw = looks["size=48&scale=255&mean=0,0,0&std=1,1,1"]
    assert torch.allclose(raw, x * 255, atol=1e-4) and raw.max() > 200
    assert looks["size=24x40"].shape == (1, 3, 24, 40)
    assert load_backbone("fake:w8s4?size=24x40").native_grid == (6, 10)


def test_fake_weights_do_not_depend_on_alias_or_options():
    a, b = load_backbone("fake:w8s4"), load_backbone("x=fake:w8s4?size=48&bgr=1")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_extraction_feeds_the_options_and_records_them_per_model(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((60, 50, 3)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    raw = "raw=fake:w8s4?size=48&scale=255&mean=0,0,0&std=1,1,1&bgr=1"
    cfg = ExtractConfig(
        images=str(folder), models=(raw, "plain=fake:w8s4i32"), out=tmp_path / "s", device="cpu",
        view_size=48, dtype="float32", progress=False,
    )  # fmt: skip
    out = extract(cfg)
    meta = json.loads((out / "metadata.json").read_text())
    recorded = {b["name"]: b for b in meta["extra"]["backbones"]}
    assert recorded["raw"]["spec"] == raw
    assert recorded["raw"]["preprocessing"] | {"resize": None} == {
        "size": [48, 48], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 255.0, "bgr": True,
        "layout": "NCHW", "resize": None,
    }  # fmt: skip
    assert recorded["plain"]["preprocessing"]["size"] == [32, 32]
    assert recorded["plain"]["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    # the store's rows of image 1 are the model's tokens of the raw BGR 0..255 view
    b, seen = _recorder(raw)
    view = canonical_view(load_rgb(folder / "im1.png"), 48)
    pixels = torch.from_numpy(view.copy()).permute(2, 0, 1)[None].float() / 255
    seen.clear()
    with torch.no_grad():
        want = b.tokens(pixels, tuple(meta["grid"]))[0].numpy()
    assert torch.equal(seen[0], torch.from_numpy(view.copy()).permute(2, 0, 1)[None].flip(1).float())
    t = meta["tokens_per_image"]
    from usae.data.store import open_store

    assert np.allclose(open_store(out).rows("raw", t, 2 * t), want, atol=1e-4)
