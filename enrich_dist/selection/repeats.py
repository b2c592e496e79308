"""Label-free: how many images of a ranking's prefix repeat an image ranked before them.

A subset spends labels on *repeats*: frames of a clip it already holds, or near-duplicates of an
image it already holds. Random subsets of an archive whose redundancy is uneven (long clips beside
short ones) spend many labels that way; a ranking that avoids repeats then has room to win, and
where random subsets rarely repeat (every source a short clip of the same length) it has little.
The report uses these counts to say, before anyone labels, whether ENRICH should beat random here.

The measure is the clip when the manifest has clip ids (an image repeats when its clip already
appeared in the prefix), else the similarity stage's exact top-k lists (an image repeats when one of
its listed neighbors above ``REPEAT_THRESHOLD`` appeared earlier), else none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..storage import RunDir
from .inputs import neighbor_parts, read_neighbors

log = logging.getLogger("enrich_dist.selection")

REPEAT_THRESHOLD = 0.9  # the paper's top similarity bin: a pair above it is a near-duplicate


def repeats_by_group(order: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per position of ``order``: True when the image's group (code >= 0) appeared at an earlier position."""
    codes = group[order]
    flags = np.zeros(len(order), dtype=bool)
    valid = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[valid], return_index=True)
    flags[valid] = True
    flags[valid[first]] = False
    return flags


def repeats_by_neighbors(order: np.ndarray, nn_rows: np.ndarray, nn_sims: np.ndarray, threshold: float) -> np.ndarray:
    """Per position of ``order``: True when a listed neighbor above ``threshold`` (row >= 0) is ranked earlier."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    known = (nn_rows >= 0) & (nn_sims > threshold)
    earlier = known & (position[np.maximum(nn_rows, 0)] < position[:, None])
    return earlier.any(axis=1)[order]


def repeat_measure(
    run: RunDir, ids: np.ndarray, clip_codes: np.ndarray
) -> tuple[str | None, Callable[[np.ndarray], np.ndarray] | None]:
    """(description, order -> repeat flags) for this run's images, or (None, None) when nothing can tell."""
    if (clip_codes >= 0).any():
        return "clip", lambda order: repeats_by_group(order, clip_codes)
    parts = neighbor_parts(run, len(ids), quiet=True)
    lists = read_neighbors(run, parts, ids, ids) if parts else None
    if lists is None:
        log.info("no clip ids and no exact neighbor lists: repeats in the subsets are not measured")
        return None, None
    rows, sims = lists
    return (
        f"similarity > {REPEAT_THRESHOLD:g}",
        lambda order: repeats_by_neighbors(order, rows, sims, REPEAT_THRESHOLD),
    )


LARGEST_SHARE = 0.2  # concentration: the share of images held by the largest fifth of the redundancy groups


def concentration(group_size: np.ndarray) -> dict:
    """How unevenly the images fall into redundancy groups, from each image's group size (>= 1).

    The number of groups is sum(1 / size) (a group of s images counts s times 1/s); walking images
    from the largest groups down, ``largest_fifth_share`` is the share of images held by the largest
    fifth of the groups. Equal groups give 0.2; a few long clips beside many short ones give far more.
    """
    size = np.sort(np.maximum(np.asarray(group_size, dtype=np.float64), 1.0))[::-1]
    if len(size) == 0:
        return {"groups": 0.0, "largest_fifth_share": None}
    weight = 1.0 / size
    groups = float(weight.sum())
    held = np.cumsum(weight) <= LARGEST_SHARE * groups + 1e-9
    return {"groups": groups, "largest_fifth_share": float(held.sum() / len(size))}


def redundancy_concentration(run: RunDir, ids: np.ndarray, clip_codes: np.ndarray) -> dict | None:
    """:func:`concentration` by clip when the manifest has clip ids, else by near-duplicate counts; None without."""
    if (clip_codes >= 0).any():
        counts = np.bincount(clip_codes[clip_codes >= 0])
        size = np.where(clip_codes >= 0, counts[np.maximum(clip_codes, 0)], 1)
        return {"measure": "clip", **concentration(size)}
    parts = neighbor_parts(run, len(ids), quiet=True)
    column = f"n_above_{REPEAT_THRESHOLD:g}"
    if not parts:
        return None
    try:
        table = pa.concat_tables([run.read_table(part.path, columns=["image_id", column]) for part in parts])
    except (ValueError, KeyError) as exc:
        log.info("no %s counts in the similarity lists (%s): concentration not measured", column, exc)
        return None
    table = table.sort_by("image_id")
    if not np.array_equal(table["image_id"].to_numpy(), ids):
        log.info("the similarity lists are for other images: concentration not measured")
        return None
    return {"measure": f"similarity > {REPEAT_THRESHOLD:g}", **concentration(table[column].to_numpy() + 1)}
