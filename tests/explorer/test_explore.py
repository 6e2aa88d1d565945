"""The concept explorer: streaming top-N, heatmaps, the notebook API and the static site's files.

Pages are checked in a real browser in test_browser.py; here we check what is written.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from explore_world import EVIL_LABEL, ODD_NAME, scored_labels, shared_world

import usae
from usae.__main__ import main
from usae.config import ExploreConfig
from usae.errors import UsaeError
from usae.evaluation.naming.label import ARTIFACT_TOP, artifact_marks
from usae.evaluation.report.templating import format_number
from usae.explorer.concepts import (
    image_layout,
    image_max_codes,
    load_view,
    overlay,
    scan_top_images,
    upsample,
)
from usae.explorer.label_pages import label_slugs, read_concept_labels
from usae.explorer.site import explore
from usae.run import find_report

UNICODE_LABEL = "ciel/bleu clair · é"


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
    index = explore(ExploreConfig(world.run, world.store, out, labels=labels, n_top=4, batch_images=5, progress=False))
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
    explore(ExploreConfig(world.run, world.store, out, n_top=2, progress=False))
    (out / "stale.txt").write_text("old")
    explore(world.run, world.store, out, n_top=2, progress=False)  # the keyword form: the same config
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(UsaeError, match="not a concept explorer site"):
        explore(ExploreConfig(world.run, world.store, other, progress=False))
    assert (other / "keep.txt").read_text() == "precious"


def test_store_without_images_is_a_clear_error(small_store, tmp_path):
    from usae.explorer.concepts import image_layout as layout_of

    with pytest.raises(UsaeError, match="no image layout"):
        layout_of(usae.open_store(small_store))


def test_bad_labels_file(world, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"99999": "x"}))
    with pytest.raises(UsaeError, match="labels.json"):
        explore(ExploreConfig(world.run, world.store, tmp_path / "s", labels=bad, progress=False))
    assert not (tmp_path / "s").exists()


def test_cli_explore(world, tmp_path, capsys):
    out = tmp_path / "cli-site"
    rc = main(["explore", str(world.run), str(world.store), "--out", str(out), "--n-top", "2", "--no-progress"])
    assert rc == 0 and (out / "index.html").is_file()
    assert str(out / "index.html") in capsys.readouterr().out
    assert main(["explore", str(world.run), str(world.store), "--out", str(out), "--n-top", "0"]) == 2


# -- labels: labels.json of `usae label` ---------------------------------------------------------


def _rename(family: dict, old: str, new: str) -> None:
    family["labels"] = [new if n == old else n for n in family["labels"]]
    for entry in family["concepts"].values():
        for v in entry.values():
            if isinstance(v, dict) and v["label"] == old:
                v["label"] = new
        if entry["best"] == old:
            entry["best"] = new


@pytest.fixture(scope="module")
def labelled(world, tmp_path_factory) -> dict:
    """A site of a run holding RUN/labels.json from `usae label` (found without --labels), with planted
    label names (a script, unicode with '/' and spaces) and planted artifact shares."""
    from usae.config import LabelConfig
    from usae.evaluation.naming.label import label

    root = tmp_path_factory.mktemp("labelled")
    run = root / "run"
    shutil.copytree(world.run, run)
    result = label(LabelConfig(run=run, store=world.store, n_perm=200, progress=False, device="cpu"))
    fam = result["families"]["pixels"]
    agreeing = [e["best"] for e in fam["concepts"].values() if e["agrees"]]
    used = sorted({v["label"] for e in fam["concepts"].values() for v in e.values() if isinstance(v, dict)})
    assert agreeing and len(used) >= 2
    _rename(fam, agreeing[0], EVIL_LABEL)
    _rename(fam, next(n for n in used if n != agreeing[0]), UNICODE_LABEL)
    report = json.loads((run / "report.json").read_text())
    universal = [k for k, c in enumerate(report["classes"]["labels"]) if c == "universal"]
    assert len(universal) >= 4
    flat, border, chance, mixed = universal[:4]
    nan = float("nan")
    for i, a in enumerate(result["artifacts"].values()):  # every other share 0: only the planted ones count
        a["flat_share"] = [0.0] * report["n_latents"]
        a["border_share"] = [0.0] * report["n_latents"]
        a["flat_share"][flat] = [1.0, nan][i % 2]  # NaN / null: that model does not use the concept
        a["border_share"][border] = [1.0, None][i % 2]
        a["border_share"][chance] = 0.6  # above 0.5 but near the 8x8 ring's 44%: no mark
        a["flat_share"][mixed] = [1.0, 0.2][i % 2]  # flat in one model only: no mark
    (run / "labels.json").write_text(json.dumps(result))
    out = explore(ExploreConfig(run, world.store, root / "site", n_top=2, progress=False)).parent
    rows = dict(
        (int(k), (html.unescape(text), cells))
        for text, k, cells in re.findall(r'<tr data-cls="[^"]*" data-live="\d" data-text="([^"]*)">\s*<td data-v="(\d+)">(.*?)</tr>', (out / "index.html").read_text(), re.S)
    )  # fmt: skip
    marked = {"flat": flat, "border": border, "chance": chance, "mixed": mixed}
    return {"dir": out, "result": result, "report": report, "rows": rows, "marked": marked, "universal": universal}


def _label_links(page: Path) -> dict[str, str]:
    """Label name -> href of every label link on a page (the label index's rows, or links into labels/)."""
    found = re.findall(
        r'(?:<td class="label"><a|<a class="lab[^"]*"|<a) href="([^"]*)"[^>]*>([^<]+)</a>', page.read_text()
    )
    return {html.unescape(text): href for href, text in found if "labels/" in href or "/" not in href and href != "index.html"}  # fmt: skip


def test_label_column_shows_each_familys_name(labelled):
    fam = labelled["result"]["families"]["pixels"]
    n_named = 0
    for k, entry in fam["concepts"].items():
        text, cells = labelled["rows"][int(k)]
        if entry["best"] is None:
            assert "labels/" not in cells
            continue
        n_named += 1
        name = entry["best"] + ("" if entry["agrees"] else "?")
        assert text.startswith(f"{k} {name.lower()}")  # what the search box matches
        assert f">{html.escape(name)}</a>" in cells
        assert ('class="lab unsure"' in cells) != entry["agrees"]  # muted when the models do not agree
    assert n_named > 5


def test_concept_page_shows_label_scores_and_chance(labelled):
    fam = labelled["result"]["families"]["pixels"]
    names = labelled["result"]["model_names"]
    k = next(k for k, e in fam["concepts"].items() if e["agrees"] and e["best"] != EVIL_LABEL)
    page = (labelled["dir"] / "concepts" / f"{k}.html").read_text()
    rows = re.findall(r'<tr class="(?:sig|ns)"><th>([^<]*)</th>(.*?)</tr>', page, re.S)
    assert [m for m, _ in rows] == names
    for (_, cells), m in zip(rows, names, strict=True):
        s = fam["concepts"][k][m]
        values = re.findall(r"<td[^>]*>(?:<a [^>]*>)?([^<]*)", cells)
        expected = [s["label"], *(format_number(s[f]) for f in ("precision_at_n", "lift", "auroc", "p_value", "n"))]
        assert values == [html.escape(v) for v in expected] + ["yes"]
    chance = re.search(r'<p class="chance">(.*?)</p>', page, re.S)[1]
    shuffled = fam["shuffled"]
    assert all(f"{m} {shuffled['named'][m]}" in chance for m in names)
    assert f"{shuffled['agreed']} of {shuffled['shared']}" in chance
    assert f"../labels/{label_slugs([fam['concepts'][k]['best']])[fam['concepts'][k]['best']]}" in page


def test_label_pages_list_their_concepts_per_model(labelled):
    site, fam = labelled["dir"], labelled["result"]["families"]["pixels"]
    assert 'href="labels/index.html"' in (site / "index.html").read_text()
    links = _label_links(site / "labels" / "index.html")
    assert set(links) == set(fam["labels"])
    href = links[UNICODE_LABEL]
    assert re.fullmatch(r"[a-z0-9-]+\.html", href) and href != "index.html"
    page = (site / "labels" / href).read_text()
    assert f'Label <span class="label">{html.escape(UNICODE_LABEL)}</span>' in page
    for m in labelled["result"]["model_names"]:
        col = re.search(rf'<section class="label-col" data-model="{re.escape(m)}">(.*?)</section>', page, re.S)[1]
        listed = {int(k) for k in re.findall(r'data-concept="(\d+)"', col)}
        expected = {int(k) for k, e in fam["concepts"].items() if e[m] and e[m]["label"] == UNICODE_LABEL}
        assert listed == expected
        if listed:  # and a concept page links back to the label page
            assert _label_links(site / "concepts" / f"{min(listed)}.html")[UNICODE_LABEL] == f"../labels/{href}"
    for page in (site / "labels").glob("*.html"):
        for ref in re.findall(r'(?:href|src)="([^"#:]+)"', page.read_text()):
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: broken link {ref}"


def test_label_names_are_escaped(labelled):
    texts = [p.read_text() for p in labelled["dir"].rglob("*.html")]
    assert not any("<script>window" in t for t in texts)
    assert sum("&lt;script&gt;window.__pwned = 1&lt;/script&gt; &amp; co" in t for t in texts) > 3
    href = _label_links(labelled["dir"] / "labels" / "index.html")[EVIL_LABEL]
    assert re.fullmatch(r"[a-z0-9-]+\.html", href) and (labelled["dir"] / "labels" / href).is_file()


def test_artifact_marks_in_table_pages_and_count(labelled):
    site, marked, rows = labelled["dir"], labelled["marked"], labelled["rows"]
    assert 'class="badge artifact artifact-flat"' in rows[marked["flat"]][1]
    assert "flat" in rows[marked["flat"]][0].split()  # searchable
    assert 'class="badge artifact artifact-border"' in rows[marked["border"]][1]
    for k in (marked["chance"], marked["mixed"]):
        assert "artifact" not in rows[k][1]
    assert 'class="artifact-note"' in (site / "concepts" / f"{marked['flat']}.html").read_text()
    assert 'class="artifact-note"' not in (site / "concepts" / f"{marked['chance']}.html").read_text()
    n_top = min(ARTIFACT_TOP, len(labelled["universal"]))
    count = re.search(r'id="artifact-count">(.*?)</p>', (site / "index.html").read_text(), re.S)[1]
    assert count.startswith(f"Artifact marks: 2 of the top {n_top} universal concepts")


def test_artifact_rule():
    a = {
        "m1": {"flat_share": [1.0, 1.0, 0.9, None, 0.0], "border_share": [0.0, 0.0, 0.0, None, 0.6]},
        "m2": {"flat_share": [0.5, 0.4, None, float("nan"), 0.0], "border_share": [0.0, 0.0, None, None, 0.6]},
    }
    kinds = [[m["kind"] for m in artifact_marks(a, k, ["m1", "m2"], 0.2)] for k in range(5)]
    assert kinds == [["flat"], [], ["flat"], [], ["border"]]
    ring_7x7 = 24 / 49  # half the tokens lie on the ring: 0.6 is chance there
    assert artifact_marks(a, 4, ["m1", "m2"], ring_7x7) == []


def test_label_slugs_are_unique_safe_file_names():
    names = ["colour/red", "Colour Red", "a/b", "index", "ciel/bleu clair é", "日本", "", "x" * 200, EVIL_LABEL]
    slugs = label_slugs(names)
    assert slugs == label_slugs(reversed(names))  # independent of order
    assert slugs["a/b"] == "a-b"
    assert len({s.lower() for s in slugs.values()}) == len(names)  # unique, also on case-insensitive disks
    assert all(re.fullmatch(r"[a-z0-9-]{1,80}", s) for s in slugs.values())
    assert slugs["index"] != "index" and "colour-red" not in slugs.values()


def test_read_labels_both_formats(world, tmp_path, caplog):
    report = json.loads((world.run / "report.json").read_text())
    s, models = report["n_latents"], report["model_names"]
    scored = tmp_path / "labels.json"
    scored.write_text(json.dumps(scored_labels(report, {3: ("colour/blue", True), 5: ("sky", False)}, flat=(5,))))
    got = read_concept_labels(scored, s, models)
    assert got.text == {3: "colour/blue", 5: "sky?"} and got.scored is not None
    plain = tmp_path / "names.json"
    plain.write_text(json.dumps({"3": "colour/blue, sky?"}))
    assert read_concept_labels(plain, s, models) == (({3: "colour/blue, sky?"}), None, plain)
    with pytest.raises(UsaeError, match="not a labels.json of `usae label` for this run"):
        read_concept_labels(scored, s, ["other", *models[1:]])
    scored.write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert read_concept_labels(scored, s, models, explicit=False).text == {}  # RUN/labels.json: skipped
    assert "not valid JSON" in caplog.text
    with pytest.raises(UsaeError, match="not valid JSON"):
        read_concept_labels(scored, s, models)


def test_plain_labels_still_work(site, world):
    report = json.loads((world.run / "report.json").read_text())
    k = next(k for k, c in enumerate(report["classes"]["labels"]) if c != "dead")
    row = re.search(rf'data-text="([^"]*)">\s*<td data-v="{k}">.*?</tr>', (site / "index.html").read_text(), re.S)
    assert html.escape(EVIL_LABEL) in row[0] and html.unescape(row[1]) == f"{k} {EVIL_LABEL.lower()}"
    assert not (site / "labels").exists()


# -- reports, outputs and write failures -----------------------------------------------------------
def test_explore_reuses_a_report_of_usae_evaluate_on_several_stores(world, tmp_path, monkeypatch, caplog):
    """`usae evaluate RUN S1 S2` writes report-<store>.json: the explorer takes the one whose store
    hash is the explored store's and does not evaluate again; with none for this store it does, and
    says so in one line naming the command that saves the evaluation."""
    import usae.explorer.site as site_mod

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "report.json").unlink()
    args = ["evaluate", str(run), str(world.store), str(world.store), "--max-rows", "200", "--no-report"]
    assert main([*args, "--no-progress"]) == 0  # two partial reports: report-store-1.json, report-store-2.json
    full = json.loads((world.run / "report.json").read_text())
    (run / "report-val.json").write_text(json.dumps(full))  # every row, under a name that is not the store's
    assert sorted(p.name for p in run.glob("report*.json")) == [
        "report-store-1.json", "report-store-2.json", "report-val.json"
    ]  # fmt: skip

    def no_evaluation(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(site_mod, "evaluate", no_evaluation)
    explore(ExploreConfig(run, world.store, tmp_path / "site", n_top=2, progress=False))
    assert find_report(run, full["model_names"], usae.open_store(world.store))[0] == run / "report-val.json"
    (run / "report-val.json").unlink()  # the others cover 200 rows, not the store: evaluated again
    with caplog.at_level(logging.INFO, "usae.explorer.site"), pytest.raises(AssertionError, match="evaluated again"):
        explore(ExploreConfig(run, world.store, tmp_path / "site", n_top=2, progress=False))
    said = [r.getMessage() for r in caplog.records if "evaluating it now" in r.getMessage()]
    assert len(said) == 1 and f"usae evaluate {run} {world.store}" in said[0] and "\n" not in said[0]


def test_a_write_failure_names_the_file(world, tmp_path, monkeypatch):
    """Disk full while writing a page: one line naming the page, no site, no partial directory."""
    import errno
    import os
    import pathlib

    real = pathlib.Path.write_text

    def full_disk(self, *a, **k):
        if self.parent.name == "concepts":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write(): no file name
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(UsaeError, match=r"concepts/\d+\.html: could not write \(No space left on device\)") as e:
        explore(ExploreConfig(world.run, world.store, tmp_path / "site", n_top=2, progress=False))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_explore_out_is_checked_before_writing(world, tmp_path, capsys):
    """--out may not be the store or the run, nor lie inside them; nothing is written then."""

    def tree(p: Path) -> list[Path]:
        return sorted(p.rglob("*"))

    before = {p: tree(p) for p in (world.store, world.run, world.store.parent)}
    for out in (world.store, world.store / "site", world.run / "site"):
        assert main(["explore", str(world.run), str(world.store), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "the input" in err and str(out) in err
    assert before == {p: tree(p) for p in (world.store, world.run, world.store.parent)}


def test_a_failed_explore_leaves_no_empty_out(world, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"99999": "x"}))
    with pytest.raises(UsaeError, match="labels.json"):
        explore(ExploreConfig(world.run, world.store, tmp_path / "new" / "dirs" / "site", labels=bad, progress=False))
    assert not (tmp_path / "new").exists()
