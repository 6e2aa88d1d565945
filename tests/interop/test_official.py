"""import-official: checkpoints made with the real `overcomplete` package convert to equal numbers."""

import pickle

import numpy as np
import pytest
import torch
import yaml

from usae.__main__ import main
from usae.errors import UsaeError
from usae.interop.official import find_checkpoint, read_official_config
from usae.run import load


def _overcomplete():
    """overcomplete.sae, importable with matplotlib >= 3.9 (its colormap module calls the removed cm.get_cmap)."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    return pytest.importorskip("overcomplete.sae")


MODELS = {"SigLIP": (24, -0.03, 2.23), "DinoV2": (16, 0.033, 2.47), "ViT": (20, -0.029, 2.14)}
N_CONCEPTS, TOP_K = 48, 5


def _release(tmp_path, encoder_module="mlp_bn_1", multiplier=0.0, layout="nested"):
    """A release like YorkUCVIL/UniversalSAE's: YAML + weights/<run>/<Model>/uni_<Model>_checkpoint_29.pth."""
    oc = _overcomplete()
    torch.manual_seed(0)
    saes, zoo = {}, {}
    run = tmp_path / "weights" / "SigLIP_DinoV2_ViT_ex8_bs32_topk5"
    for name, (d, mean, std) in MODELS.items():
        sae = oc.TopKSAE(d, N_CONCEPTS, top_k=TOP_K, encoder_module=encoder_module)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.2 * torch.randn_like(p))
            sae.dictionary.multiplier.fill_(multiplier)
        sae.train()
        for _ in range(3):  # move the BatchNorm running statistics away from (0, 1)
            sae(torch.randn(64, d) * 1.5 + 0.3)
        sae.eval()
        optimizer = torch.optim.AdamW(sae.parameters(), lr=3e-4, weight_decay=1e-5)
        folder = run / name if layout == "nested" else run
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"uni_{name}_checkpoint_29.pth"
        torch.save(
            {
                "epoch": 29,
                "model_state_dict": sae.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "learning_rate": 3e-4,
            },
            path,
        )
        saes[name] = sae
        zoo[name] = {
            "checkpoint_path": f"/home/someone/weights/{run.name}/{name}/uni_{name}_checkpoint_29.pth",
            "input_shape": d,
            "num_tokens": 196,
            "og_model": name,
            "model_mean": mean,
            "model_std": std,
        }
    doc = {
        "global": {"exp_factor": 8, "input_shape": 24, "standardize": True, "divide_norm": False, "top_k": TOP_K},
        "sae_params": {
            "encoder_module": encoder_module,
            "dictionary_initializer": None,
            "data_initializer": None,
            "dictionary_normalization": "l2",
            "top_k": TOP_K,
        },
        "model_zoo": zoo,
    }
    config = tmp_path / "config_dino_siglip_vit.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config, run, saes


@pytest.mark.parametrize(
    ("encoder_module", "multiplier", "layout"), [("mlp_bn_1", 0.0, "nested"), ("linear", 0.25, "flat")]
)
def test_import_gives_overcomplete_numbers(tmp_path, encoder_module, multiplier, layout):
    config, ckpt_dir, saes = _release(tmp_path, encoder_module, multiplier, layout)
    out = tmp_path / "run"
    assert main(["import-official", str(config), str(ckpt_dir), "--out", str(out)]) == 0
    usae_sae = load(out)
    assert usae_sae.model_names == list(MODELS) and usae_sae.n_latents == N_CONCEPTS and usae_sae.k == TOP_K
    gen = torch.Generator().manual_seed(1)
    x = {n: torch.randn(200, d, generator=gen) * std + mean for n, (d, mean, std) in MODELS.items()}
    worst = 0.0
    with torch.no_grad():
        for src, (_, mean_s, std_s) in MODELS.items():
            _, z_ref = saes[src].encode((x[src] - mean_s) / std_s)
            z = usae_sae.encode(src, x[src])
            worst = max(worst, float((z - z_ref).abs().max()))
            assert torch.equal((z > 0), (z_ref > 0)), src  # the same concepts fire
            for dst, (_, mean_d, std_d) in MODELS.items():
                x_ref = saes[dst].decode(z_ref) * std_d + mean_d
                worst = max(worst, float((usae_sae.decode(dst, z) - x_ref).abs().max()))
    assert worst < 1e-4, worst
    print(f"import-official max abs error ({encoder_module}): {worst:.2e}")


def test_checkpoint_discovery_and_config_errors(tmp_path):
    config, ckpt_dir, _ = _release(tmp_path)
    cfg = read_official_config(config)
    assert [m.name for m in cfg.models] == list(MODELS) and cfg.top_k == TOP_K
    assert find_checkpoint(ckpt_dir, cfg.models[1]).name == "uni_DinoV2_checkpoint_29.pth"
    # without the YAML's file name the newest epoch wins
    torch.save(
        torch.load(ckpt_dir / "ViT/uni_ViT_checkpoint_29.pth", weights_only=True),
        ckpt_dir / "ViT/uni_ViT_checkpoint_9.pth",
    )
    assert find_checkpoint(ckpt_dir, cfg.models[2]._replace(checkpoint=None)).name == "uni_ViT_checkpoint_29.pth"
    with pytest.raises(UsaeError, match="no checkpoint for model 'SigLIP'"):
        find_checkpoint(tmp_path, cfg.models[0])

    doc = yaml.safe_load(config.read_text())
    bad = [
        (lambda d: d["model_zoo"]["ViT"].pop("model_std"), "model_zoo.ViT.model_std must be a number"),
        (lambda d: d["model_zoo"]["ViT"].update(input_shape=21), "has shape \\(48, 20\\), expected \\(48, 21\\)"),
        (lambda d: d["sae_params"].update(encoder_module="mlp_ln_3"), "encoder_module 'mlp_ln_3' is not supported"),
        (lambda d: d["global"].update(divide_norm=True), "divide_norm is true"),
        (lambda d: d.pop("model_zoo"), "missing field 'model_zoo'"),
        (lambda d: d["sae_params"].update(top_k=500), "top_k 500 is not in \\[1, 48\\]"),
    ]
    for i, (mutate, message) in enumerate(bad):
        d = yaml.safe_load(config.read_text())
        mutate(d)
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(d))
        with pytest.raises(UsaeError, match=message):
            from usae.interop.official import import_official

            import_official(path, ckpt_dir, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    assert doc  # the original stays importable
    (tmp_path / "junk.yaml").write_text("model_zoo: [unclosed\n")
    with pytest.raises(UsaeError, match="junk.yaml: not a readable YAML file"):
        read_official_config(tmp_path / "junk.yaml")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    config, ckpt_dir, _ = _release(tmp_path)
    marker = tmp_path / "pwned"
    with open(ckpt_dir / "DinoV2/uni_DinoV2_checkpoint_29.pth", "wb") as f:
        pickle.dump({"model_state_dict": _Exploit(marker)}, f)
    assert main(["import-official", str(config), str(ckpt_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uni_DinoV2_checkpoint_29.pth: not a loadable weights-only checkpoint" in err[0]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_imported_run_evaluates_and_encodes(tmp_path):
    """The imported run is an ordinary run: evaluate and encode read it."""
    from usae.data.codes import open_codes
    from usae.data.store import write_store
    from usae.evaluation.evaluate import evaluate

    config, ckpt_dir, _ = _release(tmp_path)
    assert main(["import-official", str(config), str(ckpt_dir), "--out", str(tmp_path / "run")]) == 0
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s", {n: rng.normal(size=(256, d)) for n, (d, _, _) in MODELS.items()})
    report = evaluate(tmp_path / "run", store)
    assert len(report["r2_matrix"]) == 3
    assert main(["encode", str(tmp_path / "run"), str(store), "--out", str(tmp_path / "codes"), "--no-progress"]) == 0
    assert open_codes(tmp_path / "codes").read("ViT")[0].shape == (256, TOP_K)
