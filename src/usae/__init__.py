"""Universal Sparse Autoencoders: one sparse concept space shared by several models.

import usae
usae.write_store("store", {"a": X_a, "b": X_b})      # paired activations, row r = same token
result = usae.fit(usae.TrainConfig(store=Path("store"), out=Path("run"), n_latents=512, k=8))
sae = usae.load("run")
z = sae.encode("a", x_a)                              # (n, n_latents), k non-zeros per row
x_b_hat = sae.decode("b", z)                          # model b reconstructed from model a's code
report = usae.evaluate("run", "store")                # cross-reconstruction R², FVU, L0, ...
"""

from usae._version import __version__
from usae.config import EvalConfig, SAEConfig, SynthConfig, TrainConfig
from usae.data.store import Store, StoreWriter, open_store, write_store
from usae.data.synth import World, make_world, recovery
from usae.errors import UsaeError
from usae.evaluation.evaluate import evaluate
from usae.explorer.concepts import heatmap, top_images
from usae.explorer.maximize import maximize
from usae.interop.hub import from_pretrained, save_pretrained
from usae.model.sae import SparseCode, UniversalSAE
from usae.run import load
from usae.training.fit import fit, fit_many
from usae.training.step import lr_at

__all__ = [
    "__version__",
    "EvalConfig",
    "SAEConfig",
    "SparseCode",
    "Store",
    "StoreWriter",
    "SynthConfig",
    "TrainConfig",
    "UniversalSAE",
    "UsaeError",
    "World",
    "evaluate",
    "fit",
    "fit_many",
    "from_pretrained",
    "heatmap",
    "load",
    "lr_at",
    "make_world",
    "maximize",
    "open_store",
    "recovery",
    "save_pretrained",
    "top_images",
    "write_store",
]
