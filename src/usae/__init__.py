"""Universal Sparse Autoencoders: one sparse concept space shared by several models.

import usae
usae.write_store("store", {"a": X_a, "b": X_b})      # paired activations, row r = same token
result = usae.fit(usae.TrainConfig(store=Path("store"), out=Path("run"), n_latents=512, k=8))
sae = usae.load("run")
z = sae.encode("a", x_a)                              # (n, n_latents), k non-zeros per row
x_b_hat = sae.decode("b", z)                          # model b reconstructed from model a's code
report = usae.evaluate("run", "store")                # cross-reconstruction R², FVU, L0, ...
"""

__version__ = "0.1.0"  # before the imports: submodules read it

from usae.checkpoint import load
from usae.config import EvalConfig, SAEConfig, SynthConfig, TrainConfig
from usae.errors import UsaeError
from usae.evaluate import evaluate
from usae.explore import heatmap, top_images
from usae.hub import from_pretrained, save_pretrained
from usae.maximize import maximize
from usae.sae import SparseCode, UniversalSAE
from usae.store import Store, StoreWriter, open_store, write_store
from usae.synth import World, make_world, recovery
from usae.train import fit, fit_many, lr_at

__all__ = [
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
