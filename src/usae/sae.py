"""Deprecated path: use ``usae.model.sae`` (this thin re-export stays for code written before 0.2)."""

import warnings

from usae.model.sae import Head, SparseCode, UniversalSAE, dense  # noqa: F401

warnings.warn("usae.sae is deprecated; import from usae.model.sae", DeprecationWarning, stacklevel=2)
