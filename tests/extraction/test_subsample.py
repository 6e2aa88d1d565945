"""Token subsampling at extraction: paired rows, recorded positions, budget, resume, and the readers
that map a row back to its token (pixel labels, explorer heatmaps, splicing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from usae.config import ExtractConfig, SAEConfig
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.extraction.backbones import TorchBackbone
from usae.extraction.extract import extract, parts_dir_for, val_store_path
from usae.extraction.images import image_layout
from usae.extraction.subsample import positions_of, token_budget, token_positions
from usae.model.sae import UniversalSAE

FAKES = ("fake:w16s8", "fake:w8s4i32")
T = 64  # the fakes' common 8x8 grid


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(7):
        arr = (rng.random((40 + i % 3, 48, 3)) * 255).astype(np.uint8)
        (folder / f"sub{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(arr).save(folder / f"sub{i % 2}" / f"img{i:03d}.png")
    return folder


def _cfg(images: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(images=str(images), models=FAKES, out=out, device="cpu", images_per_part=3, batch_size=2)
    return ExtractConfig(**(base | {"progress": False} | kw))


@pytest.fixture(scope="module")
def stores(images, tmp_path_factory):
    """(every token, 5 tokens per image) stores of the same images."""
    root = tmp_path_factory.mktemp("stores")
    full = open_store(extract(_cfg(images, root / "full")))
    sub = open_store(extract(_cfg(images, root / "sub", tokens_per_image=5, token_seed=3)))
    return full, sub


def test_the_draw_is_the_documented_pure_function_of_seed_and_image_id():
    pos = token_positions(0, "a/b.png", 196, 16)
    assert pos.shape == (16,) and (np.diff(pos) > 0).all() and pos.min() >= 0 and pos.max() < 196
    assert np.array_equal(pos, token_positions(0, "a/b.png", 196, 16))  # no hidden state
    assert not np.array_equal(pos, token_positions(1, "a/b.png", 196, 16))
    assert not np.array_equal(pos, token_positions(0, "a/c.png", 196, 16))
    # the rule as docs/store.md states it, written out independently
    words = np.frombuffer(hashlib.sha256(b"0\na/b.png").digest(), dtype="<u4").tolist()
    raw = np.random.PCG64(np.random.SeedSequence(words)).random_raw(196)
    assert np.array_equal(pos, np.sort(np.argsort(raw)[:16]))
    # every token is drawn about equally often (uniform over the grid)
    counts = np.bincount(positions_of([str(i) for i in range(2000)], 0, 49, 7).ravel(), minlength=49)
    assert counts.min() > 0.75 * 2000 * 7 / 49 and counts.max() < 1.25 * 2000 * 7 / 49


def test_the_row_budget_rule():
    chosen = list(range(100))
    assert token_budget(chosen, 64, None, None) == (chosen, None)
    assert token_budget(chosen, 64, 64, None) == (chosen, None)  # the whole grid: an ordinary store
    assert token_budget(chosen, 64, 8, None) == (chosen, 8)
    assert token_budget(chosen, 64, None, 1000) == (chosen, 10)  # every image, as many tokens as fit
    assert token_budget(chosen, 64, None, 10**6) == (chosen, None)
    few = token_budget(chosen, 64, 8, 400)  # N given: fewer images, spread evenly
    assert few.tokens_per_image == 8 and len(few.chosen) == 50 and few.chosen[0] == 0 and few.chosen[-1] == 99
    one = token_budget(chosen, 64, None, 30)  # under one token per image: one token of 30 images
    assert one.tokens_per_image == 1 and len(one.chosen) == 30
    with pytest.raises(UsaeError, match="--max-rows 5 is less than"):
        token_budget(chosen, 64, 8, 5)


def test_recorded_positions_are_the_rows_of_the_full_store(stores):
    full, sub = stores
    meta = sub.metadata
    assert meta["schema_version"] == 2 and full.metadata["schema_version"] == 1
    assert sub.tokens_per_image == 5 and sub.grid == full.grid == (8, 8) and sub.image_ids == full.image_ids
    assert sub.n_rows == 7 * 5 and sub.subsampled and not full.subsampled and full.positions is None
    assert meta["token_positions"]["file"] == "token_positions.npy" and meta["token_positions"]["shape"] == [7, 5]
    assert meta["extra"]["token_sampling"]["seed"] == 3 and meta["extra"]["token_sampling"]["grid_tokens"] == T
    pos = sub.positions
    assert np.array_equal(pos, positions_of(sub.image_ids, 3, T, 5))
    rows = (np.arange(7)[:, None] * T + pos).reshape(-1)  # the same rows as slicing the full store
    for name in full.model_names:
        assert np.array_equal(sub.rows(name, 0, sub.n_rows), full.take(name, rows))
    sub.verify()
    layout = image_layout(sub)
    assert layout.tokens_per_image == 5 and np.array_equal(layout.positions, pos)
    assert image_layout(full).positions is None


def test_rows_stay_paired_a_linear_map_of_another_model_reconstructs_exactly(images, tmp_path):
    """Model b is a fixed channel mix of model a, so b's row r is W @ a's row r only if the rows are paired."""
    torch.manual_seed(0)
    mix = nn.Conv2d(3, 5, 1)
    w_dc, bias_d = mix.weight.detach()[:, :, 0, 0].numpy(), mix.bias.detach().numpy()
    backbones = [
        TorchBackbone(nn.AvgPool2d(8), "a", 64, features=lambda m, x: m(x), mean=(0, 0, 0), std=(1, 1, 1)),
        TorchBackbone(
            nn.Sequential(nn.AvgPool2d(8), mix), "b", 64, features=lambda m, x: m(x), mean=(0, 0, 0), std=(1, 1, 1)
        ),
    ]
    cfg = ExtractConfig(
        images=str(images), models=(), out=tmp_path / "s", device="cpu", dtype="float32",
        tokens_per_image=3, images_per_part=2, batch_size=3, progress=False,
    )  # fmt: skip
    store = open_store(extract(cfg, backbones))
    a, b = store.rows("a", 0, store.n_rows), store.rows("b", 0, store.n_rows)
    assert store.n_rows == 7 * 3
    assert np.allclose(b, a @ w_dc.T + bias_d, atol=1e-5)
    assert not np.allclose(b[1:], a[:-1] @ w_dc.T + bias_d, atol=1e-3)  # a shifted pairing would not


def test_held_out_twin_is_subsampled_the_same_way(images, stores, tmp_path):
    full, _ = stores
    train = open_store(extract(_cfg(images, tmp_path / "s", tokens_per_image=4, val_fraction=0.3)))
    val = open_store(val_store_path(train.path))
    assert val.subsampled and val.tokens_per_image == 4 and len(val.image_ids) >= 1
    for store in (train, val):
        assert np.array_equal(store.positions, positions_of(store.image_ids, 0, T, 4))
        j_full = np.array([full.image_ids.index(i) for i in store.image_ids])
        rows = (j_full[:, None] * T + store.positions).reshape(-1)
        assert np.array_equal(store.rows("w16s8", 0, store.n_rows), full.take("w16s8", rows))


def test_max_rows_budget_bounds_the_store(images, tmp_path):
    store = open_store(extract(_cfg(images, tmp_path / "a", max_rows=30)))  # 7 images: 4 tokens each
    assert store.tokens_per_image == 4 and len(store.image_ids) == 7
    store = open_store(extract(_cfg(images, tmp_path / "b", max_rows=30, tokens_per_image=10)))
    assert store.tokens_per_image == 10 and len(store.image_ids) == 3
    store = open_store(extract(_cfg(images, tmp_path / "c", tokens_per_image=T)))  # every token: schema 1
    assert not store.subsampled and store.metadata["schema_version"] == 1 and store.n_rows == 7 * T


def test_resume_with_subsampling_equals_a_clean_run(images, tmp_path, monkeypatch):
    import usae.extraction.extract as ex

    clean = extract(_cfg(images, tmp_path / "clean", tokens_per_image=6))
    real_write, calls = ex._write_part, []

    def crash_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        real_write(*args, **kwargs)

    monkeypatch.setattr(ex, "_write_part", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(images, tmp_path / "resumed", tokens_per_image=6))
    monkeypatch.setattr(ex, "_write_part", real_write)
    with pytest.raises(UsaeError, match="different settings.*token_seed"):
        extract(_cfg(images, tmp_path / "resumed", tokens_per_image=6, token_seed=1))
    resumed = extract(_cfg(images, tmp_path / "resumed", tokens_per_image=6))
    a, b = (json.loads((p / "metadata.json").read_text()) for p in (clean, resumed))
    assert a["hash"] == b["hash"] and a["token_positions"] == b["token_positions"] and a["stats"] == b["stats"]
    assert not parts_dir_for(resumed).exists()


def test_pixel_labels_are_read_at_the_recorded_positions(stores):
    from usae.evaluation.naming.label import store_pixel_labels

    full, sub = stores
    rows = (np.arange(len(sub.image_ids))[:, None] * T + sub.positions).reshape(-1)
    px_full, px_sub = store_pixel_labels(full, progress=False), store_pixel_labels(sub, progress=False)
    assert px_sub.labels_tl.shape == (sub.n_rows, len(px_full.names))
    assert np.array_equal(px_sub.labels_tl, px_full.labels_tl[rows])
    assert np.array_equal(px_sub.flat_t, px_full.flat_t[rows])


def test_explorer_heatmaps_show_only_the_sampled_tokens(stores):
    from usae.explorer.concepts import heatmap, iter_image_codes, top_images

    full, sub = stores
    sae = UniversalSAE(SAEConfig(widths=dict(full.widths), n_latents=8, k=4), torch.Generator().manual_seed(0))
    codes = {}
    for store in (full, sub):
        codes[store is sub] = [heatmap(sae, store, c, 2, "w16s8").heat_hw.reshape(-1) for c in range(8)]
    pos = sub.positions[2]
    off = np.setdiff1d(np.arange(T), pos)
    for c in range(8):
        assert np.allclose(codes[True][c][pos], codes[False][c][pos], atol=1e-6)
        assert np.isnan(codes[True][c][off]).all()
    concept = int(np.argmax([np.nanmax(h) for h in codes[True]]))
    for top in top_images(sae, sub, concept, n=3):
        want = heatmap(sae, full, concept, top.image_index, top.model).heat_hw.reshape(-1)
        got, kept = top.heat_hw.reshape(-1), sub.positions[top.image_index]
        assert np.allclose(got[kept], want[kept], atol=1e-6) and np.isnan(np.delete(got, kept)).all()
        assert top.score == pytest.approx(float(np.nanmax(got)), rel=1e-5)
    (chunk, z), *_ = iter_image_codes(sae, sub, np.array([2, 5]))  # what the site draws: zeros off the sample
    assert z["w8s4i32"].shape == (2, T, 8) and (z["w8s4i32"][0, torch.from_numpy(off)] == 0).all()
    assert heatmap(sae, sub, concept, 2).overlay.size == heatmap(sae, full, concept, 2).overlay.size


def test_splicing_refuses_a_subsampled_store_naming_the_flag(stores):
    from usae.evaluation.fidelity.splice import _check_layout

    full, sub = stores
    _check_layout(full)
    with pytest.raises(UsaeError, match="--tokens-per-image") as info:
        _check_layout(sub)
    assert "\n" not in str(info.value)


def test_a_subsampled_store_refuses_damaged_positions(stores, tmp_path):
    import shutil

    _, sub = stores
    copy = tmp_path / "copy"
    shutil.copytree(sub.path, copy)
    np.save(copy / "token_positions.npy", sub.positions.astype("<i4")[:, ::-1].copy())
    with pytest.raises(UsaeError, match="not strictly increasing"):
        _ = open_store(copy).positions
    (copy / "token_positions.npy").unlink()
    with pytest.raises(UsaeError, match="token positions missing"):
        open_store(copy)
    np.save(copy / "token_positions.npy", np.sort((sub.positions + 1) % T, axis=1).astype("<i4"))
    with pytest.raises(UsaeError, match="token_positions.npy: contents changed"):
        open_store(copy, verify=True)
