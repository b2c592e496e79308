"""Reading the run directory for the report: manifest counts, neighbor extremes, JSON artifacts."""

from __future__ import annotations

import posixpath
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..schema import (
    ENCODER_RECONSTRUCTIONS,
    ENCODER_TRAIN_STATS,
    ENCODER_VIEWS,
    MANIFEST_DIR,
    NEIGHBORS_DIR,
    SIMILARITY_SUMMARY,
    SUBSETS_PATH,
)
from ..storage import RunDir

SUMMARY = SIMILARITY_SUMMARY
SUBSETS = SUBSETS_PATH
TRAIN_JSON = ENCODER_TRAIN_STATS
RECONSTRUCTIONS = ENCODER_RECONSTRUCTIONS
VIEWS = ENCODER_VIEWS
N_GROUPS = 8
N_GROUP_NEIGHBORS = 4
N_UNIQUE = 12
N_CANDIDATES = 64  # enough for N_GROUPS: each group hides at most 1 + N_GROUP_NEIGHBORS candidates
N_ERRORS_SHOWN = 10

Group = tuple[dict, list[tuple[int, float]]]


@dataclass
class Manifest:
    """What the page needs from the manifest, gathered shard by shard."""

    n_ok: int = 0
    n_error: int = 0
    n_patients: int | None = None
    n_clips: int | None = None
    labels: Counter = field(default_factory=Counter)
    images: dict[int, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


def read_json(run: RunDir, rel: str) -> Any:
    """A JSON artifact, or None when absent; invalid JSON names the file and the fix."""
    if not run.exists(rel):
        return None
    try:
        return run.read_json(rel)
    except ValueError as exc:
        raise ValueError(f"{run.uri_of(rel)} is not valid JSON ({exc}); rerun the stage that writes it") from None


def redundant_groups(rows: Sequence[dict], n_groups: int, n_neighbors: int) -> list[Group]:
    """The first ``n_groups`` rows (most redundant first) with their top neighbors, skipping shown images."""
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


def gallery_ids(groups: list[Group], unique: list[dict]) -> set[int]:
    """Every image id the galleries show."""
    ids = {r["image_id"] for r in unique} | {r["image_id"] for r, _ in groups}
    return ids | {i for _, nbrs in groups for i, _ in nbrs}


N_DUPLICATE_GROUPS = 3
N_DUPLICATE_MEMBERS = 8
DuplicateGroup = tuple[int, list[int]]  # (group size, the first member ids)


def duplicate_groups(run: RunDir, summary: dict | None) -> tuple[str | None, list[DuplicateGroup]]:
    """The largest near-duplicate groups at the strictest threshold that has any: (threshold, groups)."""
    thresholds = ((summary or {}).get("duplicates") or {}).get("thresholds") or {}
    for t, record in sorted(thresholds.items(), key=lambda kv: -float(kv[0])):
        path = posixpath.join(record["folder"], "groups.parquet")
        if not record.get("groups") or not run.exists(path):
            continue
        table = run.read_table(path, columns=["image_id", "group_id", "group_size"])
        biggest = table.sort_by([("group_size", "descending"), ("group_id", "ascending")])
        chosen = list(dict.fromkeys(biggest["group_id"].to_pylist()))[:N_DUPLICATE_GROUPS]
        out = []
        for gid in chosen:
            members = table.filter(pc.equal(table["group_id"], gid))
            ids = sorted(members["image_id"].to_pylist())
            out.append((len(ids), ids[:N_DUPLICATE_MEMBERS]))
        return t, out
    return None, []


def _extreme(table: pa.Table, k: int, largest: bool) -> pa.Table:
    """The ``k`` rows with the largest (or smallest) finite ``max_sim``, ties by ``image_id``."""
    finite = table.filter(pc.fill_null(pc.is_finite(table["max_sim"]), False))
    order = "descending" if largest else "ascending"
    return finite.sort_by([("max_sim", order), ("image_id", "ascending")]).slice(0, k)


def load_neighbors(run: RunDir) -> tuple[list[dict] | None, list[dict]]:
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


def load_manifest(run: RunDir, wanted: set[int]) -> Manifest | None:
    """Counts over ok images, the first errors, and uri/label of the ``wanted`` image ids."""
    shards = run.shards(MANIFEST_DIR)
    if not shards:
        return None
    m = Manifest()
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
            cols = [c for c in ("image_id", "uri", "frame", "label") if c in t.column_names]
            m.images.update((r["image_id"], r) for r in hit.select(cols).to_pylist())
    m.n_patients = _count_distinct(uniques["patient_id"])
    m.n_clips = _count_distinct(uniques["clip_id"])
    return m


def _count_distinct(parts: list[pa.Array]) -> int | None:
    """Distinct values across per-shard uniques; None when the column is absent or empty."""
    n = len(pc.unique(pa.concat_arrays(parts))) if parts else 0
    return n or None
