"""Near-duplicates from the similarity stage's edge list: groups, a removal list and leakage across splits.

A pair is a near-duplicate at threshold t when its similarity (the tile kernel's float32 product, the
value behind the stage's threshold counts) is strictly above t. For each t:

- ``groups``: connected components of the graph of such pairs. Components chain (a ~ b ~ c with a
  and c far apart), so on redundant archives a few components can hold nearly everything; they are
  for inspection, not for deciding what to drop.
- ``remove``: a maximal independent set of the same graph is kept and the rest dropped. Images are
  visited in the ``keep`` order; one is kept when no kept image is its near-duplicate, otherwise it
  is dropped, naming the kept image that blocked it. So every dropped image has a kept image above
  t, and no two kept images are above t. ``keep`` is ``lowest_id`` or ``central`` (most
  near-duplicates first, ties to the lower id). The selection stage writes one more removal list per
  threshold, ``selection/remove/t=0.90.parquet``, visiting images in the ENRICH ranking's order
  (``write_ranked_removal``): the duplicates to drop when labelling follows the ranking.
- ``leakage`` (highest t): near-duplicate pairs whose images lie in different splits, or belong to
  different patients, when the manifest says so.
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..pairgraph import float32_below, groups, removal
from ..schema import (
    DUPLICATES_DIR,
    LEAKAGE_PATH,
    MANIFEST_DIR,
    REMOVE_SCHEMA,
    threshold_folder,
)

if TYPE_CHECKING:
    from ..storage import RunDir

log = logging.getLogger("enrich_dist.similarity")


GROUPS_SCHEMA = pa.schema([("image_id", pa.int64()), ("group_id", pa.int64()), ("group_size", pa.int64())])
LEAKAGE_SCHEMA = pa.schema(
    [
        ("i", pa.int64()), ("j", pa.int64()), ("sim", pa.float32()), ("crosses", pa.string()),
        ("split_i", pa.string()), ("split_j", pa.string()), ("patient_i", pa.string()), ("patient_j", pa.string()),
    ]
)


def leakage(
    a: np.ndarray, b: np.ndarray, sims: np.ndarray, split: np.ndarray | None, patient: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Pairs (positions a, b) whose images lie in different splits or belong to different patients (both known)."""
    cross = np.zeros(len(a), bool)
    why = np.full(len(a), "", dtype=object)
    for name, codes in (("split", split), ("patient", patient)):
        if codes is None:
            continue
        known = (codes[a] != None) & (codes[b] != None)  # noqa: E711 - object arrays of str or None
        differ = known & (codes[a] != codes[b])
        why[differ] = np.where(why[differ] == "", name, why[differ] + "," + name)
        cross |= differ
    return {"a": a[cross], "b": b[cross], "sim": sims[cross], "crosses": why[cross]}


def write_duplicates(
    run: RunDir, ids: np.ndarray, a: np.ndarray, b: np.ndarray, sims: np.ndarray, thresholds, keep: str
) -> dict:
    """Write ``duplicates/`` (per threshold groups and removal list; leakage at the lowest) and return its summary.

    ``ids`` are the sorted image ids; ``a`` < ``b`` index them; ``sims`` are the pairs' kernel similarities.
    Groups list only images in groups of two or more; the removal list only dropped images.
    """
    run.remove(DUPLICATES_DIR)
    n = len(ids)
    out: dict = {"keep": keep, "thresholds": {}}
    for t in sorted(float(t) for t in thresholds):
        above = sims > float32_below(t)
        ta, tb, ts = a[above], b[above], sims[above]
        group, size = groups(n, ta, tb)
        in_group = size > 1
        folder = threshold_folder(t)
        run.write_table(
            posixpath.join(folder, "groups.parquet"),
            pa.table({"image_id": ids[in_group], "group_id": group[in_group], "group_size": size[in_group]},
                     schema=GROUPS_SCHEMA),
        )
        kept_of, kept_sim = removal(n, ta, tb, ts, keep)
        drop = kept_of >= 0
        run.write_table(
            posixpath.join(folder, "remove.parquet"),
            pa.table({"image_id": ids[drop], "kept_image_id": ids[kept_of[drop]], "sim": kept_sim[drop]},
                     schema=REMOVE_SCHEMA),
        )
        sizes = np.bincount(group[in_group]) if in_group.any() else np.empty(0, np.int64)
        out["thresholds"][f"{t:g}"] = {
            "folder": folder,
            "pairs": int(above.sum()),
            "groups": int(np.count_nonzero(sizes)),
            "images_in_groups": int(in_group.sum()),
            "largest_groups": sorted(sizes[sizes > 0].tolist(), reverse=True)[:5],
            "remove": int(drop.sum()),
            "remove_fraction": float(drop.mean()) if n else 0.0,
        }
        log.info(
            "duplicates above %g: %d groups of 2+ images (largest %s); the removal list drops %d of %d images",
            t, out["thresholds"][f"{t:g}"]["groups"], out["thresholds"][f"{t:g}"]["largest_groups"][:3],
            int(drop.sum()), n,
        )
    # leakage at the strictest threshold: the pairs most surely the same image, the fewest false alarms
    out["leakage"] = _write_leakage(run, ids, a, b, sims, max(float(t) for t in thresholds)) if thresholds else None
    return out


def _write_leakage(run: RunDir, ids: np.ndarray, a, b, sims, t: float) -> dict | None:
    """``duplicates/leakage.parquet`` at ``t`` when the manifest has splits or patients; None when it has neither."""
    if not run.shards(MANIFEST_DIR):
        return None
    manifest = run.read_table(MANIFEST_DIR, columns=["image_id", "split", "patient_id"])
    pos = np.searchsorted(ids, manifest.column("image_id").to_numpy())
    ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == manifest.column("image_id").to_numpy())
    codes = {}
    for name in ("split", "patient_id"):
        values = np.full(len(ids), None, dtype=object)
        values[pos[ok]] = np.asarray(manifest.column(name).to_pylist(), dtype=object)[ok]
        codes[name] = values if any(v is not None for v in values) else None
    if codes["split"] is None and codes["patient_id"] is None:
        return None
    above = sims > float32_below(t)
    found = leakage(a[above], b[above], sims[above], codes["split"], codes["patient_id"])

    def col(values: np.ndarray | None, rows: np.ndarray) -> list:
        return [None] * len(rows) if values is None else values[rows].tolist()

    table = pa.table(
        {
            "i": ids[found["a"]], "j": ids[found["b"]], "sim": found["sim"], "crosses": found["crosses"].tolist(),
            "split_i": col(codes["split"], found["a"]), "split_j": col(codes["split"], found["b"]),
            "patient_i": col(codes["patient_id"], found["a"]), "patient_j": col(codes["patient_id"], found["b"]),
        },
        schema=LEAKAGE_SCHEMA,
    )
    run.write_table(LEAKAGE_PATH, table)
    by = {name: int(sum(name in c.split(",") for c in found["crosses"])) for name in ("split", "patient")}
    if len(found["a"]):
        log.warning("duplicates: %d near-duplicate pairs above %g cross splits or patients (%s)", len(found["a"]), t, by)
    return {"threshold": t, "pairs": len(found["a"]), "by": {"splits": by["split"], "patients": by["patient"]},
            "path": LEAKAGE_PATH}
