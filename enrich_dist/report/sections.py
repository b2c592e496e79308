"""The report's sections built from the run's artifacts: header, redundancy, selection, encoder, config."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..executor import done_record
from ..schema import EMBEDDINGS_DIR
from ..schema import SELECTION_STATS as SELECTION_JSON
from . import figures
from .artifacts import RECONSTRUCTIONS, SUBSETS, TRAIN_JSON, VIEWS, Manifest, read_json
from .html import Markup, figure, fmt_int, fmt_mean_std, fmt_pct, join, note, table, tag
from .page import ReportPage

N_LABELS_SHOWN = 12
METHOD_ORDER = ("enrich", "random")


def header(out: ReportPage, manifest: Manifest | None) -> list[Markup]:
    """Run URI, date and the archive's size."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = "(path left out)" if out.private else tag("code", out.run.uri)
    parts = [note(join(["Run ", where, f" - report generated {now}"]))]
    if manifest is None:
        return [*parts, out.absent("manifest (manifest/part-*.parquet)", "enrich manifest")]
    labels = ", ".join(f"{k}: {fmt_int(v)}" for k, v in manifest.labels.most_common()) or "-"
    rows = [
        ("images ok", fmt_int(manifest.n_ok)),
        ("images with errors", fmt_int(manifest.n_error)),
        ("patients", fmt_int(manifest.n_patients)),
        ("clips", fmt_int(manifest.n_clips)),
        ("labels (ok images)", labels),
    ]
    parts.append(table(["archive", ""], rows, align="ll"))
    if manifest.errors and not out.private:
        shown = f"first {len(manifest.errors)} of {fmt_int(manifest.n_error)}"
        parts.append(note(f"Images that could not be read ({shown}):"))
        parts.append(table(["uri", "error"], [(e.get("uri"), e.get("error")) for e in manifest.errors], "ll"))
    return parts


def _paper_bins(summary: dict) -> list[tuple[str, float]]:
    """The paper's Figure 1 bins as (label, fraction), from a list or a label -> entry mapping."""
    raw = summary.get("paper_bins") or []
    entries = [{"label": k, **v} for k, v in raw.items()] if isinstance(raw, dict) else list(raw)
    n_pairs = summary.get("n_pairs") or 0
    out = []
    for e in entries:
        fraction = e.get("fraction")
        if fraction is None:
            fraction = e.get("pairs", 0) / n_pairs if n_pairs else 0.0
        out.append((str(e.get("label", "?")), float(fraction)))
    return out


def _inexact_why(summary: dict) -> str:
    """Why the similarity counts are not exact: summary.json's reasons, else its mode and precision."""
    if summary.get("inexact_reasons"):
        return "; ".join(summary["inexact_reasons"])
    why = []
    if summary.get("mode", "approx") == "approx":
        why.append("pairs within and across nearby partitions")
    if summary.get("precision", "fp32") != "fp32":
        why.append(f"{summary['precision']} products")
    return "; ".join(why) or "reason not recorded"


EMBEDDER_NAMES = {
    "contrastive": "contrastive-encoder",
    "vae": "beta-VAE",
    "pixels": "downsampled-pixel",
    "byo": "imported (bring-your-own)",
}


def redundancy(out: ReportPage, summary: dict | None) -> list[Markup]:
    """Similarity histogram, the paper's bins and the per-threshold table."""
    if summary is None:
        return [out.absent("similarity summary (similarity/summary.json)", "enrich similarity")]
    thresholds = sorted((summary.get("thresholds") or {}).items(), key=lambda kv: float(kv[0]))
    exact = summary.get("exact")
    mode = "exact (all pairs)" if exact else f"approximate ({_inexact_why(summary)})"
    done = done_record(out.run, EMBEDDINGS_DIR)
    embedder = EMBEDDER_NAMES.get(done.get("embedder"), f"{done['embedder']!r}" if done.get("embedder") else "the")
    parts = [
        note(
            f"{fmt_int(summary.get('n_images'))} images, {fmt_int(summary.get('n_pairs'))} pairs; "
            f"similarity = 1 - cosine distance of {embedder} embeddings, self pairs excluded; counts are {mode}."
        )
    ]
    hist = summary.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if counts and len(edges) == len(counts) + 1:
        png = figures.similarity_histogram(edges, counts, [float(t) for t, _ in thresholds])
        parts.append(
            figure(
                out.add_figure("similarity_histogram.png", png),
                "similarity histogram",
                "Similarity of all image pairs (dashed: thresholds).",
            )
        )
    bins = _paper_bins(summary)
    if bins:
        png = figures.paper_bins([b for b, _ in bins], [f for _, f in bins])
        parts.append(
            figure(
                out.add_figure("paper_bins.png", png),
                "share of pairs per similarity bin",
                "Share of pairs per similarity bin (the paper's Figure 1).",
            )
        )
    rows = [
        (
            f"> {t}",
            fmt_int(v.get("pairs")),
            fmt_pct(v.get("pair_fraction")),
            fmt_int(v.get("images_with_neighbor")),
            fmt_pct(v.get("image_fraction")),
        )
        for t, v in thresholds
    ]
    headers = ["similarity", "pairs above", "% of pairs", "images with a neighbor above", "% of images"]
    parts.append(table(headers, rows))
    parts.append(sibling_recall(summary))
    parts.extend(near_duplicates(summary))
    parts.append(note(f"Mode: {'exact' if exact else 'approximate'}."))
    return parts


def near_duplicates(summary: dict) -> list[Markup]:
    """Per duplicate threshold: groups, the largest ones, the share the removal list drops; leakage warnings."""
    dups = summary.get("duplicates")
    if not dups:
        return [tag("p", "Near-duplicate groups: not computed (the similarity stage kept no edge list).")]
    rows = [
        (
            f"> {t}",
            fmt_int(v["groups"]),
            fmt_int(v["images_in_groups"]),
            ", ".join(fmt_int(size) for size in v["largest_groups"]) or "-",
            f"{fmt_int(v['remove'])} ({fmt_pct(v['remove_fraction'])})",
        )
        for t, v in sorted(dups["thresholds"].items(), key=lambda kv: float(kv[0]))
    ]
    headers = ["similarity", "groups (2+ images)", "images in groups", "largest groups", "removal list drops"]
    parts = [
        tag(
            "p",
            "Near-duplicates: groups are connected components of the pairs above a threshold (they chain, so a "
            "group can hold images that are not alike); the removal list instead keeps images no two of which are "
            f"above the threshold and drops every other image beside a kept near-duplicate (keep order: "
            f"{dups['keep'].replace('_', ' ')}). Files: duplicates/t=…/groups.parquet, remove.parquet.",
        ),
        table(headers, rows),
    ]
    leak = dups.get("leakage")
    if leak and leak["pairs"]:
        crossing = ", ".join(f"{fmt_int(n)} across {what}" for what, n in leak["by"].items() if n)
        parts.append(
            tag(
                "p",
                f"Warning: {fmt_int(leak['pairs'])} near-duplicate pairs (similarity > {leak['threshold']}) cross "
                f"splits or patients ({crossing}); listed in duplicates/leakage.parquet. Near-duplicates across "
                "splits inflate test results; across patients they may be mislabelled or shared images.",
            )
        )
    elif leak:
        parts.append(tag("p", f"Leakage: no near-duplicate pair (similarity > {leak['threshold']}) crosses splits or patients."))
    else:
        parts.append(tag("p", "Leakage: not checked (the manifest has no split or patient ids)."))
    return parts


def sibling_recall(summary: dict) -> Markup:
    """In words: how often an image's most similar images are other frames of its own clip, and what that says."""
    recall = summary.get("sibling_recall")
    if not recall:
        why = summary.get("sibling_recall_not_measured") or "similarity/summary.json does not record it"
        return tag("p", f"Sibling recall: not measured ({why}).")
    at_1, k = recall["at_1"], recall["k"]
    if at_1 >= 0.9:
        verdict = "The embedding recognises near-duplicate frames: the redundancy above reflects the archive's own."
    elif at_1 >= 0.5:
        verdict = "The embedding recognises near-duplicate frames only partially: some redundancy within clips is missed."
    else:
        verdict = (
            "The embedding largely does not recognise near-duplicate frames, so the redundancy above understates the "
            "archive's; consider --embedder contrastive or --embedder pixels."
        )
    lists = "" if summary.get("exact", True) else " Measured on the approximate neighbor lists."
    return tag(
        "p",
        f"Sibling recall: for {fmt_pct(at_1)} of the {fmt_int(recall['n_eligible'])} images that have another "
        f"frame of their clip, the most similar image is a frame of the same clip (recall@{k}: {recall['at_k']:.2f}, "
        f"the mean share of its clip's other frames, up to {k}, found among its {k} most similar images). "
        f"{verdict}{lists}",
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)


def ordered_methods(methods: set[str]) -> list[str]:
    """ENRICH first, then random, then any other method by name."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def selection(out: ReportPage, manifest: Manifest | None) -> list[Markup]:
    """Coverage of patients and clips per budget, ENRICH vs random, and per-label counts."""
    if not out.run.exists(SUBSETS):
        return [out.absent("selection subsets (selection/subsets.parquet)", "enrich select")]
    rows = out.run.read_table(SUBSETS).to_pylist()
    by_key: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(r["method"], float(r["budget"]))].append(r)
    methods = ordered_methods({m for m, _ in by_key})
    budgets = sorted({b for _, b in by_key})
    replicates = len({r["replicate"] for r in rows})
    series: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    table_rows = []
    for b in budgets:
        cells: dict[str, list[str]] = {"patients": [], "clips": []}
        n_images = [r["n_images"] for m in methods for r in by_key.get((m, b), [])]
        for m in methods:
            group = by_key.get((m, b), [])
            for what in cells:
                if not group:
                    cells[what].append("-")
                    continue
                mean, std = _mean_std([r[f"n_{what}"] for r in group])
                cells[what].append(fmt_mean_std(mean, std))
                series[m][f"{what}_mean"].append(mean)
                series[m][f"{what}_std"].append(std)
            if group:
                series[m]["budget"].append(b)
        table_rows.append(
            (f"{100 * b:.3g}%", fmt_int(float(np.mean(n_images))), *cells["patients"], *cells["clips"])
        )
    of_p = f" (of {fmt_int(manifest.n_patients)})" if manifest and manifest.n_patients else ""
    of_c = f" (of {fmt_int(manifest.n_clips)})" if manifest and manifest.n_clips else ""
    headers = [
        "budget",
        "images",
        *(f"patients{of_p}, {m}" for m in methods),
        *(f"clips{of_c}, {m}" for m in methods),
    ]
    parts = [
        note(f"Mean ± sd over {replicates} replicate(s) per method and budget."),
        *_cells_note(read_json(out.run, SELECTION_JSON) or {}),
        table(headers, table_rows),
    ]
    png = figures.coverage({m: dict(s) for m, s in series.items()})
    parts.append(
        figure(
            out.add_figure("coverage.png", png),
            "patients and clips covered vs budget",
            "Patients and clips covered by each subset (mean ± sd over replicates).",
        )
    )
    parts += _label_table(rows, methods, budgets)
    return parts


def _cells_note(stats: dict) -> list[Markup]:
    """What cells mode left out, when the ranking used it."""
    cells = stats.get("cells")
    if not cells:
        return []
    share = cells["products_per_replicate"] / max(1.0, cells["products_complete"])
    return [
        note(
            f"Ranking rule: farthest-first within {fmt_int(cells['n_cells'])} k-means cells of about "
            f"{fmt_int(cells['cell_size'])} images (cells mode), {fmt_pct(share)} of the similarity products a "
            "complete ranking computes. An image is compared with picks in its own cell only (and with the "
            "seeds its cell starts from), so images near a cell border can be chosen twice over."
        )
    ]


def _label_table(rows: list[dict], methods: list[str], budgets: list[float]) -> list[Markup]:
    """Mean images per label in each subset, one column per label (the most frequent labels)."""
    totals: Counter = Counter()
    per: dict[tuple[str, float, str], list[int]] = defaultdict(list)
    for r in rows:
        counts = dict(r.get("label_counts") or [])
        for label, n in counts.items():
            totals[label] += n
    labels = [label for label, _ in totals.most_common(N_LABELS_SHOWN)]
    if not labels:
        return []
    for r in rows:
        counts = dict(r.get("label_counts") or [])
        for label in labels:
            per[(r["method"], float(r["budget"]), label)].append(counts.get(label, 0))
    table_rows = [
        (
            f"{100 * b:.3g}%",
            *(
                " / ".join(f"{np.mean(per[(m, b, lab)]):,.1f}" if per[(m, b, lab)] else "-" for m in methods)
                for lab in labels
            ),
        )
        for b in budgets
    ]
    parts = [
        tag("h3", "Images per label"),
        note(f"Mean images per label in each subset ({' / '.join(methods)}); labels are not used to select."),
    ]
    if len(totals) > len(labels):
        parts.append(note(f"Showing the {len(labels)} most frequent of {len(totals)} labels."))
    return [*parts, table(["budget", *labels], table_rows)]


def encoder(out: ReportPage) -> list[Markup]:
    """Training curves, the label-free check and a picture of the encoder (beta-VAE or contrastive)."""
    train = read_json(out.run, TRAIN_JSON)
    contrastive = (train or {}).get("model") == "contrastive"
    picture, name = (VIEWS, "views.png") if contrastive else (RECONSTRUCTIONS, "reconstructions.png")
    has_picture = out.run.exists(picture) and not out.private
    if train is None and not has_picture:
        return [out.absent("encoder training log (encoder/train.json)", "enrich train-encoder")]
    parts: list[Markup] = []
    if train is not None:
        parts.append(
            tag(
                "p",
                "Encoder: the contrastive encoder (trained to map random views of an image, shifted, turned, regained "
                "and re-speckled as consecutive frames are, close together)." if contrastive else
                "Encoder: the paper's beta-VAE (embedding: the encoder mean).",
            )
        )
        png = figures.loss_curves(train.get("history") or {})
        if png is not None:
            caption = (
                "Contrastive loss per epoch and held-out view retrieval." if contrastive
                else "beta-VAE losses per epoch (dashed: validation)."
            )
            parts.append(figure(out.add_figure("encoder_loss.png", png), "encoder loss curves", caption))
        else:
            parts.append(note("encoder/train.json holds no loss history."))
        config = train.get("config") or {}
        if config:
            parts.append(table(["encoder setting", "value"], flatten(config), align="ll"))
        parts += encoder_quality(train.get("quality") or {})
    if has_picture:
        src = out.add_figure(name, out.run.read_bytes(picture))
        caption = "Inputs (top) and one training view of each (bottom): the change the encoder learns to ignore." if (
            contrastive
        ) else "Inputs and their reconstructions."
        parts.append(figure(src, "encoder " + name.split(".")[0], caption))
    elif out.private:
        parts.append(note(f"encoder/{name} left out (--report-images none): it shows archive images."))
    else:
        parts.append(note(f"encoder/{name} not found."))
    return parts


def encoder_quality(quality: dict) -> list[Markup]:
    """The encoder's label-free check (encoder/train.json "quality"): a table, and a warning when it looks collapsed."""
    if quality.get("model") == "contrastive":
        rows = [
            (
                "held-out view retrieval (a random view finds its image's other view first)",
                f"{quality['view_retrieval']:.2f} (untrained network: {quality['untrained_view_retrieval']:.2f})",
            ),
            ("mean cosine between held-out embeddings", f"{quality['mean_pairwise_cosine']:.2f}"),
            ("effective rank of held-out embeddings", f"{quality['effective_rank']:.1f}"),
        ]
        parts = [table(["encoder check (no labels)", "value"], rows, align="ll")]
        if quality.get("collapsed"):
            parts.append(
                note(
                    "Warning: the contrastive encoder looks collapsed (its embeddings are nearly all alike), so they say "
                    "little about the images. Lower --learning-rate, train on a larger --sample, or use --embedder vae."
                )
            )
        return parts
    if "active_dims" not in quality:
        return []
    dims = len(quality.get("mu_variance_per_dim") or []) or "?"
    rows = [
        ("active latent dimensions (posterior mean varies across held-out images)", f"{quality['active_dims']} of {dims}"),
        ("KL to the prior (nats per image)", f"{quality.get('kl_nats', float('nan')):.2f}"),
        ("reconstruction error / error of the mean image", f"{quality.get('recon_to_mean_ratio', float('nan')):.2f}"),
    ]
    parts = [table(["encoder check (no labels)", "value"], rows, align="ll")]
    if quality.get("collapsed"):
        parts.append(
            note(
                "Warning: the encoder looks collapsed or untrained (few active dimensions, or reconstructions no "
                "better than the mean image), so its embeddings say little about the images. Train longer (--epochs, "
                "a larger --sample), lower --beta (0.1 is the default) with the KL warm-up on, or compare with --embedder pixels."
            )
        )
    return parts


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested mappings as (dotted key, JSON value) rows."""
    if not isinstance(obj, dict):
        return [(prefix, obj if isinstance(obj, str) else json.dumps(obj, default=str))]
    rows = []
    for key, value in obj.items():
        rows += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return rows


def config(out: ReportPage, run_info: dict | None) -> list[Markup]:
    """The resolved config, package versions and per-stage timings from run.json."""
    if run_info is None:
        return [out.absent("run.json (each stage records its timing there)", "enrich run")]
    parts: list[Markup] = [tag("h3", "Stage timings")]
    stages = run_info.get("stages") or {}
    if stages:
        rows = [
            (
                name,
                s.get("started", "-"),
                s.get("ended", "-"),
                f"{s['seconds']:,.1f}" if isinstance(s.get("seconds"), (int, float)) else "-",
                "(left out: may hold paths)" if out.private else json.dumps(s.get("stats") or {}, default=str),
            )
            for name, s in stages.items()
        ]
        parts.append(table(["stage", "started", "ended", "seconds", "stats"], rows, align="lllrl"))
    else:
        parts.append(note("No stage timings recorded."))
    settings = flatten(run_info.get("config") or {})
    if out.private:  # paths and uris (input, output, seed ids, ...) stay out of a shared report
        settings = [(k, "(path left out)" if ("/" in v or "\\" in v) else v) for k, v in settings]
    parts += [tag("h3", "Config"), table(["setting", "value"], settings, "ll")]
    versions = run_info.get("versions") or {}
    if versions:
        parts += [tag("h3", "Versions"), table(["package", "version"], flatten(versions), "ll")]
    return parts
