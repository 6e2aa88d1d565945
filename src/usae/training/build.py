"""What a run trains, built before its first step: the models, the SAE, its optimiser and starting state.

``open_data`` opens the pass over the rows that the runs of one ``fit_many`` share (a store, or the
backbones' tokens of images: data/source.py; the models, the ranks, the row order, the held-out
rows); ``trained_models`` names the models a
run trains (checked against the device's memory);
``build_sae`` makes the UniversalSAE with the store's normalisation (seeded); ``start_from_data``
sets a fresh run's dictionary from data rows (``--init data``); ``load_frozen`` copies and freezes a
trained universe's models (``--extend``); ``make_optimizer`` gives Adam/AdamW over the parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae import distributed
from usae.config import TrainConfig
from usae.config.train import DataConfig, SourceConfig
from usae.data.loader import DataOrder, Loader
from usae.data.source import Rows, TrainSource, store_source
from usae.device import require_memory, resolve_device
from usae.distributed import World
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import load
from usae.training.adam import FusedAdam
from usae.training.validate import Validator, check_validation

log = logging.getLogger(__name__)

# Past this many passes over a store, a run is warned that it may overfit (issue: 170 passes on 7k rows
# gave self R² 0.74 in-sample, 0.29 on held-out images of the same folder).
MANY_PASSES = 10


class TrainData(NamedTuple):
    """The pass over the rows that the runs of one ``fit_many`` share."""

    source: TrainSource
    names: list[str]
    """The models trained, in order."""
    order: DataOrder
    world: World
    device: torch.device
    validator: Validator | None
    """The held-out twin's first --val-rows rows (None: no twin, or --val-every 0)."""

    @property
    def store(self) -> Rows:
        """The training rows (a store, or images through backbones)."""
        return self.source.rows

    def loader(self) -> Loader:
        """This rank's batches, the next one assembled while a step trains (close it)."""
        return Loader(self.store, self.names, self.order, self.device, self.world.rank, self.world.size)


def check_same_data(cfgs: list[TrainConfig]) -> None:
    """``fit_many``'s runs must agree on their ``data`` group (they read one pass over the store)."""
    for cfg in cfgs:
        for group, cls in (("data", DataConfig), ("source", SourceConfig)):
            for f in dataclasses.fields(cls):
                mine, theirs = getattr(getattr(cfg, group), f.name), getattr(getattr(cfgs[0], group), f.name)
                if mine != theirs:
                    raise UsaeError(f"fit_many: runs differ in {f.name!r} ({mine!r} vs {theirs!r})")


def open_data(cfgs: list[TrainConfig], source: TrainSource | None = None) -> TrainData:
    """The rows (``source``, default: the store ``cfgs[0].store`` and its held-out twin), the models
    trained, the ranks, the row order of every step and the held-out rows."""
    data = cfgs[0].data
    if source is None:
        if data.store is None:
            raise UsaeError(
                "--images: training from images goes through usae.pipeline.train(cfg), which runs the backbones"
            )
        source = store_source(data.store)
    store = source.rows
    names = trained_models(cfgs[0], store)
    for cfg in cfgs:
        check_validation(cfg, source.held_out, store.path)
    world, device = distributed.init(resolve_device(data.device))
    row_bytes = store.dtype.itemsize * sum(store.widths[n] for n in names)
    window_rows = max(data.batch_size, data.shuffle_buffer_mb * 2**20 // row_bytes)
    order = DataOrder(store.n_rows, data.batch_size, data.seed, window_rows=window_rows)
    wanted = source.held_out is not None and any(c.io.val_every != 0 for c in cfgs)
    val_rows = max(c.io.val_rows for c in cfgs)
    validator = Validator(source.held_out, names, val_rows, device) if wanted else None
    return TrainData(source, names, order, world, device, validator)


def trained_models(cfg: TrainConfig, store: Rows) -> list[str]:
    """The models of ``store`` that ``cfg`` trains (``--models``, default all; with --images, all the
    backbones), once one step of them is known to fit in the device's memory; warns when the run
    would read the rows many times over."""
    data = cfg.data
    names = list(data.models) if data.models and cfg.source.images is None else store.model_names
    for name in names:
        if name not in store.widths:
            raise UsaeError(f"--models: {name!r} is not in store {store.path} (models: {store.model_names})")
    if data.batch_size > store.n_rows:
        log.warning("batch_size %d exceeds the store's %d rows; rows repeat in a batch", data.batch_size, store.n_rows)
    require_memory(
        resolve_device(data.device),
        cfg.arch.sae_config({n: store.widths[n] for n in names}).batch_bytes(data.batch_size),
        f"one step of --batch-size {data.batch_size} x --n-latents {cfg.arch.n_latents}",
        "lower --batch-size or --n-latents",
    )
    passes = data.steps * data.batch_size / store.n_rows
    log.info("training %d steps x %d rows = %.1f passes over the %d rows of %s", data.steps, data.batch_size,
             passes, store.n_rows, store.path)  # fmt: skip
    if passes > MANY_PASSES:
        how = "--val-fraction or --val-images" if cfg.source.images else "usae extract --val-fraction"
        log.warning(
            "%.0f passes over %d rows: the dictionary may memorise them; measure it on held-out images (%s) "
            "or use more images", passes, store.n_rows, how,
        )  # fmt: skip
    return names


def _normalization(store: Rows, name: str, mode: str) -> tuple[Tensor, Tensor]:
    st = store.stats(name)
    d = store.widths[name]
    mean_d = torch.as_tensor(np.asarray(st.mean), dtype=torch.float32)
    if mode == "scalar":
        return mean_d, torch.tensor(max(st.std, 1e-8))
    if mode == "per-dim":
        return mean_d, torch.as_tensor(np.sqrt(np.asarray(st.var)), dtype=torch.float32).clamp_min(1e-8)
    if mode == "paper":
        total_std = math.sqrt(st.std**2 + float(np.var(np.asarray(st.mean))))
        return torch.full((d,), st.scalar_mean), torch.tensor(max(total_std, 1e-8))
    return torch.zeros(d), torch.ones(())


def build_sae(cfg: TrainConfig, store: Rows, names: list[str], device: torch.device) -> UniversalSAE:
    """A UniversalSAE for ``names`` with the store's normalisation, randomly initialised (seeded)."""
    sae_cfg = cfg.arch.sae_config({n: store.widths[n] for n in names})
    sae = UniversalSAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.data.seed))
    for name in names:
        sae.set_normalization_(name, *_normalization(store, name, cfg.arch.normalization))
    return sae.to(device)


def make_optimizer(sae: UniversalSAE, cfg: TrainConfig) -> FusedAdam:
    """Adam/AdamW, fused (one kernel over all parameters, on CPU and GPU: ~15% faster steps), as
    ``torch.optim.Adam(fused=True)`` steps but without importing ``torch._dynamo`` (training/adam.py)."""
    opt = cfg.optim
    if opt.optimizer == "adamw":
        enc = [p for n, p in sae.named_parameters() if n.endswith("W_enc")]
        rest = [p for n, p in sae.named_parameters() if not n.endswith("W_enc")]
        groups = [
            {"params": enc, "weight_decay": opt.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        return FusedAdam(groups, lr=0.0, betas=opt.betas, decoupled=True)
    return FusedAdam(sae.parameters(), lr=0.0, betas=opt.betas)


def start_from_data(
    sae: UniversalSAE, cfg: TrainConfig, store: Rows, names: list[str], order: DataOrder, device: torch.device
) -> None:
    """``--init data``: every model's dictionary from the same rows (the first batch's, sorted), so
    latent l starts as one token seen by every model in ``names``."""
    if cfg.arch.init != "data" or not names:
        return
    rows = np.sort(order.rows(0)[: max(cfg.arch.n_latents, 1)])
    x_n = {n: sae.normalize(n, torch.from_numpy(store.take(n, rows)).to(device)) for n in names}
    sae.init_from_data_(x_n, generator=torch.Generator().manual_seed(cfg.data.seed + 1))


def load_frozen(cfg: TrainConfig, sae: UniversalSAE) -> list[str]:
    """--extend: copy the old run's models into ``sae`` and freeze them; returns their names.

    The old run's dictionary stays exactly as it was: only the new models' encoders and decoders
    receive gradients, so their concepts land on the existing latents.
    """
    extend, store = cfg.arch.extend, cfg.data.store or cfg.source.images
    old = load(extend)
    if old.n_latents != sae.n_latents or old.cfg.encoder != sae.cfg.encoder:
        raise UsaeError(
            f"--extend: {extend} has n_latents={old.n_latents}, encoder={old.cfg.encoder!r}; "
            f"pass the same --n-latents/--encoder"
        )
    missing = [n for n in old.model_names if n not in sae.model_names]
    if missing:
        raise UsaeError(f"--extend: store {store} lacks the run's models {missing} (rows must pair with them)")
    if len(old.model_names) == len(sae.model_names):
        raise UsaeError(f"--extend: store {store} has no model beyond those of {extend}")
    for name in old.model_names:
        head = sae.head(name)
        head.load_state_dict(old.head(name).state_dict())
        head.requires_grad_(False)
    return old.model_names
