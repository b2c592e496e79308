"""Before labelling: will the ranking beat random subsets on this archive, and what budget to label.

Label-free only. Random subsets allocate labels in proportion to group size (clips, or groups of
near-duplicates), so they lose to a ranking that spreads its picks only when the groups are
unequal. The prediction therefore rests on the redundancy *concentration* the select stage measured
(the share of images held by the largest fifth of the groups: 0.2 when all groups are equal): at or
above ``UNEVEN`` the ranking is expected to beat random. The recommended budget is the first one
after which at least half of the images the ranking adds repeat an image it already holds (same
clip, or a neighbor above 0.9): past it, new labels mostly repeat labelled content. When the
evaluation stage has run, each budget shows whether the prediction held.

Calibration (``benchmarks/selection_quality.py``, 2026-12-03; concentration by clip): farthest-first
beat random on digits with uneven clips (0.80) and on the uneven synthetic echo (0.53), and did not
on digits with equal clips (0.20). The uniform synthetic echo of the demo measures 0.27.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..schema import EVALUATION_STATS, SELECTION_STATS
from .artifacts import SUBSETS, read_json
from .html import Markup, note, table, tag
from .page import ReportPage

SELECTION_JSON = SELECTION_STATS
UNEVEN = 0.4  # twice the share equal groups give: random subsets over-sample the large groups
EXHAUSTED = 0.5  # the ranking's images added past a budget repeat labelled content at least this often


def repeat_shares(rows: list[dict]) -> dict[str, dict[float, tuple[float, float]]]:
    """Per method and budget: (mean images, mean repeats) over replicates; empty when repeats were not measured."""
    acc: dict[tuple[str, float], list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        if r.get("n_repeats") is not None:
            acc[(r["method"], float(r["budget"]))].append((r["n_images"], r["n_repeats"]))
    out: dict[str, dict[float, tuple[float, float]]] = defaultdict(dict)
    for (method, budget), values in acc.items():
        out[method][budget] = (float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values])))
    return dict(out)


def recommended_budget(shares: dict[float, tuple[float, float]]) -> float | None:
    """The first budget after which at least ``EXHAUSTED`` of the ranking's added images are repeats."""
    budgets = sorted(shares)
    for low, high in zip(budgets, budgets[1:], strict=False):
        added = shares[high][0] - shares[low][0]
        if added > 0 and (shares[high][1] - shares[low][1]) / added >= EXHAUSTED:
            return low
    return None


def observed(entry: dict, alpha: float) -> str:
    """"ahead", "behind" or "no difference" of ENRICH against random at one evaluated budget."""
    p, e, r = entry.get("p_enrich_vs_random"), entry.get("enrich") or {}, entry.get("random") or {}
    if p is None or e.get("mean") is None or r.get("mean") is None or not p < alpha:
        return "no difference"
    return "ahead" if e["mean"] > r["mean"] else "behind"


def prediction(out: ReportPage) -> list[Markup]:
    """The section: concentration, repeats per budget (ENRICH vs random), the prediction and, after evaluation, its check."""
    if not out.run.exists(SUBSETS):
        # the selection section already lists the missing subsets with the command that makes them
        return [note("Needs the selection stage (`enrich select`).")]
    stats = read_json(out.run, SELECTION_JSON) or {}
    shares = repeat_shares(out.run.read_table(SUBSETS).to_pylist())
    conc = stats.get("redundancy_concentration") or {}
    measure = stats.get("repeats_measured_by")
    if not shares or conc.get("largest_fifth_share") is None:
        return [note(
            "Not measured: the archive has no clip ids and the similarity stage made no exact neighbor lists with "
            "counts above 0.9, so nothing label-free tells repeats apart (run the exact similarity stage)."
        )]
    share = conc["largest_fifth_share"]
    uneven = share >= UNEVEN
    by = "clip" if measure == "clip" else "near-duplicate group (similarity above 0.9)"
    verdict = (
        "ENRICH is expected to beat random subsets here, most at small budgets: random subsets spend their labels "
        "on the large groups in proportion to their size."
        if uneven
        else "Expect no clear gain over random subsets here: with groups of similar size a random subset already "
        "spreads its labels over them (the digits benchmark with equal clips behaved so)."
    )
    parts = [
        tag(
            "p",
            f"Redundancy by {by}: about {conc['groups']:,.0f} groups; the largest fifth of them hold "
            f"{100 * share:.0f} % of the images (20 % when all are equal; {100 * UNEVEN:.0f} % or more counts as "
            f"uneven). {verdict}",
        )
    ]
    enrich, random = shares.get("enrich", {}), shares.get("random", {})
    recommend = recommended_budget(enrich) if enrich else None
    evaluation = _evaluated(out)
    headers = ["budget", "images", "repeats, enrich", "repeats, random", "predicted"]
    if evaluation:
        headers += ["observed (evaluation)", "held"]
    rows = []
    for budget in sorted(set(enrich) & set(random)):
        n, e_rep = enrich[budget]
        r_rep = random[budget][1]
        row = [f"{100 * budget:.3g}%", f"{n:,.0f}", f"{100 * e_rep / n:.0f} %", f"{100 * r_rep / n:.0f} %",
               "ahead" if uneven else "no clear gain"]
        if evaluation:
            seen = evaluation.get(round(budget, 6))
            row += ["-", "-"] if seen is None else [seen, "yes" if (seen == "ahead") == uneven else "no"]
        rows.append(row)
    parts.append(table(headers, rows))
    parts.append(note(
        "Repeats: images of the subset whose clip (or a near-duplicate) is already in it, mean over replicates. "
        + (
            f"Recommended labelling budget: {100 * recommend:.3g}% — past it, at least half of the images the "
            "ranking adds repeat labelled content."
            if recommend is not None
            else "No budget below the largest reported one passes the point where most added images repeat "
            "labelled content: the archive holds little redundancy the ranking can skip."
        )
    ))
    return parts


def _evaluated(out: ReportPage) -> dict[float, str] | None:
    """Budget -> observed outcome of the first evaluated task, or None before evaluation."""
    stats = read_json(out.run, EVALUATION_STATS)
    if not stats:
        return None
    task = stats[sorted(stats)[0]]
    alpha = task.get("alpha", 0.05)
    return {round(float(e["budget"]), 6): observed(e, alpha) for e in task.get("budgets") or []}
