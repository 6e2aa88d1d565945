"""Import the paper's released USAE (github.com/YorkUCVIL/UniversalSAE) as a usae run directory.

The release trains one Overcomplete ``TopKSAE`` per model and saves, per model,
``weights/<run>/<Model>/uni_<Model>_checkpoint_<epoch>.pth``: a ``torch.save`` dict whose
``model_state_dict`` holds

    encoder.final_block.0.{weight (s, d), bias (s,)}        Linear         ('mlp_bn_1' and 'linear')
    encoder.final_block.1.{weight, bias, running_mean,      BatchNorm1d(s) ('mlp_bn_1' only)
                           running_var, num_batches_tracked}
    dictionary._weights (s, d)                              the dictionary before normalisation
    dictionary.multiplier ()                                 newer Overcomplete only: rows scaled by exp(.)

and a YAML config whose ``model_zoo.<Model>`` gives ``input_shape`` and the scalar
``model_mean``/``model_std`` the inputs were standardised with, and ``sae_params`` gives
``top_k``, ``encoder_module`` and ``dictionary_normalization``. In eval mode one model computes

    z = TopK(ReLU(BN(Linear((x - mean) / std))))      x_hat = mean + std * z @ normalize(D) * exp(multiplier)

which is exactly a UniversalSAE head with W_enc = Linear.weight, b_enc = Linear.bias, the BN,
b_dec = 0, W_dec = the normalised dictionary, shift = mean, scale = std ('paper' normalisation).
The .pth files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled code.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from usae._io import check_output, load_tensors
from usae.config import ImportOfficialConfig, SAEConfig
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import run_config, save_run

log = logging.getLogger(__name__)

ENCODERS = {"mlp_bn_1": "mlp", "linear": "linear"}
NORMALIZATIONS = ("l2", "identity")
_LINEAR = "encoder.final_block.0."
_BN = "encoder.final_block.1."
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class OfficialModel(NamedTuple):
    """One entry of the release's ``model_zoo``."""

    name: str
    """The model's key in the YAML (e.g. 'DinoV2')."""
    width: int
    """``input_shape``: the activation width d."""
    mean: float
    """Scalar mean subtracted before encoding (0 when the run did not standardise)."""
    std: float
    """Scalar std divided by before encoding (1 when the run did not standardise)."""
    checkpoint: str | None
    """``checkpoint_path`` as written in the YAML (a path on the authors' machine), or None."""


class OfficialConfig(NamedTuple):
    """What the conversion needs from the release's YAML."""

    models: list[OfficialModel]
    top_k: int
    encoder_module: str
    normalization: str


def read_official_config(path: str | Path) -> OfficialConfig:
    """Parse the release's YAML (``yaml.safe_load``: data only); a bad field is a one-line UsaeError."""
    path = Path(path)
    doc = _load_yaml(path)
    glob = doc.get("global") or {}
    params = doc.get("sae_params") or {}
    zoo = doc.get("model_zoo")
    if not isinstance(glob, dict) or not isinstance(params, dict):
        raise UsaeError(f"{path}: fields 'global' and 'sae_params' must be mappings")
    if not isinstance(zoo, dict) or not zoo:
        raise UsaeError(f"{path}: missing field 'model_zoo' (one entry per model)")
    if glob.get("divide_norm"):
        raise UsaeError(
            f"{path}: global.divide_norm is true: per-row norm division has no fixed normalisation to import"
        )
    standardize = glob.get("standardize", True)
    top_k = params.get("top_k")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise UsaeError(f"{path}: sae_params.top_k must be a positive int, got {top_k!r}")
    encoder = params.get("encoder_module", "mlp_bn_1")
    if encoder not in ENCODERS:
        raise UsaeError(f"{path}: sae_params.encoder_module {encoder!r} is not supported (one of {list(ENCODERS)})")
    dict_params = params.get("dictionary_params") or {}
    norm = params.get(
        "dictionary_normalization", dict_params.get("normalization", "l2") if isinstance(dict_params, dict) else "l2"
    )
    if norm not in NORMALIZATIONS:
        raise UsaeError(f"{path}: dictionary normalization {norm!r} is not supported (one of {list(NORMALIZATIONS)})")
    models = [_official_model(path, name, entry, bool(standardize)) for name, entry in zoo.items()]
    _check_distinct_names(models, path)
    return OfficialConfig(models, top_k, encoder, norm)


def _check_distinct_names(models: list[OfficialModel], path: Path) -> None:
    """Refuse two model_zoo keys that become one usae model name (``x.y`` and ``x_y`` are both
    ``x_y``; names are compared ignoring case, as directory names): one model was silently dropped."""
    seen: dict[str, str] = {}
    for m in models:
        key = _safe_name(m.name).lower()
        if key in seen:
            raise UsaeError(
                f"{path}: model_zoo keys {seen[key]!r} and {m.name!r} both become the model name "
                f"{_safe_name(m.name)!r}; rename one of them"
            )
        seen[key] = m.name


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise UsaeError("import-official needs PyYAML: pip install pyyaml") from None
    if not path.is_file():
        raise UsaeError(f"{path}: config not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError, RecursionError) as e:
        raise UsaeError(f"{path}: not a readable YAML file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(doc, dict):
        raise UsaeError(f"{path}: expected a YAML mapping at the top level")
    return doc


def _official_model(path: Path, name: Any, entry: Any, standardize: bool) -> OfficialModel:
    where = f"{path}: model_zoo.{name}"
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise UsaeError(f"{where}: expected a mapping with input_shape, model_mean, model_std")
    width = entry.get("input_shape")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UsaeError(f"{where}.input_shape must be a positive int, got {width!r}")
    mean, std = 0.0, 1.0
    if standardize:
        mean, std = entry.get("model_mean"), entry.get("model_std")
        for field, v in (("model_mean", mean), ("model_std", std)):
            if not isinstance(v, int | float) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
                raise UsaeError(f"{where}.{field} must be a number (the training statistics), got {v!r}")
        if std <= 0:
            raise UsaeError(f"{where}.model_std must be > 0, got {std!r}")
    ckpt = entry.get("checkpoint_path")
    return OfficialModel(name, width, float(mean), float(std), ckpt if isinstance(ckpt, str) else None)


def find_checkpoint(checkpoint_dir: Path, model: OfficialModel) -> Path:
    """The model's checkpoint in ``checkpoint_dir``: the YAML's file name, else the newest epoch.

    Looked for directly in ``checkpoint_dir`` and in ``checkpoint_dir/<Model>/`` (the release's
    ``weights/<run>/<Model>/`` layout).
    """
    stem = model.name.split(".")[0]  # the release names checkpoint folders after the key's first part
    dirs = [checkpoint_dir, checkpoint_dir / stem]
    if model.checkpoint:
        for d in dirs:
            if (d / Path(model.checkpoint).name).is_file():
                return d / Path(model.checkpoint).name
    found: list[tuple[int, Path]] = []
    pattern = re.compile(rf"uni_{re.escape(stem)}_checkpoint_(\d+)\.(pth|pt|safetensors)")
    for d in dirs:
        if d.is_dir():
            found += [(int(m.group(1)), p) for p in d.iterdir() if (m := pattern.fullmatch(p.name))]
    if not found:
        raise UsaeError(
            f"{checkpoint_dir}: no checkpoint for model {model.name!r} "
            f"(looked for uni_{stem}_checkpoint_<epoch>.pth here and in {stem}/)"
        )
    return max(found)[1]


def load_official_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of one release checkpoint (.pth via weights_only, or .safetensors)."""
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle, EOFError/RuntimeError when truncated, ...
        msg = " ".join(str(e).split())[:160] or e.__class__.__name__
        raise UsaeError(f"{path}: not a loadable weights-only checkpoint ({msg})") from None
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsaeError(f"{path}: expected a dict with 'model_state_dict' (tensors), as the release saves")
    return dict(state)


def convert(cfg: OfficialConfig, states: dict[str, dict[str, torch.Tensor]], paths: dict[str, Path]) -> UniversalSAE:
    """A UniversalSAE whose encode/decode equal the release's per-model TopKSAEs in eval mode."""
    names = {m.name: _safe_name(m.name) for m in cfg.models}
    n_latents = {m.name: _dictionary(states[m.name], paths[m.name]).shape[0] for m in cfg.models}
    if len(set(n_latents.values())) != 1:
        raise UsaeError(f"checkpoints disagree on the number of concepts: {n_latents}")
    s = next(iter(n_latents.values()))
    if not 1 <= cfg.top_k <= s:
        raise UsaeError(f"top_k {cfg.top_k} is not in [1, {s}] (the checkpoints' number of concepts)")
    sae_cfg = SAEConfig(
        widths={names[m.name]: m.width for m in cfg.models},
        n_latents=s,
        k=cfg.top_k,
        encoder=ENCODERS[cfg.encoder_module],  # type: ignore[arg-type]
        activation="topk",
        decoder_norm="unit" if cfg.normalization == "l2" else "max1",
    )
    sae = UniversalSAE(sae_cfg)
    with torch.no_grad():
        for m in cfg.models:
            _fill_head(sae, names[m.name], m, states[m.name], paths[m.name], cfg)
    return sae.eval()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _dictionary(state: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    D = state.get("dictionary._weights")
    if D is None or D.ndim != 2:
        raise UsaeError(f"{path}: missing tensor 'dictionary._weights' (s, d); not an Overcomplete SAE checkpoint")
    return D


def _fill_head(
    sae: UniversalSAE, name: str, m: OfficialModel, state: dict[str, torch.Tensor], path: Path, cfg: OfficialConfig
) -> None:
    s, d = sae.n_latents, m.width
    expected = {_LINEAR + "weight": (s, d), _LINEAR + "bias": (s,), "dictionary._weights": (s, d)}
    if cfg.encoder_module == "mlp_bn_1":
        expected |= {_BN + k: (s,) for k in _BN_KEYS[:4]} | {_BN + "num_batches_tracked": ()}
    optional = {"dictionary.multiplier": ()}
    for key, shape in (expected | optional).items():
        t = state.get(key)
        if t is None and key in optional:
            continue
        if t is None:
            raise UsaeError(f"{path}: missing tensor {key!r} (an Overcomplete {cfg.encoder_module} TopKSAE has it)")
        if tuple(t.shape) != shape:
            raise UsaeError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} (d = {d} from the YAML)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsaeError(f"{path}: tensor {key!r} holds NaN or inf")
    unexpected = sorted(set(state) - set(expected) - set(optional))
    if unexpected:
        raise UsaeError(f"{path}: unexpected tensors {unexpected[:3]} for encoder_module {cfg.encoder_module!r}")
    h = sae.head(name)
    h.W_enc.copy_(state[_LINEAR + "weight"])
    h.b_enc.copy_(state[_LINEAR + "bias"])
    if h.bn is not None:
        for key in _BN_KEYS:
            getattr(h.bn, key).copy_(state[_BN + key])
    # The same float32 operations as Overcomplete's eval-mode (fused) dictionary, eps included.
    D = state["dictionary._weights"].float()
    if cfg.normalization == "l2":
        D = D / (torch.norm(D, p=2, dim=1, keepdim=True) + 1e-8)
    if "dictionary.multiplier" in state:
        D = D * torch.exp(state["dictionary.multiplier"].float())
    h.W_dec.copy_(D)
    h.b_dec.zero_()
    sae.set_normalization_(name, torch.tensor(m.mean), torch.tensor(m.std))


def import_official(
    config_yaml: str | Path, checkpoint_dir: str | Path, out: str | Path, overwrite: bool = False
) -> UniversalSAE:
    """Convert the release (YAML + per-model checkpoints) into the run directory ``out``.

    ``out`` then works with ``usae.load``, ``usae evaluate``, ``usae encode`` and ``usae export``.
    """
    config_yaml, checkpoint_dir, out = Path(config_yaml), Path(checkpoint_dir), Path(out)
    check_output(out, "usae-run", overwrite=overwrite, reading=(config_yaml, checkpoint_dir))
    if not checkpoint_dir.is_dir():
        raise UsaeError(f"{checkpoint_dir}: no such checkpoint directory")
    cfg = read_official_config(config_yaml)
    paths = {m.name: find_checkpoint(checkpoint_dir, m) for m in cfg.models}
    states = {name: load_official_state(p) for name, p in paths.items()}
    sae = convert(cfg, states, paths)
    run_cfg = run_config(sae, {"normalization": "paper"}, {})
    run_cfg["imported_from"] = {
        "source": "github.com/YorkUCVIL/UniversalSAE",
        "config": config_yaml.name,
        "models": {_safe_name(m.name): m.name for m in cfg.models},
        "checkpoints": {_safe_name(n): {"file": p.name, "sha256": _sha256(p)} for n, p in paths.items()},
        "encoder_module": cfg.encoder_module,
        "dictionary_normalization": cfg.normalization,
        "standardization": {_safe_name(m.name): {"mean": m.mean, "std": m.std} for m in cfg.models},
    }
    save_run(out, sae, run_cfg)
    log.info("imported %d models (%d concepts, k=%d) into %s", len(cfg.models), sae.n_latents, sae.k, out)
    return sae


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_official_command(cfg: ImportOfficialConfig) -> str:
    """``usae import-official``: what the command prints."""
    sae = import_official(cfg.config_yaml, cfg.checkpoint_dir, cfg.out, overwrite=cfg.overwrite)
    return f"run: {cfg.out}  models: {', '.join(sae.model_names)}  concepts: {sae.n_latents}  k: {sae.k}"
