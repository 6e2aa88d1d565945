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
