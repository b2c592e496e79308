"""Statistics over the trained models: mean/std per budget, Mann-Whitney U tests, the smallest budget
that matches the full training set, and the labelling time that budget saves."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

METHODS = ("enrich", "random")
FULL = "full"


def mean_std(values: Sequence[float]) -> dict:
    """``mean``, ``std`` (sample, ddof=1; 0 for one value) and ``n`` of the finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "n": int(arr.size),
    }


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Mann-Whitney U p-value of two samples (finite values only); None if either is empty."""
    a = [v for v in a if v is not None and math.isfinite(v)]
    b = [v for v in b if v is not None and math.isfinite(v)]
    if not a or not b:
        return None
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def min_p_value(n_a: int, n_b: int) -> float | None:
    """The smallest two-sided p-value the test (as run here) can reach with samples of these sizes."""
    if n_a < 1 or n_b < 1:
        return None
    return float(mannwhitneyu(range(n_a), range(n_a, n_a + n_b), alternative="two-sided").pvalue)


def matches_full(entry: dict, method: str, alpha: float, full_mean: float | None) -> bool:
    """Whether ``method`` at this budget matches the full set: no difference at ``alpha``, or a mean as high."""
    mean = (entry.get(method) or {}).get("mean")
    if full_mean is None or mean is None:
        return False
    p = entry.get(f"p_{method}_vs_full")
    return (p is not None and p >= alpha) or mean >= full_mean


def smallest_matching_budget(per_budget: list[dict], method: str) -> dict | None:
    """The smallest budget from which every larger budget matches the full set for ``method``."""
    found = None
    for entry in sorted(per_budget, key=lambda e: e["budget"], reverse=True):
        if not entry.get(f"{method}_matches_full"):
            break
        found = entry
    if found is None:
        return None
    return {"budget": found["budget"], "n_train": found["n_train"], "mean": found[method]["mean"]}


def summarize(rows: Sequence[dict], alpha: float, seconds_per_image: float) -> dict:
    """Per-budget statistics and the labelling time saved, from result rows of one task.

    ``rows`` hold ``method`` (enrich, random or full), ``budget``, ``replicate``, ``n_train`` and ``metric``.
    """
    values: dict[tuple[str, float], list[float]] = defaultdict(list)
    n_train: dict[float, list[int]] = defaultdict(list)
    for r in rows:
        values[(r["method"], float(r["budget"]))].append(r["metric"])
        if r["method"] != FULL:
            n_train[float(r["budget"])].append(int(r["n_train"]))
    full_rows = [r for r in rows if r["method"] == FULL]
    full_values = [r["metric"] for r in full_rows]
    full = mean_std(full_values)
    n_full = int(round(np.mean([r["n_train"] for r in full_rows]))) if full_rows else None
    per_budget = []
    for budget in sorted(n_train):
        entry: dict = {"budget": budget, "n_train": int(round(np.mean(n_train[budget])))}
        for method in METHODS:
            entry[method] = mean_std(values.get((method, budget), []))
            entry[f"p_{method}_vs_full"] = mann_whitney_p(values.get((method, budget), []), full_values)
        entry["p_enrich_vs_random"] = mann_whitney_p(
            values.get(("enrich", budget), []), values.get(("random", budget), [])
        )
        for method in METHODS:
            entry[f"{method}_matches_full"] = matches_full(entry, method, alpha, full["mean"])
        per_budget.append(entry)
    smallest = {m: smallest_matching_budget(per_budget, m) for m in METHODS}
    replicates = len({r["replicate"] for r in rows})
    return {
        "alpha": alpha,
        "replicates": replicates,
        "min_p_value": min_p_value(replicates, replicates),
        "full": {**full, "n_train": n_full},
        "budgets": per_budget,
        "smallest_budget_matching_full": smallest,
        "labelling": labelling_time(smallest, per_budget, n_full, seconds_per_image),
    }


def labelling_time(
    smallest: dict[str, dict | None], per_budget: list[dict], n_full: int | None, seconds_per_image: float
) -> dict:
    """Labelling seconds of the full set, saved at each budget, and saved by each method's smallest budget."""
    out: dict = {
        "seconds_per_image": seconds_per_image,
        "full_seconds": None if n_full is None else n_full * seconds_per_image,
        "saved_seconds_per_budget": [],
    }
    if n_full is None:
        return out
    out["saved_seconds_per_budget"] = [
        {
            "budget": e["budget"],
            "n_train": e["n_train"],
            "seconds": (n_full - e["n_train"]) * seconds_per_image,
        }
        for e in per_budget
    ]
    for method, entry in smallest.items():
        if entry is None:
            out[method] = None
            continue
        saved = n_full - entry["n_train"]
        out[method] = {
            "budget": entry["budget"],
            "images_saved": saved,
            "seconds_saved": saved * seconds_per_image,
        }
    return out
