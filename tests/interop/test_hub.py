"""save_pretrained / from_pretrained / model card / Hub paths (against local directories only)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

import usae
from usae._io import save_tensors_atomic
from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.interop import hub
from usae.model.sae import UniversalSAE
from usae.run import run_config, save_run


def _random_sae(encoder="mlp", widths=None, n_latents=16, k=3, seed=0):
    torch.manual_seed(seed)
    sae = UniversalSAE(SAEConfig(widths=widths or {"a": 6, "b": 10}, n_latents=n_latents, k=k, encoder=encoder))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name in sae.model_names:
            d = sae.cfg.widths[name]
            sae.set_normalization_(name, torch.randn(d), torch.tensor(1.7))
            if sae.head(name).bn is not None:
                sae.head(name).bn.running_mean.normal_()
                sae.head(name).bn.running_var.uniform_(0.5, 2.0)
    return sae.eval()


def test_round_trip_every_tensor_and_card(tmp_path):
    sae = _random_sae()
    info = {"a": {"backbone": "vit_small_patch16_224", "layer": 11}}
    out = usae.save_pretrained(sae, tmp_path / "p", models_info=info, metrics={"r2_cross_mean": 0.61})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = usae.from_pretrained(out)
    assert loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(7, 6)
    torch.testing.assert_close(loaded.decode("b", loaded.encode("a", x)), sae.decode("b", sae.encode("a", x)))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: usae")
    assert "| a | 6 | vit_small_patch16_224 | 11 |" in card and "**16 concepts**" in card and "k = 3" in card
    assert "r2 cross mean: 0.610" in card
    # the method on the model and a run directory load the same way
    assert UniversalSAE.from_pretrained(out).cfg == sae.cfg


@pytest.mark.parametrize("encoder", ["linear", "mlp"])
def test_loadable_without_usae_by_the_documented_equations(tmp_path, encoder):
    """docs/format.md's equations, applied to plain JSON + safetensors, give usae's codes."""
    sae = _random_sae(encoder)
    sae.save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p/config.json").read_text())
    t = load_numpy(str(tmp_path / "p/model.safetensors"))
    src, dst, k = "a", "b", cfg["sae"]["k"]
    x = np.random.default_rng(0).normal(size=(9, cfg["sae"]["widths"][src])).astype(np.float32)
    h = f"heads.{src}."
    x_n = (x - t[h + "shift_d"]) / t[h + "scale_d"]
    z_pre = (x_n - t[h + "b_dec"]) @ t[h + "W_enc"].T + t[h + "b_enc"]
    if cfg["sae"]["encoder"] == "mlp":
        z_pre = (z_pre - t[h + "bn.running_mean"]) / np.sqrt(t[h + "bn.running_var"] + 1e-5) * t[h + "bn.weight"]
        z_pre = z_pre + t[h + "bn.bias"]
    top = np.argsort(-z_pre, axis=1)[:, :k]
    z = np.zeros_like(z_pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(z_pre, top, 1), 0), 1)
    g = f"heads.{dst}."
    x_hat = (z @ t[g + "W_dec"] + t[g + "b_dec"]) * t[g + "scale_d"] + t[g + "shift_d"]
    with torch.no_grad():
        z_usae = sae.encode(src, torch.from_numpy(x))
        x_hat_usae = sae.decode(dst, z_usae)
    np.testing.assert_allclose(z, z_usae.numpy(), atol=1e-5)
    np.testing.assert_allclose(x_hat, x_hat_usae.numpy(), atol=1e-4)


def test_half_precision_files_and_declared_dtype(tmp_path):
    sae = _random_sae()
    sae.save_pretrained(tmp_path / "p", dtype="bfloat16")
    assert json.loads((tmp_path / "p/config.json").read_text())["dtype"] == "bfloat16"
    loaded = usae.from_pretrained(tmp_path / "p")
    assert loaded.heads["a"].W_enc.dtype == torch.float32
    torch.testing.assert_close(loaded.heads["a"].W_enc, sae.heads["a"].W_enc, atol=2e-2, rtol=1e-2)
    with pytest.raises(UsaeError, match="dtype must be one of"):
        sae.save_pretrained(tmp_path / "q", dtype="int8")


def _edit_config(path, fn):
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("sae"), "missing field 'sae'"),
        (lambda c: c.update(schema_version=99), "unsupported schema_version 99"),
        (lambda c: c.update(format="something-else"), "not a usae config"),
        (lambda c: c["sae"].pop("n_latents"), "missing config key 'n_latents'"),
        (lambda c: c["sae"].update(n_latents=32), "has shape"),
        (lambda c: c["sae"]["widths"].update(c=4), "missing tensor 'heads.c.W_enc'"),
        (lambda c: c["sae"]["widths"].pop("b"), "unexpected tensor 'heads.b."),
        (lambda c: c.update(dtype="float16"), "has dtype float32, config.json declares float16"),
        (lambda c: c.update(dtype="int4"), "unknown dtype 'int4'"),
        (lambda c: c["sae"].update(encoder="transformer"), "is not one of"),
    ],
)
def test_one_clear_error_per_problem(tmp_path, mutate, message):
    _random_sae().save_pretrained(tmp_path / "p")
    _edit_config(tmp_path / "p/config.json", mutate)
    with pytest.raises(UsaeError, match=message) as e:
        usae.from_pretrained(tmp_path / "p")
    assert "\n" not in str(e.value) and str(tmp_path / "p") in str(e.value)


def test_wrong_tensor_dtype_and_damaged_file(tmp_path):
    sae = _random_sae()
    sae.save_pretrained(tmp_path / "p")
    tensors = dict(sae.state_dict())
    tensors["heads.a.W_enc"] = tensors["heads.a.W_enc"].to(torch.int32)
    save_tensors_atomic(tmp_path / "p/model.safetensors", tensors)
    with pytest.raises(UsaeError, match="'heads.a.W_enc' has dtype int32, expected a float dtype"):
        usae.from_pretrained(tmp_path / "p")
    sae.save_pretrained(tmp_path / "p")
    raw = bytearray((tmp_path / "p/model.safetensors").read_bytes())
    raw[-5] ^= 0x10  # one bit of the last tensor's data
    (tmp_path / "p/model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UsaeError, match="model.safetensors: contents changed since writing"):
        usae.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize(("d_a", "n_latents"), [(6, 16), (16, 16)])
def test_schema_1_runs_with_transposed_encoders_are_migrated(tmp_path, d_a, n_latents):
    """Runs saved before W_enc became (n_latents, d) (schema 1) load with the right orientation."""
    sae = _random_sae("linear", widths={"a": d_a, "b": 10}, n_latents=n_latents)
    with torch.no_grad():  # trained encoders stay close to their decoders: what the square case relies on
        for h in sae.heads.values():
            h.W_enc.copy_(h.W_dec + 0.1 * torch.randn_like(h.W_dec))
    cfg = run_config(sae, {"normalization": "scalar"}, {})
    cfg["schema_version"] = 1
    old = {k: (v.t().contiguous() if k.endswith("W_enc") else v) for k, v in sae.state_dict().items()}
    save_run(tmp_path, sae, cfg)
    save_tensors_atomic(tmp_path / "model.safetensors", old)
    loaded = usae.load(tmp_path)
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # weights migrate; training does not resume from an older run
    from usae.run import read_run_config

    with pytest.raises(UsaeError, match="older usae \\(schema_version 1\\).*cannot resume"):
        read_run_config(tmp_path)


def test_export_run_uses_report_and_store_details(tmp_path):
    """Trains its own (3-step) run: on a store whose metadata names backbones, which the card reads."""
    from usae.__main__ import main
    from usae.data.store import write_store
    from usae.run import weights_record

    x = {n: np.random.default_rng(1).normal(size=(300, d)).astype(np.float32) for n, d in (("a", 8), ("b", 12))}
    extra = {"backbones": {"a": {"backbone": "fake_vit", "layer": 3}, "b": {"backbone": "fake_cnn", "layer": "stage4"}}}
    store = write_store(tmp_path / "s", x, dtype="float32", tokens_per_image=3, extra=extra)
    run = tmp_path / "run"
    args = ["train", str(store), "--out", str(run), "--n-latents", "16", "--k", "2", "--steps", "3"]
    assert main([*args, "--batch-size", "64", "--no-progress"]) == 0
    (run / "report.json").write_text(
        json.dumps(
            {"r2_self_mean": 0.9, "r2_cross_mean": 0.5, "fvu": {"a": 0.1, "b": 0.2}, "l0": {"a": 2, "b": 2}}
            | {"weights": weights_record(run)}  # the report is of the run's weights as they are
        )
    )
    assert main(["export", str(run), "--out", str(tmp_path / "pre")]) == 0
    cfg = json.loads((tmp_path / "pre/config.json").read_text())
    assert cfg["format"] == "usae-pretrained" and cfg["train"]["steps"] == 3 and cfg["data"]["n_rows"] == 300
    assert cfg["models"][1]["backbone"] == "fake_cnn" and cfg["metrics"]["fvu"]["b"] == 0.2
    card = (tmp_path / "pre/README.md").read_text()
    assert '| b | 12 | fake_cnn | "stage4" |' in card or "| b | 12 | fake_cnn | stage4 |" in card
    assert "r2 cross mean: 0.500" in card and "| a | 0.100 | 2.000 |" in card and "- steps: `3`" in card
    loaded = usae.from_pretrained(tmp_path / "pre")
    assert torch.equal(loaded.heads["b"].W_dec, usae.load(run).heads["b"].W_dec)


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsaeError, match="is not a usae artifact"):
        _random_sae().save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "model.safetensors").exists()


def test_repo_id_offline_fails_fast_with_one_line(tmp_path):
    """A repo id goes through huggingface_hub; offline and not cached it is one line, quickly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "import usae; usae.from_pretrained('nobody-here/no-such-usae')"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "usae.errors.UsaeError: nobody-here/no-such-usae: could not download from the Hugging Face Hub"
    )
    with pytest.raises(UsaeError, match="no such directory"):
        usae.from_pretrained(tmp_path / "missing")


def test_download_and_upload_call_huggingface_hub(tmp_path, monkeypatch):
    """The online code paths, with huggingface_hub's functions replaced by local stand-ins."""
    import huggingface_hub

    sae = _random_sae()
    sae.save_pretrained(tmp_path / "p")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append(("download", repo_id, revision, tuple(allow_patterns)))
        return str(tmp_path / "p")

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls.append(("upload", repo_id, folder_path, tuple(allow_patterns)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    loaded = usae.from_pretrained("someone/usae-demo", revision="v1")
    assert torch.equal(loaded.heads["a"].W_enc, sae.heads["a"].W_enc)
    assert hub.upload(tmp_path / "p", "someone/usae-demo", private=True) == "https://huggingface.co/someone/usae-demo"
    files = ("config.json", "model.safetensors", "README.md")
    assert calls == [
        ("download", "someone/usae-demo", "v1", files),
        ("create", "someone/usae-demo", True, True),
        ("upload", "someone/usae-demo", str(tmp_path / "p"), files),
    ]
