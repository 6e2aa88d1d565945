"""Deprecated path: use ``usae.training`` (fit.py, step.py, rules.py, run_dir.py); this thin re-export stays for code written before 0.2."""

import warnings

from usae.device import native_bf16, resolve_device  # noqa: F401
from usae.training.fit import FitResult, build_sae, fit, fit_many, make_optimizer  # noqa: F401
from usae.training.rules import sources_at  # noqa: F401
from usae.training.run_dir import load_train_config, resolved_train_dict  # noqa: F401
from usae.training.step import StepStats, default_lr, lr_at, train_step  # noqa: F401

warnings.warn("usae.train is deprecated; import from usae.training", DeprecationWarning, stacklevel=2)
