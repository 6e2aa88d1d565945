"""The concept explorer in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

The site is opened both from a local http.server and straight from disk (file://). Skipped, not
failed, where Chromium or Playwright is missing. Screenshots go to the test's tmp dir and to
test-artifacts/ at the repository root.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import shutil
import threading
from pathlib import Path

import pytest
from explore_world import EVIL_LABEL, scored_labels, shared_world

import usae
from usae.config import ExploreConfig
from usae.explorer.maximize import maximize
from usae.explorer.maximize_result import write_maximization
from usae.explorer.site import explore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
UNICODE_LABEL = "ciel/bleu clair · é"

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A site with labels.json of `usae label` (an agreeing name on one concept, a unicode name on
    another, which is also marked flat) and a maximisation on a third."""
    world = shared_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("browser")
    report = json.loads((world.run / "report.json").read_text())
    energy = [sum(report["energy"][n][k] for n in report["model_names"]) for k in range(report["n_latents"])]
    universal = sorted(
        (k for k, c in enumerate(report["classes"]["labels"]) if c == "universal"), key=lambda k: -energy[k]
    )
    labelled, maximized, other = universal[0], universal[1], universal[2]
    labels = root / "labels.json"
    named = {labelled: (EVIL_LABEL, True), other: (UNICODE_LABEL, False)}
    labels.write_text(json.dumps(scored_labels(report, named, flat=(other,))))
    run = root / "run"
    shutil.copytree(world.run, run)  # the maximisation goes to RUN/maximize: keep the shared run clean
    write_maximization(maximize(run, maximized, store=world.store, steps=20, progress=False), run / "maximize")
    out = explore(ExploreConfig(run, world.store, root / "site", labels=labels, n_top=4, progress=False)).parent
    return {
        "dir": out,
        "labelled": labelled,
        "maximized": maximized,
        "other": other,
        "models": usae.load(run).model_names,
    }


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site["dir"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(params=["http", "file"])
def base(request, site, server) -> str:
    return server if request.param == "http" else site["dir"].as_uri()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors, page errors and failed requests."""
    p = browser.new_page(viewport={"width": 1280, "height": 900})
    p.errors = []
    p.on(
        "console", lambda m: p.errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    p.on("pageerror", lambda e: p.errors.append(f"page error: {e}"))
    p.on("requestfailed", lambda r: p.errors.append(f"request failed: {r.url} ({r.failure})"))
    yield p
    p.close()


def _visible_column(page, col: int) -> list[float]:
    js = """col => Array.from(document.querySelectorAll('#concepts tbody tr'))
        .filter(r => !r.hidden).map(r => r.cells[col].dataset.v)"""
    return [float(v) if v != "" else math.nan for v in page.evaluate(js, col)]


def _save(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy2(path, ARTIFACTS / name)


def test_index_loads_cleanly(page, base, site):
    page.goto(f"{base}/index.html")
    page.wait_for_load_state("load")
    assert page.errors == []
    rows = page.locator("#concepts tbody tr:not([hidden])")
    assert rows.count() > 0
    assert page.locator("#shown-count").inner_text().startswith(f"showing {rows.count()} of")
    assert page.evaluate("window.__pwned") is None  # the label's <script> stayed text
    assert EVIL_LABEL in page.locator("#concepts").inner_text()
    assert page.locator("canvas.heat[data-drawn='1']").count() > 0
    assert page.locator("#report img").count() == 4


def test_sorting(page, base):
    page.goto(f"{base}/index.html")
    fe_header = page.locator("#concepts thead th", has_text="firing entropy")
    fe_col = page.evaluate(
        "Array.from(document.querySelectorAll('#concepts thead th')).findIndex(t => t.textContent.includes('firing entropy'))"
    )
    fe_header.locator("button").click()
    assert fe_header.get_attribute("aria-sort") == "descending"
    values = _visible_column(page, fe_col)
    defined = [v for v in values if not math.isnan(v)]
    assert defined == sorted(defined, reverse=True) and len(defined) > 2
    assert all(math.isnan(v) for v in values[len(defined) :])  # undefined last
    fe_header.locator("button").click()
    assert fe_header.get_attribute("aria-sort") == "ascending"
    values = [v for v in _visible_column(page, fe_col) if not math.isnan(v)]
    assert values == sorted(values)
    page.locator("#concepts thead th", has_text="concept").first.locator("button").click()
    ids = _visible_column(page, 0)
    assert ids == sorted(ids, reverse=True)
    assert page.errors == []


def test_filtering(page, base, site):
    page.goto(f"{base}/index.html")
    page.select_option("#class-filter", "universal")
    classes = page.evaluate(
        "Array.from(document.querySelectorAll('#concepts tbody tr')).filter(r => !r.hidden).map(r => r.dataset.cls)"
    )
    assert classes and set(classes) == {"universal"}
    page.select_option("#class-filter", "all")
    page.fill("#search", "pwned")
    ids = _visible_column(page, 0)
    assert ids == [site["labelled"]]
    assert page.errors == []


def test_concept_page_shows_one_column_per_model(page, base, site, tmp_path):
    page.goto(f"{base}/index.html")
    page.locator(f"#concepts a.concept-link[href='concepts/{site['maximized']}.html']").click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"concepts/{site['maximized']}.html")
    columns = page.locator(".model-col")
    assert columns.count() == len(site["models"])
    for i, name in enumerate(site["models"]):
        col = columns.nth(i)
        assert col.get_attribute("data-model") == name
        assert col.locator(".card img").count() >= 1
    loaded = page.evaluate(
        "Array.from(document.querySelectorAll('.card img')).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded
    # heatmaps were drawn: some pixel of some overlay canvas is not transparent
    painted = page.evaluate(
        """() => Array.from(document.querySelectorAll('canvas.heat')).some(c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
            return false; })"""
    )
    assert painted
    maxi = page.locator(".maxi img")
    assert maxi.count() == len(site["models"])
    assert page.evaluate("Array.from(document.querySelectorAll('.maxi img')).every(i => i.naturalWidth > 0)")
    heat = page.locator(".card canvas.heat").first
    page.uncheck("#show-heat")
    assert heat.evaluate("c => getComputedStyle(c).visibility") == "hidden"
    page.check("#show-heat")
    assert heat.evaluate("c => getComputedStyle(c).visibility") == "visible"
    assert page.errors == []
    if base.startswith("http"):
        _save(page, "explorer-concept.png", tmp_path)
        page.goto(f"{base}/index.html")
        _save(page, "explorer-index.png", tmp_path)


def test_image_page_lists_concepts_per_model(page, base, site, tmp_path):
    page.goto(f"{base}/concepts/{site['labelled']}.html")
    page.locator(".model-col .card a.thumb").first.click()
    page.wait_for_load_state("load")
    assert "/images/" in page.url
    columns = page.locator(".model-col")
    assert columns.count() == len(site["models"])
    items = page.locator(".seen-item")
    assert items.count() > 0
    linked = page.evaluate(
        "Array.from(document.querySelectorAll('.seen-item a.concept-link')).map(a => a.getAttribute('href'))"
    )
    assert f"../concepts/{site['labelled']}.html" in linked  # the concept we came from fires here
    assert page.errors == []
    if base.startswith("http"):
        _save(page, "explorer-image.png", tmp_path)
    page.locator(".seen-item a.concept-link").first.click()
    page.wait_for_load_state("load")
    assert "/concepts/" in page.url and page.locator(".model-col").count() == len(site["models"])


def test_search_matches_labels_and_marks(page, base, site):
    page.goto(f"{base}/index.html")
    page.select_option("#class-filter", "all")
    page.fill("#search", "CLAIR É")  # case-insensitive, unicode, several words
    assert _visible_column(page, 0) == [site["other"]]
    page.fill("#search", "flat")
    assert site["other"] in _visible_column(page, 0)
    page.fill("#search", "clair pwned")
    assert _visible_column(page, 0) == []
    assert page.errors == []


def test_label_pages_open_from_the_table(page, base, site, tmp_path):
    page.goto(f"{base}/index.html")
    row = page.locator(f"#concepts tbody tr:has(td[data-v='{site['other']}'])")
    assert row.locator(".badge.artifact-flat").count() == 1
    link = row.locator("a.lab.unsure")
    assert link.inner_text() == UNICODE_LABEL + "?"
    link.click()
    page.wait_for_load_state("load")
    assert "/labels/" in page.url and page.locator("h1").inner_text() == f"Label {UNICODE_LABEL}"
    first = page.locator(f".label-col[data-model='{site['models'][0]}'] tr[data-concept='{site['other']}']")
    assert first.count() == 1 and first.locator("a.concept-link").count() == 1
    assert page.locator(".chance").count() == 1  # the shuffled-label control is shown
    if base.startswith("http"):
        _save(page, "explorer-label.png", tmp_path)
    page.locator("a", has_text="all labels").click()
    page.wait_for_load_state("load")
    assert page.url.endswith("labels/index.html")
    assert page.locator("table.labels-table td.label a").count() == 3  # colour/red, the script, the unicode name
    # a thumbnail still loading when the link is clicked is aborted by the navigation: not a page error
    aborted = [e for e in page.errors if e.startswith("request failed:") and "/img/" in e and "ERR_ABORTED" in e]
    assert [e for e in page.errors if e not in aborted] == []
