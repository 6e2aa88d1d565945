"""The one Jinja2 environment builder: the report's markdown and the explorer's HTML pages.

Both are filled from JSON artifacts, so undefined names fail loudly (``StrictUndefined``) rather
than rendering blanks; HTML is autoescaped (concept names come from user labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import numpy as np


def format_number(v: Any) -> str:
    """A table cell: '–' for missing, integers as is, floats to 3 significant digits."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, int | np.integer):
        return str(int(v))
    v = float(v) + 0.0  # -0.0 prints as "0"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def environment(template_dir: Path, *, html: bool) -> jinja2.Environment:
    """Templates under ``template_dir``; ``html`` autoescapes (the explorer), else markdown (the report)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True) if html else False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=not html,
    )
    env.filters["num"] = format_number
    return env
