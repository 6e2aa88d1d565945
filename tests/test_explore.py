"""The concept explorer: streaming top-N, heatmaps, the notebook API and the static site's files.

Pages are checked in a real browser in test_browser.py; here we check what is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_world import EVIL_LABEL, ODD_NAME, shared_world

import usae
from usae.__main__ import main
from usae.errors import UsaeError
from usae.explore import (
    explore,
    image_layout,
    image_max_codes,
    load_view,
    overlay,
    scan_top_images,
    upsample,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def site(world, tmp_path_factory) -> Path:
    labels = tmp_path_factory.mktemp("labels") / "labels.json"
    report = json.loads((world.run / "report.json").read_text())
    live = [k for k, c in enumerate(report["classes"]["labels"]) if c != "dead"]
    labels.write_text(json.dumps({str(live[0]): EVIL_LABEL}))
    out = tmp_path_factory.mktemp("site") / "explorer"
    index = explore(world.run, world.store, out, labels=labels, n_top=4, batch_images=5, progress=False)
    assert index == out / "index.html"
    return out


def _dense_image_max(sae, store):
    """Reference: every image's largest code per latent from the full dense code matrix."""
    t = store.tokens_per_image
    out = []
    for name in sae.model_names:
        z = sae.encode(name, torch.from_numpy(store.rows(name, 0, store.n_rows))).detach()
        out.append(z.view(-1, t, sae.n_latents).amax(1))  # (n_images, s)
    return torch.stack(out)  # (m, n_images, s)


def test_image_max_codes_sparse_equals_dense(world):
    sae, store = usae.load(world.run), usae.open_store(world.store)
    t = store.tokens_per_image
    name = sae.model_names[1]
    x = torch.from_numpy(store.rows(name, 0, 6 * t))
    dense = sae.encode(name, x).view(6, t, -1).amax(1)
    torch.testing.assert_close(image_max_codes(sae, name, x, t), dense)


def test_streaming_top_n_matches_dense_sort(world):
    """Merging batches of 5 images into a bounded top-4 gives the exact top-4 of the dense matrix."""
    sae, store = usae.load(world.run), usae.open_store(world.store)
    top = scan_top_images(sae, store, 4, batch_images=5, progress=False)
    ref_mis = _dense_image_max(sae, store)
    ref = ref_mis.transpose(1, 2).sort(dim=2, descending=True).values[:, :, :4]  # (m, s, 4)
    torch.testing.assert_close(top.value_msn, ref)
    filled = top.image_msn >= 0
    assert torch.equal(filled, ref > 0)
    m, s, n = torch.nonzero(filled, as_tuple=True)
    # each listed image really has that score
    torch.testing.assert_close(ref_mis[m, top.image_msn[m, s, n], s], top.value_msn[m, s, n])
    # a restricted scan returns the same rows for the chosen latents
    sub = scan_top_images(sae, store, 4, latents=[3, 1], batch_images=7, progress=False)
    torch.testing.assert_close(sub.value_msn, top.value_msn[:, [3, 1]])


def test_upsample_and_overlay():
    heat = np.zeros((2, 2), np.float32)
    heat[0, 0] = 1.0
    up = upsample(heat, 8)
    assert up.shape == (8, 8) and up[0, 0] == pytest.approx(1.0) and up[-1, -1] == pytest.approx(0.0)
    view = np.full((8, 8, 3), 90, np.uint8)
    same = np.asarray(overlay(view, np.zeros((2, 2))))
    assert np.array_equal(same, view)  # no activation: the image is untouched
    hot = np.asarray(overlay(view, heat))
    assert not np.array_equal(hot[0, 0], view[0, 0]) and np.array_equal(hot[-1, -1], view[-1, -1])


def test_top_images_and_heatmap_api(world):
    store = usae.open_store(world.store)
    layout = image_layout(store)
    sae = usae.load(world.run)
    concept = int(scan_top_images(sae, store, 1, progress=False).value_msn[0, :, 0].argmax())
    top = usae.top_images(world.run, world.store, concept, n=3)
    assert {t.model for t in top} == set(sae.model_names)
    for name in sae.model_names:
        scores = [t.score for t in top if t.model == name]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 3
    first = top[0]
    assert first.heat_hw.shape == tuple(layout.grid)
    assert first.heat_hw.max() == pytest.approx(first.score)  # the score is the largest token code
    hm = usae.heatmap(world.run, world.store, concept, first.image_id, first.model)
    np.testing.assert_allclose(hm.heat_hw, first.heat_hw, rtol=1e-5, atol=1e-6)
    # the token map is the concept's code on that image's rows, reshaped row-major onto the grid
    t = layout.tokens_per_image
    rows = store.rows(first.model, first.image_index * t, (first.image_index + 1) * t)
    z = sae.encode(first.model, torch.from_numpy(rows))[:, concept].detach().numpy()
    np.testing.assert_allclose(hm.heat_hw.reshape(-1), z, rtol=1e-5, atol=1e-6)
    assert hm.view.shape == (store.extra["view_size"],) * 2 + (3,)
    assert hm.overlay.size == (store.extra["view_size"],) * 2
    np.testing.assert_array_equal(hm.view, load_view(store, first.image_index))


def test_site_files(site, world):
    report = json.loads((world.run / "report.json").read_text())
    live = {k for k, c in enumerate(report["classes"]["labels"]) if c != "dead"}
    pages = {int(p.stem) for p in (site / "concepts").glob("*.html")}
    assert pages and pages <= set(range(report["n_latents"]))
    assert live <= pages  # a concept any model uses has fired, so it has top images and a page
    store = usae.open_store(world.store)
    n_images = len(store.image_ids)
    images = {int(p.stem) for p in (site / "images").glob("*.html")}
    assert images <= set(range(n_images)) and images == {int(p.stem) for p in (site / "img").glob("*.jpg")}
    for fig in ("r2_matrix", "firing_entropy", "classes", "cofire_rank"):
        assert (site / "figures" / f"{fig}.png").stat().st_size > 1000
    assert (site / "assets" / "explorer.js").is_file() and (site / ".usae-explorer").is_file()
    # every relative link and image on every page points at a file of the site
    for page in [site / "index.html", *(site / "concepts").glob("*.html"), *(site / "images").glob("*.html")]:
        for ref in re.findall(r'(?:href|src)="([^"#:]+)"', page.read_text()):
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: broken link {ref}"


def test_site_escapes_user_text(site):
    texts = [p.read_text() for p in site.rglob("*.html")]
    assert not any("<script>window" in t for t in texts)
    assert any("&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; co" in t for t in texts)
    assert not any("odd <b>" in t for t in texts)
    assert any("odd &lt;b&gt;&amp;amp;" in t for t in texts)
    assert ODD_NAME.startswith("odd <b>")


def test_concept_page_has_one_column_per_model_with_heatmaps(site, world):
    sae = usae.load(world.run)
    page = next((site / "concepts").glob("*.html")).read_text()
    assert page.count('class="model-col"') == len(sae.model_names)
    t = usae.open_store(world.store).tokens_per_image
    heats = re.findall(r'data-heat="([0-9a-f]*)"', page)
    assert heats and all(len(h) == 2 * t for h in heats)
    assert any(h.count("ff") >= 1 for h in heats)  # each column is scaled to its top image


def test_explore_replaces_a_site_but_not_other_directories(world, tmp_path):
    out = tmp_path / "site"
    explore(world.run, world.store, out, n_top=2, progress=False)
    (out / "stale.txt").write_text("old")
    explore(world.run, world.store, out, n_top=2, progress=False)
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(UsaeError, match="not a concept explorer site"):
        explore(world.run, world.store, other, progress=False)
    assert (other / "keep.txt").read_text() == "precious"


def test_store_without_images_is_a_clear_error(small_store, tmp_path):
    from usae.explore import image_layout as layout_of

    with pytest.raises(UsaeError, match="no image layout"):
        layout_of(usae.open_store(small_store))


def test_bad_labels_file(world, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"99999": "x"}))
    with pytest.raises(UsaeError, match="labels.json"):
        explore(world.run, world.store, tmp_path / "s", labels=bad, progress=False)
    assert not (tmp_path / "s").exists()


def test_cli_explore(world, tmp_path, capsys):
    out = tmp_path / "cli-site"
    rc = main(["explore", str(world.run), str(world.store), "--out", str(out), "--n-top", "2", "--no-progress"])
    assert rc == 0 and (out / "index.html").is_file()
    assert str(out / "index.html") in capsys.readouterr().out
    assert main(["explore", str(world.run), str(world.store), "--out", str(out), "--n-top", "0"]) == 2
