"""Baselines for a universal SAE: independent SAEs + latent matching, and representation similarity.

The question a USAE answers is "which concepts do these models share?". The baseline answer is to
train one ordinary TopK SAE per model (same width, k and token budget, the same trainer: a
one-model UniversalSAE *is* a TopK SAE) and match latents across models afterwards. The measures
live here (``matching``, ``similarity``; pure functions and streaming passes); training the
independent SAEs and writing RUN/baselines.json is ``usae.experiments.baseline``. See
docs/report.md for what each number means.
"""

from usae.evaluation.baselines.matching import (
    CorrelationSums,
    Matching,
    dictionary_agreement,
    match_latents,
    matching_summary,
    stitch_dictionaries,
    stream_correlations,
)
from usae.evaluation.baselines.similarity import CKASums, linear_cka, model_pairs, mutual_knn, representation_similarity

__all__ = [
    "CKASums",
    "CorrelationSums",
    "Matching",
    "dictionary_agreement",
    "linear_cka",
    "match_latents",
    "matching_summary",
    "model_pairs",
    "mutual_knn",
    "representation_similarity",
    "stitch_dictionaries",
    "stream_correlations",
]
