"""Deprecated path: use ``usae.data.store`` (this thin re-export stays for code written before 0.2)."""

import warnings

from usae.data.store import ModelStats, Store, StoreWriter, content_hash, open_store, write_store  # noqa: F401

warnings.warn("usae.store is deprecated; import from usae.data.store", DeprecationWarning, stacklevel=2)
