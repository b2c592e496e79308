"""The evaluation section: metric vs budget (Figure 2), statistics table, labelling time saved (Figure 3)."""

from __future__ import annotations

from ..schema import EVALUATION_STATS
from . import figures
from .artifacts import read_json
from .html import Markup, figure, fmt_int, note, table, tag
from .page import ReportPage

METHODS = ("enrich", "random")
METRIC_NAMES = {"auc": "test AUC", "mean_jaccard": "test mean Jaccard (foreground classes)"}


def _fmt_metric(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def _fmt_p(p: float | None, alpha: float) -> str:
    if p is None:
        return "-"
    return f"{p:.3g}{' *' if p < alpha else ''}"


def fmt_duration(seconds: float | None) -> str:
    """Seconds as a readable duration (s, min or h)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def evaluation(out: ReportPage) -> list[Markup]:
    """One sub-section per evaluated task, or the command that produces the evaluation."""
    stats = read_json(out.run, EVALUATION_STATS)
    if not stats:
        return [out.absent("evaluation statistics (evaluation/stats.json)", "enrich evaluate")]
    parts: list[Markup] = []
    for task, task_stats in sorted(stats.items()):
        parts += _task(out, task, task_stats)
    return parts


def _task(out: ReportPage, task: str, s: dict) -> list[Markup]:
    """Statistics table and Figures 2 and 3 for one task."""
    alpha = s.get("alpha", 0.05)
    metric = METRIC_NAMES.get(s.get("metric"), str(s.get("metric")))
    full = s.get("full") or {}
    budgets = s.get("budgets") or []
    split = s.get("split") or {}
    parts = [
        tag("h3", task.capitalize()),
        note(
            f"Model {s.get('model')} at {s.get('image_size')}x{s.get('image_size')} pixels, "
            f"{fmt_int(s.get('n_train'))} training and {fmt_int(s.get('n_test'))} test images "
            f"(split from {split.get('source', '?')}, grouped by {split.get('group_by', '?')}), "
            f"{s.get('replicates')} replicate(s) per budget and method; {metric}. "
            f"p: two-sided Mann-Whitney U; * p < {alpha:g}."
        ),
    ]
    min_p = s.get("min_p_value")
    if min_p is not None and min_p > alpha:
        parts.append(
            tag(
                "p",
                f"With {s.get('replicates')} replicates the test cannot reach p < {alpha:g} (smallest possible "
                f"p = {min_p:.3g}): every budget looks indistinguishable. Use more replicates (the paper used 10).",
                cls="missing",
            )
        )
    rows = [
        (
            f"{100 * e['budget']:.3g}%",
            fmt_int(e.get("n_train")),
            _fmt_metric(e.get("enrich")),
            _fmt_metric(e.get("random")),
            _fmt_p(e.get("p_enrich_vs_random"), alpha),
            _fmt_p(e.get("p_enrich_vs_full"), alpha),
            _fmt_p(e.get("p_random_vs_full"), alpha),
        )
        for e in budgets
    ]
    rows.append(("100% (full)", fmt_int(full.get("n_train")), _fmt_metric(full), _fmt_metric(full), "", "", ""))
    headers = ["budget", "images", "enrich", "random", "p enrich vs random", "p enrich vs full", "p random vs full"]
    parts.append(table(headers, rows))
    series = {
        m: {
            "budget": [e["budget"] for e in budgets if (e.get(m) or {}).get("mean") is not None],
            "mean": [e[m]["mean"] for e in budgets if (e.get(m) or {}).get("mean") is not None],
            "std": [e[m]["std"] for e in budgets if (e.get(m) or {}).get("mean") is not None],
            "matches_full": [
                bool(e.get(f"{m}_matches_full")) for e in budgets if (e.get(m) or {}).get("mean") is not None
            ],
        }
        for m in METHODS
    }
    significant = [
        e["budget"] for e in budgets if e.get("p_enrich_vs_random") is not None and e["p_enrich_vs_random"] < alpha
    ]
    reference = (full["mean"], full["std"]) if full.get("mean") is not None else None
    png = figures.metric_vs_budget(series, reference, significant, metric)
    parts.append(
        figure(
            out.add_figure(f"{task}_metric_vs_budget.png", png),
            f"{metric} vs budget",
            f"{metric} vs budget (the paper's Figure 2): mean ± sd over replicates; dashed line and band: "
            "full training set; filled markers: indistinguishable from the full set; *: ENRICH and random differ.",
        )
    )
    parts += _labelling(out, task, s)
    return parts


def _labelling(out: ReportPage, task: str, s: dict) -> list[Markup]:
    """The smallest budget matching the full set per method and the labelling time it saves."""
    labelling = s.get("labelling") or {}
    smallest = s.get("smallest_budget_matching_full") or {}
    full_seconds = labelling.get("full_seconds")
    if full_seconds is None:
        return [note("No full-training-set models: the labelling time saved cannot be computed.")]
    rows = []
    for m in METHODS:
        entry, saved = smallest.get(m), labelling.get(m)
        if entry is None or saved is None:
            rows.append((m, "none", "-", "-", "-"))
            continue
        rows.append(
            (
                m,
                f"{100 * entry['budget']:.3g}%",
                fmt_int(entry["n_train"]),
                fmt_int(saved["images_saved"]),
                fmt_duration(saved["seconds_saved"]),
            )
        )
    per_image = labelling.get("seconds_per_image")
    parts = [
        tag("h4", "Labelling time saved"),
        note(
            "Smallest budget from which every larger budget is indistinguishable from the full set "
            f"(or better); labelling at {fmt_duration(per_image)} per image, "
            f"{fmt_duration(full_seconds)} for the full training set."
        ),
        table(["method", "smallest budget", "images", "images not labelled", "time saved"], rows, align="l"),
    ]
    saved_hours = {m: (labelling[m]["seconds_saved"] / 3600 if labelling.get(m) else None) for m in METHODS}
    png = figures.labelling_time(full_seconds / 3600, saved_hours)
    parts.append(
        figure(
            out.add_figure(f"{task}_labelling_time.png", png),
            "labelling time saved",
            "Labelling time saved by each method's smallest sufficient subset (the paper's Figure 3).",
        )
    )
    return parts
