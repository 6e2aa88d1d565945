"""Deprecated path: use ``usae.model.metrics`` (this thin re-export stays for code written before 0.2)."""

import warnings

from usae.model.metrics import (  # noqa: F401
    classify_latents,
    cofire_proportion,
    dead_fraction,
    energy,
    firing_entropy,
    fvu,
    l0,
    r2,
    r2_from_sums,
)

warnings.warn("usae.metrics is deprecated; import from usae.model.metrics", DeprecationWarning, stacklevel=2)
