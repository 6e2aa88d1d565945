"""`usae explore` and what users hand it (issue 24): an old site never takes an input with it, a
report of older weights is measured again, a damaged labels.json is one line or one warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from explore_world import shared_world

import usae
from usae.__main__ import main
from usae.config import ExploreConfig
from usae.errors import UsaeError
from usae.explorer.site import explore


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_old_site_holding_the_run_or_store_is_not_replaced(world, tmp_path, capsys):
    """H1: RUN (or a store) copied inside an old SITE; `explore RUN STORE --out SITE` deleted RUN."""
    site = tmp_path / "SITE"
    explore(ExploreConfig(world.run, world.store, site, n_top=2, progress=False))
    run, store = shutil.copytree(world.run, site / "run"), shutil.copytree(world.store, site / "store")
    labels = site / "names.json"
    labels.write_text(json.dumps({"0": "sky"}))
    before = _files(site)
    for argv in ([run, world.store], [world.run, store], [world.run, world.store, "--labels", labels]):
        assert main(["explore", *map(str, argv), "--out", str(site), "--n-top", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "contains the input" in err[0], err
        assert _files(site) == before


def test_a_report_of_older_weights_is_measured_again(world, tmp_path, monkeypatch, caplog):
    """H4: evaluate, then `train --resume` further: explore showed the older weights' numbers."""
    import usae.explorer.site as site_mod

    run = Path(shutil.copytree(world.run, tmp_path / "run"))
    report = json.loads((run / "report.json").read_text())
    assert report["weights"]["step"] == 150
    usae.fit(
        usae.TrainConfig(
            store=world.store, out=run, n_latents=64, k=4, steps=155, batch_size=256, device="cpu", progress=False,
            resume=True,
        )
    )  # fmt: skip
    evaluated = []
    real = site_mod.evaluate
    monkeypatch.setattr(site_mod, "evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    with caplog.at_level(logging.INFO, "usae"):
        explore(ExploreConfig(run, world.store, tmp_path / "site", n_top=2, progress=False))
    said = [r.getMessage() for r in caplog.records]
    assert evaluated == [1]
    assert any("report.json: measured other weights (step 150)" in m and "(step 155)" in m for m in said)
    assert any("evaluating it now" in m for m in said)


def _labels_with(world, score) -> dict:
    names = json.loads((world.run / "report.json").read_text())["model_names"]
    scores = {"label": "red", "precision_at_n": score, "lift": 2.0, "auroc": 0.9, "p_value": 0.01, "n": 5}
    entry = {names[0]: scores | {"significant": True}, "agrees": True, "best": "red"}
    return {
        "model_names": names,
        "families": {"dataset": {"level": "image", "labels": ["red"], "concepts": {"0": entry}}},
    }


def test_a_string_score_in_labels_json_is_one_line_or_one_warning(world, tmp_path, caplog):
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps(_labels_with(world, "high")))
    with pytest.raises(
        UsaeError, match=r"labels.json: 'families.dataset.concepts.0.\S+.precision_at_n' must be a number"
    ):
        explore(ExploreConfig(world.run, world.store, tmp_path / "s", labels=bad, n_top=2, progress=False))
    assert not (tmp_path / "s").exists()
    run = Path(shutil.copytree(world.run, tmp_path / "run"))
    shutil.copy(bad, run / "labels.json")  # found by default: skipped with one warning, the site is built
    caplog.clear()
    explore(ExploreConfig(run, world.store, tmp_path / "site", n_top=2, progress=False))
    warned = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "labels.json" in r.getMessage()
    ]
    assert len(warned) == 1 and "precision_at_n" in warned[0] and (tmp_path / "site" / "index.html").is_file()
