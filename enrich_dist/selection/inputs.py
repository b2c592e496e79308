"""What the select stage reads from the run dir: embedding ids and rows, top-k neighbors, the manifest, seed ids."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..idlists import read_id_list
from ..schema import (
    EDGES_DIR,
    EMBEDDINGS_DIR,
    MANIFEST_DIR,
    NEIGHBORS_DIR,
    SIMILARITY_DIR,
    SIMILARITY_SUMMARY,
)
from ..storage import RunDir, read_uri

log = logging.getLogger("enrich_dist.selection")

SUMMARY_PATH = SIMILARITY_SUMMARY


@dataclass(frozen=True)
class Part:
    """One Parquet shard of an artifact and the range of image ids in it."""

    path: str
    low: int
    high: int


def part_index(run: RunDir, folder: str) -> tuple[list[Part], np.ndarray]:
    """The shards under ``folder`` with their id ranges, and every id in them (sorted)."""
    parts, ids = [], []
    for path in run.shards(folder).values():
        part_ids = run.read_table(path, columns=["image_id"])["image_id"].to_numpy()
        if len(part_ids):
            parts.append(Part(path, int(part_ids.min()), int(part_ids.max())))
            ids.append(part_ids)
    return parts, np.sort(np.concatenate(ids)) if ids else np.empty(0, np.int64)


def embedding_ids(run: RunDir, scope: str | None = None) -> tuple[list[Part], np.ndarray, int]:
    """Embedding shards, the embedded image ids to rank (sorted, unique; within ``scope`` when given), the size."""
    if not run.shards(EMBEDDINGS_DIR):
        raise FileNotFoundError(
            f"no embeddings in {run.uri_of(EMBEDDINGS_DIR)}: run `enrich embed --output {run.uri}` first"
        )
    parts, ids = part_index(run, EMBEDDINGS_DIR)
    if len(ids) == 0:
        raise ValueError(f"{run.uri_of(EMBEDDINGS_DIR)} holds no embeddings: rerun `enrich embed`")
    if np.any(ids[1:] == ids[:-1]):
        raise ValueError(f"{run.uri_of(EMBEDDINGS_DIR)} repeats image ids: rerun `enrich embed`")
    wanted = scope_ids(run, scope)
    if wanted is not None:
        ids = ids[np.isin(ids, wanted)]
        log.info("ranking the %d embedded images listed in %s", len(ids), scope)
    dim = run.read_table(parts[0].path, columns=["embedding"]).schema.field("embedding").type.list_size
    return parts, ids, dim


def scope_ids(run: RunDir, scope: str | None) -> np.ndarray | None:
    """The image ids listed in the ``scope`` file (``select.scope``), sorted; None without one.

    An incremental run sets it to its ``incremental/scope.parquet`` (its labelled and new images).
    """
    if scope is None:
        return None
    try:
        data = read_uri(scope, run.storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"select scope file {scope} not found") from None
    entries = read_id_list(scope, data)
    if not all(isinstance(e, int) for e in entries):
        raise ValueError(f"select scope file {scope} must list image ids")
    return np.sort(np.asarray(entries, np.int64))


def read_rows(run: RunDir, parts: list[Part], want: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
    """``columns`` of the images ``want`` (sorted ids), in that order, from the shards that can hold them."""
    if len(want) == 0:
        return {}
    low, high = int(want[0]), int(want[-1])
    found: dict[str, list] = {c: [] for c in ["image_id", *columns]}
    for part in parts:
        if part.high < low or part.low > high:
            continue
        table = run.read_table(part.path, columns=["image_id", *columns])
        ids = table["image_id"].to_numpy()
        at = np.minimum(np.searchsorted(want, ids), len(want) - 1)
        keep = np.flatnonzero(want[at] == ids)
        for c in columns:
            found[c].append(table[c].take(pa.array(keep)).combine_chunks())
        found["image_id"].append(ids[keep])
    got = np.concatenate(found["image_id"]) if found["image_id"] else np.empty(0, np.int64)
    order = np.argsort(got, kind="stable")
    if len(got) != len(want) or not np.array_equal(got[order], want):
        raise ValueError(f"{run.uri_of(posixpath.dirname(parts[0].path))} lacks or repeats some images")
    return {c: _matrix(pa.concat_arrays(found[c]).take(pa.array(order))) for c in columns}


def _matrix(column: pa.Array) -> np.ndarray:
    """A fixed-size or equal-length list column as a 2-D numpy array."""
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    else:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if len(lengths) else 0
        if np.any(lengths != width):
            raise ValueError("neighbor lists have different lengths")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)


def read_vectors(run: RunDir, parts: list[Part], want: np.ndarray) -> np.ndarray:
    """Embeddings of the images ``want`` (sorted ids) as float32 rows."""
    return read_rows(run, parts, want, ["embedding"])["embedding"].astype(np.float32, copy=False)


@dataclass(frozen=True)
class EdgeList:
    """The similarity stage's pairs above ``threshold`` (GEMM products), as rows of the ranked images (a < b)."""

    a: np.ndarray
    b: np.ndarray
    threshold: float


def edge_list(run: RunDir, ids: np.ndarray) -> EdgeList | None:
    """Every pair of ``ids`` (sorted) above the similarity stage's edge threshold, or None without a complete list."""
    if not run.is_done(SIMILARITY_DIR) or not run.exists(SUMMARY_PATH):
        return None
    summary = run.read_json(SUMMARY_PATH)
    edges = summary.get("edges")
    if not edges or not edges.get("complete") or not summary.get("exact") or not run.shards(EDGES_DIR):
        return None
    table = run.read_table(EDGES_DIR, columns=["i", "j"])
    a, b = table["i"].to_numpy(), table["j"].to_numpy()
    keep = np.isin(a, ids) & np.isin(b, ids)
    return EdgeList(np.searchsorted(ids, a[keep]), np.searchsorted(ids, b[keep]), float(edges["threshold"]))


def neighbor_parts(run: RunDir, n: int, quiet: bool = False) -> list[Part] | None:
    """The neighbor shards when the similarity stage made exact top-k lists of these ``n`` images, else None.

    Why there are none is logged for the ranking's pruning; ``quiet`` callers (the repeat measures) say it at DEBUG.
    """
    level = logging.DEBUG if quiet else logging.INFO
    if not run.is_done(SIMILARITY_DIR) or not run.exists(SUMMARY_PATH):
        log.log(level, "no similarity stage in %s: selection runs without neighbor pruning", run.uri)
        return None
    summary = run.read_json(SUMMARY_PATH)
    if not summary.get("exact") or summary.get("n_images") != n or not summary.get("top_k"):
        log.log(level, "the similarity lists in %s are approximate, empty or for another set: no pruning", run.uri)
        return None
    return part_index(run, NEIGHBORS_DIR)[0] or None


def read_neighbors(
    run: RunDir, parts: list[Part], ids: np.ndarray, want: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Top-k neighbor rows (-1 where unknown) and similarities of the images ``want``; None if unusable."""
    try:
        table = read_rows(run, parts, want, ["nn_ids", "nn_sims"])
    except ValueError as exc:
        log.warning("neighbor lists unusable (%s): no pruning", exc)
        return None
    nn_ids = table["nn_ids"].astype(np.int64)
    at = np.minimum(np.searchsorted(ids, nn_ids), len(ids) - 1)
    rows = np.where((ids[at] == nn_ids) & (nn_ids >= 0), at, -1)
    return rows, table["nn_sims"].astype(np.float32)


def read_manifest(run: RunDir, ids: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """The whole manifest, and its rows of the embedded images in ``ids`` order."""
    if not run.shards(MANIFEST_DIR):
        raise FileNotFoundError(
            f"no manifest in {run.uri_of(MANIFEST_DIR)}: run `enrich manifest --output {run.uri}` first"
        )
    table = run.read_table(MANIFEST_DIR)
    manifest_ids = table["image_id"].to_numpy()
    order = np.argsort(manifest_ids, kind="stable")
    where = np.searchsorted(manifest_ids, ids, sorter=order)
    rows = order[np.minimum(where, len(order) - 1)]
    missing = manifest_ids[rows] != ids
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} embedded image ids (e.g. {int(ids[missing][0])}) are not in "
            f"{run.uri_of(MANIFEST_DIR)}: rerun `enrich embed` after `enrich manifest`"
        )
    return table, table.take(pa.array(rows))


def codes(manifest: pa.Table, name: str) -> tuple[np.ndarray, list[str]]:
    """Per row, the code of column ``name`` (-1 when null or absent) and each code's value, sorted."""
    if name not in manifest.column_names:
        return np.full(manifest.num_rows, -1, dtype=np.int64), []
    encoded = manifest[name].cast(pa.string()).combine_chunks().dictionary_encode()
    names = encoded.dictionary.to_pylist()
    if not names:
        return np.full(manifest.num_rows, -1, dtype=np.int64), []
    order = sorted(range(len(names)), key=names.__getitem__)
    remap = np.empty(len(names), dtype=np.int64)
    remap[order] = np.arange(len(names))
    index = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(index >= 0, remap[np.maximum(index, 0)], -1), [names[i] for i in order]


def read_seed_ids(
    path: str, storage_options: dict | None, manifest_all: pa.Table, ids: np.ndarray
) -> np.ndarray:
    """Rows of the images listed in ``path`` (ids or uris; CSV, Parquet or one per line), in file order.

    Unknown ids or uris are an error naming the file; known images that have no embedding (failed
    to decode or embed) are dropped with a warning.
    """
    try:
        data = read_uri(path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"seed id file {path} not found") from None
    entries = read_id_list(path, data)
    if not entries:
        raise ValueError(f"seed id file {path} lists no images")
    as_ids = all(isinstance(e, int) for e in entries)
    key = "image_id" if as_ids else "uri"
    known = dict(zip(manifest_all[key].to_pylist(), manifest_all["image_id"].to_pylist(), strict=True))
    missing = [e for e in entries if e not in known]
    if missing:
        shown = ", ".join(str(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"seed id file {path}: {len(missing)} {key}s are not in the archive's manifest: {shown}{more}"
        )
    chosen = list(dict.fromkeys(known[e] for e in entries))
    wanted = np.array(chosen, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    embedded = ids[at] == wanted
    if not embedded.all():
        log.warning(
            "seed id file %s: %d images have no embedding (decode or embed errors) and are not seeds, e.g. %s",
            path,
            int((~embedded).sum()),
            wanted[~embedded][:5].tolist(),
        )
    if not embedded.any():
        raise ValueError(f"seed id file {path}: none of its images has an embedding")
    return at[embedded].astype(np.int64)
