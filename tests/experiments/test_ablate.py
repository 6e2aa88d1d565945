import csv

from usae.__main__ import main


def test_ablate_2x2_grid_writes_table_and_reuses_runs(small_store, tmp_path, capsys):
    out = tmp_path / "abl"
    argv = ["ablate", str(small_store), "--out", str(out), "--rules", "random-source", "crosscoder"]
    argv += ["--k", "2", "4", "--n-latents", "32", "--n-models", "3", "--steps", "20", "--batch-size", "256"]
    argv += ["--max-eval-rows", "2000"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert [(r["rule"], r["k"]) for r in rows] == [
        ("random-source", "2"),
        ("random-source", "4"),
        ("crosscoder", "2"),
        ("crosscoder", "4"),
    ]
    for r in rows:
        assert -1 < float(r["r2_self_mean"]) <= 1 and float(r["tokens_per_s"]) > 0
    table = (out / "ablation.md").read_text()
    assert table.startswith("| store | rule |") and table.count("\n") == 6
    # a second call reuses every finished run instead of retraining
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert main(argv) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert "crosscoder" in capsys.readouterr().out


def test_ablate_and_baseline_score_on_the_held_out_store(small_world, tmp_path):
    """A store extracted with --val-fraction names its held-out twin: ablations add its R², and the
    baselines match latents on it while the independent SAEs train on the training store."""
    import json

    from usae.config import AblateConfig
    from usae.data.store import held_out_path, open_store, write_store
    from usae.experiments.ablate import ablate
    from usae.experiments.baseline import run_baselines

    data = small_world.data
    val = write_store(tmp_path / "s-val", {n: x[4000:] for n, x in data.items()}, dtype="float32")
    train = write_store(
        tmp_path / "s", {n: x[:4000] for n, x in data.items()}, dtype="float32",
        extra={"split": {"name": "train", "val_fraction": 1 / 3, "seed": 0, "other": str(val)}},
    )  # fmt: skip
    assert held_out_path(open_store(train)) == val and held_out_path(open_store(val)) is None
    cfg = AblateConfig(stores=(train,), out=tmp_path / "abl", n_latents=(32,), k=(4,), steps=30, batch_size=256)
    (row,) = ablate(cfg)
    assert -1 < row["r2_self_held_out"] <= 1 and row["r2_self_held_out"] != row["r2_self_mean"]
    run = tmp_path / "abl" / "runs"
    run = next(p for p in run.iterdir() if (p / "model.safetensors").is_file())
    result = run_baselines(run, train, similarity_rows=256, progress=False)
    assert result["store"]["path"] == str(val) and result["store"]["held_out"] and result["n_rows"] == 2000
    assert json.loads((run / "baselines.json").read_text())["trained_on"] == str(train)
