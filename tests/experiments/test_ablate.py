import csv
import json

import pytest

from usae.__main__ import main
from usae.data.store import write_store
from usae.data.synth import make_world


@pytest.fixture(scope="module")
def two_model_store(tmp_path_factory):
    world = make_world({"p": 24, "q": 32}, n_rows=2000, n_universal=12, n_partial=0, n_specific=8, k_active=3, seed=5)
    return write_store(tmp_path_factory.mktemp("two") / "pair", world.data, dtype="float32")


@pytest.fixture(scope="module")
def readme_sweep(two_model_store, tmp_path_factory):
    """The README's command, verbatim but for fewer steps and rows, on a store of only 2 models."""
    out = tmp_path_factory.mktemp("readme") / "ABL"
    argv = ["ablate", str(two_model_store), "--rules", "random-source", "sparc", "crosscoder", "--k", "8", "16"]
    argv += ["--n-latents", "512", "--out", str(out), "--steps", "4", "--batch-size", "128", "--max-eval-rows", "500"]
    assert main(argv) == 0
    return out


def test_readme_ablate_command_uses_all_of_a_two_model_store(readme_sweep):
    rows = list(csv.DictReader((readme_sweep / "ablation.csv").open()))
    assert [(r["rule"], r["k"]) for r in rows] == [
        (rule, k) for rule in ("random-source", "sparc", "crosscoder") for k in ("8", "16")
    ]
    assert {r["n_models"] for r in rows} == {"2"} and {r["n_latents"] for r in rows} == {"512"}
    assert sorted(p.name for p in (readme_sweep / "runs").iterdir())[0] == "pair-crosscoder-m2-s512-k16"


def test_ablation_config_is_plain_json(readme_sweep, two_model_store):
    cfg = json.loads((readme_sweep / "ablation-config.json").read_text())
    assert cfg["stores"] == [str(two_model_store)] and cfg["out"] == str(readme_sweep)
    assert cfg["rules"] == ["random-source", "sparc", "crosscoder"]
    assert cfg["k"] == [8, 16] and cfg["n_latents"] == [512] and cfg["n_models"] is None
    assert cfg["steps"] == 4 and cfg["max_eval_rows"] == 500 and cfg["device"] == "auto"
    from usae.config import AblateConfig, from_json_dict

    assert from_json_dict(AblateConfig, cfg, "ablation-config.json").stores == (two_model_store,)


def test_ablate_times_each_run_on_its_own_steps(two_model_store, tmp_path):
    """Runs trained together in lockstep each get their own speed: a 512x larger dictionary is slower
    (measured 3-4x on a 2-core CPU; the group average gave both rows the same number)."""
    from usae.config import AblateConfig
    from usae.experiments.ablate import ablate

    cfg = AblateConfig(stores=(two_model_store,), out=tmp_path / "abl", n_latents=(16, 8192), k=(4,), steps=12,
                       batch_size=256, max_eval_rows=500, device="cpu")  # fmt: skip
    small, big = ablate(cfg)
    assert small["n_latents"] == 16 and big["n_latents"] == 8192
    assert 0 < big["tokens_per_s"] < small["tokens_per_s"] / 1.5
    saved = json.loads((tmp_path / "abl" / "runs" / "pair-random-source-m2-s8192-k4" / "ablation.json").read_text())
    assert saved["tokens_per_s"] == big["tokens_per_s"] and "data loading excluded" in saved["notes"]["tokens_per_s"]


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
    assert table.startswith("| store | rule |") and table.count("\n|") == 5  # header, rule, 4 rows
    assert "data loading excluded" in table
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
