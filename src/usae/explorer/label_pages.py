"""Concept labels on the explorer's pages: reading labels.json (or plain names), label slugs, artifact marks, label pages.

``usae label`` writes labels.json (evaluation/labeling.py); the site shows each family's names in the
table, the scores and chance level on concept pages, one page per label, and marks position /
background concepts by the artifact rule below.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from usae._input import NUMBER, NUMBER_OR_NULL, Maybe, check_schema
from usae._io import read_json
from usae.config import ExploreConfig
from usae.data.store import Store
from usae.errors import UsaeError
from usae.evaluation.naming.label import ARTIFACT_TOP, LABELS_JSON, concept_names
from usae.explorer.concepts import write_page, writing

log = logging.getLogger(__name__)


LABEL_SLUG_RESERVED = frozenset(
    {"index", "con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(10)}
)


class ConceptLabels(NamedTuple):
    """The labels the site shows; ``scored`` is set for a labels.json of ``usae label``."""

    text: dict[int, str]
    """concept -> its label text (table, image pages, search): names per family, '?' when not agreeing."""
    scored: dict[str, Any] | None = None
    """labels.json with concept keys as ints; None for a plain {concept: text} file."""
    source: Path | None = None


def labels_path(cfg: ExploreConfig) -> Path | None:
    """``--labels``, else RUN/labels.json when it exists (from ``usae label RUN STORE``)."""
    if cfg.labels is not None:
        return Path(cfg.labels)
    default = Path(cfg.run) / LABELS_JSON
    return default if default.is_file() else None


def read_concept_labels(
    path: Path | None, n_latents: int, model_names: list[str], *, explicit: bool = True
) -> ConceptLabels:
    """Labels from ``path``: labels.json of ``usae label`` (it has "families") or {"<concept>": "text"}.

    A file found by default (not ``explicit``) that cannot be read is skipped with a warning.
    """
    if path is None:
        return ConceptLabels({})
    try:
        data = read_json(path, "concept labels")
        if isinstance(data, dict) and "families" in data:
            scored = _check_scored_labels(path, data, n_latents, model_names)
            return ConceptLabels(_label_texts(scored), scored, path)
        return ConceptLabels(_read_plain_labels(path, data, n_latents), None, path)
    except UsaeError as e:
        if explicit:
            raise
        log.warning("%s; the site has no concept labels", e)
        return ConceptLabels({})


def _read_plain_labels(path: Path, data: Any, n_latents: int) -> dict[int, str]:
    """User concept labels: a JSON object {"<concept>": "label"} (by hand, or names.json of `usae label`)."""
    if not isinstance(data, dict):
        raise UsaeError(f"{path}: concept labels must be a JSON object mapping concept ids to text")
    labels = {}
    for key, text in data.items():
        if not str(key).isdigit() or not 0 <= int(key) < n_latents or not isinstance(text, str):
            raise UsaeError(f"{path}: entry {str(key)[:40]!r} is not '<concept in [0, {n_latents})>': '<text>'")
        labels[int(key)] = text
    return labels


# a concept page's row: every key read (a missing one was a template error), the numbers as numbers
_SCORES = {"label": str, "significant": bool} | {
    k: NUMBER_OR_NULL for k in ("precision_at_n", "lift", "auroc", "p_value", "n")
}
_SUMMARY = Maybe({"used": Maybe({str: NUMBER}), "named": Maybe({str: NUMBER}), **{
    k: Maybe(NUMBER) for k in ("shared", "agreed", "p_threshold")}})  # fmt: skip
# What the site reads of a labels.json (a number shown on a page must be a number; docs/format.md has the rest)
_FAMILY_SCHEMA = {"level": Maybe(str), "n_items": Maybe(NUMBER), "summary": _SUMMARY, "shuffled": _SUMMARY}


def _check_scored_labels(path: Path, data: dict, n_latents: int, model_names: list[str]) -> dict[str, Any]:
    """labels.json checked against the run (models, concept ids) and the schema of what the pages
    show (``check_schema``: a string where a score belongs is one line naming the key); concept keys become ints."""

    def bad(what: str) -> UsaeError:
        return UsaeError(f"{path}: not a labels.json of `usae label` for this run: {what}")

    if data.get("model_names") != list(model_names):
        raise bad(f"models {str(data.get('model_names'))[:200]}, the run has {model_names}")
    families = data["families"]
    if not isinstance(families, dict):
        raise bad("'families' is not an object")
    out_families = {}
    for fam, f in families.items():
        if not isinstance(f, dict) or not isinstance(f.get("concepts"), dict):
            raise bad(f"family {str(fam)[:40]!r} has no 'concepts' object")
        check_schema(f, _FAMILY_SCHEMA, path, f"families.{fam}")
        concepts = {}
        for key, entry in f["concepts"].items():
            if not str(key).isdigit() or not 0 <= int(key) < n_latents or not isinstance(entry, dict):
                raise bad(
                    f"family {fam!r}: concept {str(key)[:40]!r} is not an entry for a concept in [0, {n_latents})"
                )
            for m in model_names:
                s = entry.get(m)
                if s is not None and not (isinstance(s, dict) and isinstance(s.get("label"), str)):
                    raise bad(f"family {fam!r}, concept {key}, model {m!r}: expected null or an object with a 'label'")
                check_schema(s, Maybe(_SCORES), path, f"families.{fam}.concepts.{key}.{m}")
            if entry.get("best") is not None and not isinstance(entry["best"], str):
                raise bad(f"family {fam!r}, concept {key}: 'best' is not text")
            concepts[int(key)] = entry
        labels = f.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
            raise bad(f"family {fam!r}: 'labels' is not a list of names")
        out_families[str(fam)] = {**f, "labels": labels, "concepts": concepts}
    artifacts = data.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        raise bad("'artifacts' is not an object")
    for m, a in artifacts.items():
        for key in ("flat_share", "border_share"):
            shares = a.get(key) if isinstance(a, dict) else None
            if shares is not None and (not isinstance(shares, list) or len(shares) != n_latents):
                raise bad(f"artifacts of {str(m)[:40]!r}: {key} must list {n_latents} shares")
    return {**data, "families": out_families, "artifacts": artifacts}


def label_parts(scored: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """Concept k's name in each family: its best significant label, and whether every model using it agrees."""
    parts = []
    for fam, f in scored["families"].items():
        entry = f["concepts"].get(k) or {}
        if entry.get("best") is not None:
            parts.append({"family": fam, "name": entry["best"], "agrees": bool(entry.get("agrees"))})
    return parts


def _label_texts(scored: dict[str, Any]) -> dict[int, str]:
    """concept -> "name, name?" ('?': not the same significant name in every model using it), as names.json."""
    return {int(k): text for k, text in concept_names(scored).items()}


def label_slugs(names: Iterable[str]) -> dict[str, str]:
    """A file name stem for every label: lower-case ASCII words joined by '-', unique among ``names``.

    A name with other characters (or whose words another name shares, or that would be empty or a
    reserved file name such as ``index``) gets 8 hex digits of its SHA-1 appended, so stems never
    collide, also on case-insensitive file systems, and every stem is safe in a URL.
    """
    names = sorted(set(names))
    base = {n: re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-")[:60].strip("-") for n in names}
    count = Counter(base.values())
    slugs = {}
    for n in names:
        b = base[n]
        plain = b and n.isascii() and count[b] == 1 and b not in LABEL_SLUG_RESERVED
        slugs[n] = b if plain else f"{b or 'label'}-{hashlib.sha1(n.encode()).hexdigest()[:8]}"
    return slugs


def all_label_names(scored: dict[str, Any]) -> set[str]:
    names = set()
    for f in scored["families"].values():
        names.update(f["labels"])
        for entry in f["concepts"].values():
            names.update(s["label"] for s in entry.values() if isinstance(s, dict))
            if entry.get("best") is not None:
                names.add(entry["best"])
    return names


def _family_info(fam: str, f: dict[str, Any]) -> dict[str, Any]:
    """One family's header: level, items, labels, and its naming summary next to the shuffled-label control."""

    def summary(s: Any) -> dict[str, Any]:
        s = s if isinstance(s, dict) else {}
        return {
            "used": s.get("used") or {},
            "named": s.get("named") or {},
            "shared": s.get("shared"),
            "agreed": s.get("agreed"),
            "p_threshold": s.get("p_threshold"),
        }

    return {
        "name": fam,
        "level": f.get("level", ""),
        "n_items": f.get("n_items"),
        "n_labels": len(f["labels"]),
        "summary": summary(f.get("summary")),
        "shuffled": summary(f.get("shuffled")),
    }


def label_scores(scored: dict[str, Any], k: int, names: list[str], slugs: dict[str, str]) -> list[dict[str, Any]]:
    """Concept k's page: per family, each model's best label with its scores, and the family's chance line."""
    out = []
    for fam, f in scored["families"].items():
        entry = f["concepts"].get(k)
        if entry is None:
            continue
        rows = [
            {"model": m, "s": entry.get(m), "slug": slugs[entry[m]["label"]] if entry.get(m) else None} for m in names
        ]
        best = entry.get("best")
        out.append(
            {
                "info": _family_info(fam, f),
                "rows": rows,
                "best": best,
                "best_slug": slugs.get(best, ""),
                "agrees": bool(entry.get("agrees")),
            }
        )
    return out


def _sort_key(row: dict[str, Any]) -> tuple:
    """Significant first, then by precision@N and lift (largest first; undefined last), then concept id."""

    def num(v: Any) -> float:
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else -math.inf

    s = row["s"]
    return (s.get("significant") is not True, -num(s.get("precision_at_n")), -num(s.get("lift")), row["k"])


def label_pages(
    scored: dict[str, Any], concepts: list[dict[str, Any]], slugs: dict[str, str], env, common, site: Path
) -> list[dict[str, Any]]:
    """labels/<slug>.html: per family and model, the concepts whose best label it is; and labels/index.html."""
    names = common["names"]
    with writing(site / "labels"):
        (site / "labels").mkdir()
    by_id = {c["id"]: c for c in concepts}
    pages: dict[str, list[dict[str, Any]]] = {}
    families = []
    for fam, f in scored["families"].items():
        per_label: dict[str, dict[str, list]] = {}
        agree: Counter[str] = Counter()
        for k, entry in sorted(f["concepts"].items()):
            best, agrees = entry.get("best"), bool(entry.get("agrees"))
            if agrees and best is not None:
                agree[best] += 1
            for m in names:
                if (s := entry.get(m)) is not None:
                    per_label.setdefault(s["label"], {n: [] for n in names})[m].append(
                        {"k": k, "c": by_id[k], "s": s, "agrees": agrees and best == s["label"]}
                    )
        rows = []
        for name in dict.fromkeys([*f["labels"], *sorted(per_label)]):  # the family's order, then any others
            columns = []
            for m, found in per_label.get(name, {n: [] for n in names}).items():
                found.sort(key=_sort_key)
                n_sig = sum(r["s"].get("significant") is True for r in found)
                columns.append({"name": m, "rows": found, "n_sig": n_sig})
            pages.setdefault(name, []).append(
                {"info": _family_info(fam, f), "columns": columns, "n_agree": agree[name]}
            )
            rows.append({"name": name, "slug": slugs[name], "columns": columns, "n_agree": agree[name]})
        families.append({"info": _family_info(fam, f), "labels": rows})
    template = env.get_template("label.html")
    for name, sections in pages.items():
        page = template.render(**common, root="../", title=f"Label {name}", name=name, sections=sections)
        write_page(site / "labels" / f"{slugs[name]}.html", page)
    index = env.get_template("labels_index.html").render(
        **common, root="../", title="Labels", families=families, scored=scored
    )
    write_page(site / "labels" / "index.html", index)
    return families


def same_store(scored: dict[str, Any] | None, store: Store) -> bool:
    """Whether labels.json was computed on the explorer's store (its recorded hash)."""
    recorded = scored.get("store") if scored else None
    return isinstance(recorded, dict) and recorded.get("hash") == store.hash


def artifact_summary(concepts: list[dict[str, Any]]) -> dict[str, int]:
    """Marked concepts among the ``ARTIFACT_TOP`` universal concepts of most energy (the table's order)."""
    ranked = [c for c in sorted(concepts, key=lambda c: c["energy"], reverse=True) if c["cls"] == "universal"]
    top = ranked[:ARTIFACT_TOP]
    kinds = Counter(m["kind"] for c in top for m in c["marks"])
    return {
        "n": len(top),
        "marked": sum(bool(c["marks"]) for c in top),
        "flat": kinds["flat"],
        "border": kinds["border"],
    }
