"""The report stage: one self-contained HTML page built from the run directory's artifacts only."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import ENCODER_DIR, MANIFEST_DIR, NEIGHBORS_DIR, REPORT_DIR, SELECTION_DIR, SIMILARITY_DIR
from ..storage import RunDir
from . import figures
from .html import (
    Markup,
    figure,
    fmt_int,
    fmt_mean_std,
    fmt_pct,
    join,
    missing,
    note,
    page,
    section,
    table,
    tag,
    thumb,
)

__all__ = ["run_report", "redundant_groups"]

logger = logging.getLogger(__name__)

INDEX = posixpath.join(REPORT_DIR, "index.html")
SUMMARY = posixpath.join(SIMILARITY_DIR, "summary.json")
SUBSETS = posixpath.join(SELECTION_DIR, "subsets.parquet")
TRAIN_JSON = posixpath.join(ENCODER_DIR, "train.json")
RECONSTRUCTIONS = posixpath.join(ENCODER_DIR, "reconstructions.png")
N_GROUPS = 8
N_GROUP_NEIGHBORS = 4
N_UNIQUE = 12
N_CANDIDATES = 64  # enough for N_GROUPS: each group hides at most 1 + N_GROUP_NEIGHBORS candidates
N_ERRORS_SHOWN = 10
N_LABELS_SHOWN = 12
THUMB_THREADS = 4
METHOD_ORDER = ("enrich", "random")


@dataclass
class _Manifest:
    """What the page needs from the manifest, gathered shard by shard."""

    n_ok: int = 0
    n_error: int = 0
    n_patients: int | None = None
    n_clips: int | None = None
    labels: Counter = field(default_factory=Counter)
    images: dict[int, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


@dataclass
class _Page:
    """The report being written: figures committed so far, missing artifacts, thumbnail counts."""

    run: RunDir
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    thumbnails: int = 0
    thumbnail_errors: int = 0

    def add_figure(self, name: str, png: bytes) -> str:
        """Commit a PNG beside index.html; returns its relative src."""
        self.run.write_bytes(posixpath.join(REPORT_DIR, name), png)
        self.figures.append(name)
        return name

    def absent(self, what: str, command: str) -> Markup:
        """Record a missing artifact and return the notice naming the command that produces it."""
        self.missing.append(what)
        return missing(what, command)


def run_report(run: RunDir) -> dict:
    """Write ``report/index.html`` and its figures from whatever artifacts exist; returns stats."""
    start = time.perf_counter()
    out = _Page(run)
    run_info = _read_json(run, "run.json")
    top, unique = _load_neighbors(run)
    groups = redundant_groups(top or [], N_GROUPS, N_GROUP_NEIGHBORS)
    manifest = _load_manifest(run, _gallery_ids(groups, unique))
    header = _header(out, manifest)
    sections = [
        ("redundancy", "Redundancy", _redundancy(out, _read_json(run, SUMMARY))),
        ("galleries", "Galleries", _galleries(out, top is not None, groups, unique, manifest)),
        ("selection", "Selection", _selection(out, manifest)),
        ("encoder", "Encoder", _encoder(out)),
        ("config", "Config and timings", _config(out, run_info)),
    ]
    doc = page(
        f"ENRICH report: {posixpath.basename(run.uri.rstrip('/'))}",
        header,
        [(anchor, title, section(anchor, title, parts)) for anchor, title, parts in sections],
    )
    run.write_bytes(INDEX, doc.encode("utf-8"))
    stats = {
        "report": run.uri_of(INDEX),
        "figures": out.figures,
        "missing": out.missing,
        "groups": len(groups),
        "thumbnails": out.thumbnails,
        "thumbnail_errors": out.thumbnail_errors,
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "report written to %s (%d figures, %d thumbnails, %d failed, missing: %s)",
        stats["report"],
        len(out.figures),
        out.thumbnails,
        out.thumbnail_errors,
        ", ".join(out.missing) or "none",
    )
    return stats


def redundant_groups(
    rows: Sequence[dict], n_groups: int, n_neighbors: int
) -> list[tuple[dict, list[tuple[int, float]]]]:
    """The first ``n_groups`` rows (most redundant first) with their top neighbours, skipping shown images."""
    shown: set[int] = set()
    groups = []
    for row in rows:
        if len(groups) >= n_groups:
            break
        if row["image_id"] in shown:
            continue
        nbrs = list(zip(row["nn_ids"] or [], row["nn_sims"] or [], strict=False))[:n_neighbors]
        groups.append((row, nbrs))
        shown.add(row["image_id"])
        shown.update(i for i, _ in nbrs)
    return groups


def _gallery_ids(groups: list[tuple[dict, list[tuple[int, float]]]], unique: list[dict]) -> set[int]:
    """Every image id the galleries show."""
    ids = {r["image_id"] for r in unique} | {r["image_id"] for r, _ in groups}
    return ids | {i for _, nbrs in groups for i, _ in nbrs}


def _read_json(run: RunDir, rel: str) -> Any:
    if not run.exists(rel):
        return None
    try:
        return run.read_json(rel)
    except ValueError as exc:
        raise ValueError(
            f"{run.uri_of(rel)} is not valid JSON ({exc}); rerun the stage that writes it"
        ) from None


def _extreme(table: pa.Table, k: int, largest: bool) -> pa.Table:
    """The ``k`` rows with the largest (or smallest) finite ``max_sim``, ties by ``image_id``."""
    finite = table.filter(pc.fill_null(pc.is_finite(table["max_sim"]), False))
    order = "descending" if largest else "ascending"
    return finite.sort_by([("max_sim", order), ("image_id", "ascending")]).slice(0, k)


def _load_neighbors(run: RunDir) -> tuple[list[dict] | None, list[dict]]:
    """Most redundant candidates (highest max_sim) and most unique images, one shard at a time."""
    shards = run.shards(NEIGHBORS_DIR)
    if not shards:
        return None, []
    top, low = [], []
    for rel in shards.values():
        t = run.read_table(rel, columns=["image_id", "max_sim", "nn_ids", "nn_sims"])
        top.append(_extreme(t, N_CANDIDATES, largest=True))
        low.append(_extreme(t, N_UNIQUE, largest=False))
    return (
        _extreme(pa.concat_tables(top), N_CANDIDATES, largest=True).to_pylist(),
        _extreme(pa.concat_tables(low), N_UNIQUE, largest=False).to_pylist(),
    )


def _load_manifest(run: RunDir, wanted: set[int]) -> _Manifest | None:
    """Counts over ok images, the first errors, and uri/label of the ``wanted`` image ids."""
    shards = run.shards(MANIFEST_DIR)
    if not shards:
        return None
    m = _Manifest()
    wanted_ids = pa.array(sorted(wanted), pa.int64())
    uniques: dict[str, list[pa.Array]] = defaultdict(list)
    for rel in shards.values():
        t = run.read_table(rel)
        ok = pc.fill_null(pc.equal(t["status"], "ok"), False)
        good = t.filter(ok)
        m.n_ok += good.num_rows
        m.n_error += t.num_rows - good.num_rows
        for col in ("patient_id", "clip_id"):
            if col in t.column_names:
                uniques[col].append(pc.unique(good[col].drop_null()))
        if "label" in t.column_names:
            for entry in pc.value_counts(good["label"].drop_null()).to_pylist():
                m.labels[entry["values"]] += entry["counts"]
        if len(m.errors) < N_ERRORS_SHOWN:
            bad = t.filter(pc.invert(ok)).slice(0, N_ERRORS_SHOWN - len(m.errors))
            m.errors += bad.select([c for c in ("uri", "error") if c in t.column_names]).to_pylist()
        if len(wanted_ids):
            hit = t.filter(pc.is_in(t["image_id"], value_set=wanted_ids))
            cols = [c for c in ("image_id", "uri", "label") if c in t.column_names]
            m.images.update((r["image_id"], r) for r in hit.select(cols).to_pylist())
    m.n_patients = _count_distinct(uniques["patient_id"])
    m.n_clips = _count_distinct(uniques["clip_id"])
    return m


def _count_distinct(parts: list[pa.Array]) -> int | None:
    """Distinct values across per-shard uniques; None when the column is absent or empty."""
    n = len(pc.unique(pa.concat_arrays(parts))) if parts else 0
    return n or None


def _header(out: _Page, manifest: _Manifest | None) -> list[Markup]:
    """Run URI, date and the archive's size."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [note(join(["Run ", tag("code", out.run.uri), f" - report generated {now}"]))]
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
    if manifest.errors:
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


def _redundancy(out: _Page, summary: dict | None) -> list[Markup]:
    """Similarity histogram, the paper's bins and the per-threshold table."""
    if summary is None:
        return [out.absent("similarity summary (similarity/summary.json)", "enrich similarity")]
    thresholds = sorted((summary.get("thresholds") or {}).items(), key=lambda kv: float(kv[0]))
    exact = summary.get("exact")
    mode = "exact (all pairs)" if exact else "approximate (pairs within and across nearby partitions)"
    parts = [
        note(
            f"{fmt_int(summary.get('n_images'))} images, {fmt_int(summary.get('n_pairs'))} pairs; "
            f"similarity = 1 - cosine distance of VAE embeddings, self pairs excluded; counts are {mode}."
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
    headers = ["similarity", "pairs above", "% of pairs", "images with a neighbour above", "% of images"]
    parts.append(table(headers, rows))
    parts.append(note(f"Mode: {'exact' if exact else 'approximate'}."))
    return parts


def _thumbnails(
    out: _Page, ids: set[int], manifest: _Manifest | None
) -> dict[int, tuple[str | None, str | None]]:
    """Thumbnail data URI (or the error instead) of each image id, decoded in a few threads."""
    images = manifest.images if manifest else {}

    def one(image_id: int) -> tuple[str | None, str | None]:
        row = images.get(image_id)
        if row is None or not row.get("uri"):
            return None, f"image {image_id} not in the manifest"
        try:
            return figures.data_uri(figures.thumbnail(row["uri"], out.run.storage_options)), None
        except FileNotFoundError:
            return None, "file not found"
        except Exception as exc:  # any decoder failure becomes a placeholder, never a crashed report
            return None, f"{type(exc).__name__}: {exc}"[:200]

    ordered = sorted(ids)
    with ThreadPoolExecutor(max_workers=THUMB_THREADS) as pool:
        result = dict(zip(ordered, pool.map(one, ordered), strict=True))
    out.thumbnails += len(result)
    failed = {i: e for i, (_, e) in result.items() if e}
    out.thumbnail_errors += len(failed)
    if failed:
        logger.warning(
            "%d of %d thumbnails could not be drawn (e.g. image %d: %s)",
            len(failed),
            len(result),
            *next(iter(failed.items())),
        )
    return result


def _galleries(
    out: _Page,
    have_neighbors: bool,
    groups: list[tuple[dict, list[tuple[int, float]]]],
    unique: list[dict],
    manifest: _Manifest | None,
) -> list[Markup]:
    """Most redundant groups (image + top neighbours) and the most unique images, as thumbnails."""
    if not have_neighbors:
        return [out.absent("nearest neighbours (similarity/neighbors/part-*.parquet)", "enrich similarity")]
    thumbs = _thumbnails(out, _gallery_ids(groups, unique), manifest)
    images = manifest.images if manifest else {}

    def cell(image_id: int, caption: str, anchor: bool = False) -> Markup:
        src, error = thumbs[image_id]
        row = images.get(image_id, {})
        hover = " ".join(str(row[k]) for k in ("uri", "label") if row.get(k))
        return thumb(src, caption, error, anchor=anchor, title=hover or None)

    parts = [
        tag("h3", "Most redundant groups"),
        note(
            "Each row: an image with the highest similarity to any other image (outlined), "
            "then its nearest neighbours with their similarity."
        ),
    ]
    for row, nbrs in groups:
        cells = [cell(row["image_id"], f"#{row['image_id']} max {row['max_sim']:.3f}", anchor=True)]
        cells += [cell(i, f"#{i} {s:.3f}") for i, s in nbrs]
        parts.append(tag("div", join(cells), cls="group"))
    parts += [
        tag("h3", "Most unique images"),
        note("Images whose nearest neighbour is least similar (max similarity shown)."),
    ]
    parts.append(
        tag(
            "div",
            join(cell(r["image_id"], f"#{r['image_id']} max {r['max_sim']:.3f}") for r in unique),
            cls="thumbs",
        )
    )
    return parts


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)


def _selection(out: _Page, manifest: _Manifest | None) -> list[Markup]:
    """Coverage of patients and clips per budget, ENRICH vs random, and per-label counts."""
    if not out.run.exists(SUBSETS):
        return [out.absent("selection subsets (selection/subsets.parquet)", "enrich select")]
    rows = out.run.read_table(SUBSETS).to_pylist()
    by_key: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(r["method"], float(r["budget"]))].append(r)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    methods = sorted({m for m, _ in by_key}, key=lambda m: (rank.get(m, len(rank)), m))
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


def _encoder(out: _Page) -> list[Markup]:
    """Loss curves and reconstructions of the beta-VAE."""
    train = _read_json(out.run, TRAIN_JSON)
    has_recon = out.run.exists(RECONSTRUCTIONS)
    if train is None and not has_recon:
        return [out.absent("encoder training log (encoder/train.json)", "enrich train-encoder")]
    parts: list[Markup] = []
    if train is not None:
        png = figures.loss_curves(train.get("history") or {})
        if png is not None:
            parts.append(
                figure(
                    out.add_figure("encoder_loss.png", png),
                    "encoder loss curves",
                    "beta-VAE losses per epoch (dashed: validation).",
                )
            )
        else:
            parts.append(note("encoder/train.json holds no loss history."))
        config = train.get("config") or {}
        if config:
            parts.append(table(["encoder setting", "value"], _flatten(config), align="ll"))
    if has_recon:
        src = out.add_figure("reconstructions.png", out.run.read_bytes(RECONSTRUCTIONS))
        parts.append(figure(src, "encoder reconstructions", "Inputs and their reconstructions."))
    else:
        parts.append(note("encoder/reconstructions.png not found."))
    return parts


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested mappings as (dotted key, JSON value) rows."""
    if not isinstance(obj, dict):
        return [(prefix, obj if isinstance(obj, str) else json.dumps(obj, default=str))]
    rows = []
    for key, value in obj.items():
        rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return rows


def _config(out: _Page, run_info: dict | None) -> list[Markup]:
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
                json.dumps(s.get("stats") or {}, default=str),
            )
            for name, s in stages.items()
        ]
        parts.append(table(["stage", "started", "ended", "seconds", "stats"], rows, align="lllrl"))
    else:
        parts.append(note("No stage timings recorded."))
    parts += [tag("h3", "Config"), table(["setting", "value"], _flatten(run_info.get("config") or {}), "ll")]
    versions = run_info.get("versions") or {}
    if versions:
        parts += [tag("h3", "Versions"), table(["package", "version"], _flatten(versions), "ll")]
    return parts
