"""Sibling recall: how often an image's nearest neighbors are other frames of its own clip.

Frames of one clip are the archive's own known redundancy, so this measures, without labels, whether
the embedding sees it. An image is eligible when it has a clip id and its clip has at least two
embedded images. ``at_1`` is the share of eligible images whose nearest other image is from the same
clip; ``at_k`` the mean over eligible images of the same-clip images among its top-k, divided by
min(k, other embedded images of its clip).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import MANIFEST_DIR, NEIGHBORS_DIR
from ..storage import RunDir
from .approx import exact_rows

DEFINITION = (
    "eligible: embedded images with a clip id whose clip has 2+ embedded images; at_1: share of eligible images "
    "whose nearest other image is from the same clip; at_k: mean of (same-clip images among the top k) / "
    "min(k, other embedded images of the clip)"
)
NO_MANIFEST = "the run dir has no manifest"
NO_CLIPS = "the manifest has no clip ids"
NO_SIBLINGS = "no clip has 2 or more embedded images"
NO_LISTS = "the similarity stage kept no neighbor lists (top-k 0)"
EXACT_ROWS = 2048  # rows per brute-force block: a 2048 x 8192 float32 chunk of similarities at a time

ClipOf = Mapping[int, Hashable | None] | Sequence[Hashable | None] | np.ndarray | pa.Array | pa.ChunkedArray


def _clip_codes(ids: np.ndarray, clip_of: ClipOf) -> np.ndarray:
    """One integer per image for its clip (-1: no clip), from a mapping image_id -> clip or a parallel sequence."""
    if isinstance(clip_of, Mapping):
        clip_of = [clip_of.get(int(i)) for i in ids]
    arr = clip_of if isinstance(clip_of, (pa.Array, pa.ChunkedArray)) else pa.array(clip_of, from_pandas=True)
    if len(arr) != len(ids):
        raise ValueError(f"need one clip id per image: {len(arr)} clip ids for {len(ids)} images")
    encoded = pc.dictionary_encode(arr)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _neighbor_matrix(nn_ids: np.ndarray | Sequence[np.ndarray], n: int, k: int) -> np.ndarray:
    """The first k neighbor ids of each image as an (n, width) matrix, ``-1`` where a list is shorter."""
    if isinstance(nn_ids, np.ndarray) and nn_ids.ndim == 2:
        nn = nn_ids[:, :k].astype(np.int64)
    else:
        width = min(k, max((len(row) for row in nn_ids), default=0))
        nn = np.full((len(nn_ids), width), -1, np.int64)
        for i, row in enumerate(nn_ids):
            head = np.asarray(row, np.int64)[:width]
            nn[i, : len(head)] = head
    if len(nn) != n:
        raise ValueError(f"need one neighbor list per image: {len(nn)} lists for {n} images")
    return nn


def sibling_recall(
    image_ids: np.ndarray, nn_ids: np.ndarray | Sequence[np.ndarray], clip_of: ClipOf, k: int
) -> dict | None:
    """Sibling recall of best-first lists ``nn_ids[i]`` of images ``image_ids[i]``; None when nothing is measurable.

    ``clip_of`` maps image ids to clips or lists one clip per image (None/null: no clip). Only the first
    ``k`` entries of each list count (fewer when the lists are shorter; the record says which k);
    ids that are not in ``image_ids`` (the ``-1`` padding) count as other clips.
    """
    ids = np.asarray(image_ids, np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    codes = _clip_codes(ids, clip_of)
    nn = _neighbor_matrix(nn_ids, len(ids), max(k, 0))
    sizes = np.bincount(codes[codes >= 0], minlength=1)
    size_of = np.where(codes >= 0, sizes[np.maximum(codes, 0)], 0)
    eligible = np.flatnonzero(size_of >= 2)
    width = nn.shape[1]
    if not len(eligible) or not width:
        return None
    order = np.argsort(ids, kind="stable")
    sorted_ids, sorted_codes = ids[order], codes[order]
    rows = nn[eligible]
    pos = np.minimum(np.searchsorted(sorted_ids, rows), len(ids) - 1)
    same = (sorted_ids[pos] == rows) & (sorted_codes[pos] == codes[eligible][:, None])
    hits = same & (rows != ids[eligible][:, None])
    possible = np.minimum(width, size_of[eligible] - 1)
    return {
        "at_1": float(hits[:, 0].mean()),
        "at_k": float((hits.sum(axis=1) / possible).mean()),
        "k": int(width),
        "n_eligible": int(len(eligible)),
        "n_images": int(len(ids)),
        "n_clips": int(np.count_nonzero(sizes)),
        "n_clips_with_siblings": int(np.count_nonzero(sizes >= 2)),
        "definition": DEFINITION,
    }


def sibling_recall_from_embeddings(x: np.ndarray, clip_ids: Sequence[Hashable | None], k: int) -> dict | None:
    """Sibling recall of exact top-k lists (ties to the lower row) of L2-normalised rows ``x``, brute force in blocks."""
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    k = max(0, min(k, n - 1))
    blocks = [exact_rows(x, np.arange(r0, min(r0 + EXACT_ROWS, n)), k, [])[1] for r0 in range(0, n, EXACT_ROWS)]
    nn = np.concatenate(blocks) if blocks else np.zeros((0, k), np.int64)
    return sibling_recall(np.arange(n), nn, clip_ids, k)


def _lists(column: pa.ChunkedArray) -> np.ndarray | list[np.ndarray]:
    """A list<int64> column as an (n, width) matrix when every list has one length, else one array per row."""
    lists = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    if len(lengths) and not lists.null_count and (lengths == lengths[0]).all():
        return lists.flatten().to_numpy(zero_copy_only=False).reshape(len(lengths), int(lengths[0]))
    return [np.asarray(row or [], np.int64) for row in lists.to_pylist()]


def sibling_recall_from_run(run: RunDir, k: int) -> tuple[dict | None, str | None]:
    """Sibling recall of the run's neighbor lists against its manifest's clip ids, or None and why it is not measured."""
    if not run.shards(MANIFEST_DIR):
        return None, NO_MANIFEST
    manifest = run.read_table(MANIFEST_DIR, columns=["image_id", "clip_id"])
    manifest = manifest.filter(pc.is_valid(manifest.column("clip_id")))
    if not manifest.num_rows:
        return None, NO_CLIPS
    if k < 1:
        return None, NO_LISTS
    neighbors = run.read_table(NEIGHBORS_DIR, columns=["image_id", "nn_ids"])
    ids = neighbors.column("image_id").to_numpy()
    with_clip = manifest.column("image_id").to_numpy()
    order = np.argsort(with_clip, kind="stable")
    pos = np.minimum(np.searchsorted(with_clip[order], ids), len(with_clip) - 1)
    found = pa.array(with_clip[order][pos] == ids)
    clips = pc.if_else(found, manifest.column("clip_id").combine_chunks().take(pa.array(order[pos])), None)
    result = sibling_recall(ids, _lists(neighbors.column("nn_ids")), clips, k)
    return result, None if result is not None else NO_SIBLINGS
