"""The update rules as one table: what each rule encodes, selects and steps.

``TrainConfig.rule`` names a row of :data:`RULES`; the trainer reads the row's fields and never
compares rule names. To add a rule: add its name to ``config.train.Rule`` and a row here (a
test checks that the two agree).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class UpdateRule(NamedTuple):
    """What one training step does under a rule."""

    one_source: bool
    """Encode one model per step, drawn from (seed, step) (the paper); else every model."""
    global_code: bool
    """Choose one latent set per row from the summed pre-activations of all models (SPARC's
    global TopK; no AuxK); else each source model chooses its own k latents."""
    shared_values: bool
    """With ``global_code``: one value per chosen latent for all models, i.e. a single joint code
    (acausal crosscoder) whose losses are not averaged over models."""
    source_grads_only: bool
    """Step only the encoded model's parameters, dropping the gradients that reach the other
    models' heads (the official loop's behaviour, for replication)."""


RULES: dict[str, UpdateRule] = {
    "random-source": UpdateRule(one_source=True, global_code=False, shared_values=False, source_grads_only=False),
    "all-sources": UpdateRule(one_source=False, global_code=False, shared_values=False, source_grads_only=False),
    "as-released": UpdateRule(one_source=True, global_code=False, shared_values=False, source_grads_only=True),
    "sparc": UpdateRule(one_source=False, global_code=True, shared_values=False, source_grads_only=False),
    "crosscoder": UpdateRule(one_source=False, global_code=True, shared_values=True, source_grads_only=False),
}


def sources_at(step: int, seed: int, names: list[str], rule: str) -> list[str]:
    """Models encoded at ``step``: one drawn from (seed, step) for one-source rules, else all."""
    if not RULES[rule].one_source:
        return list(names)
    return [names[int(np.random.default_rng([seed, step, 7]).integers(len(names)))]]
