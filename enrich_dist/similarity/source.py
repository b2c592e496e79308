"""The embeddings artifact as tile tasks read it: row blocks loaded from the shards by Ray tasks.

The driver reads only the image ids (8 bytes an image) and each shard's row count; a loader task per
block of rows reads the shards that hold them, checks the rows (finite, L2-normalised) and leaves the
block in the object store of the node it ran on, with a digest of its bytes. Tile tasks then fetch
the blocks they pair. So no process holds the N x d matrix: the driver's memory is the ids and the
reduction, a loader's one block plus the shards it spans, a tile task's two blocks.

Blocks are ranges of the images in ascending id order, which is the shards' order when the ids
increase across them (as ``enrich embed`` writes them). Otherwise :meth:`ShardSource.open` returns
None and the stage reads the matrix whole, as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..schema import EMBEDDINGS_DIR
from ..storage import RunDir
from . import kernel


def embedding_matrix(column: pa.ChunkedArray, out: np.ndarray | None = None) -> np.ndarray:
    """A fixed-size-list column as one float32 matrix, chunk by chunk (no combined copy of the column).

    ``out``: a float32 matrix of the column's shape to fill instead of a new one (a slice of a larger block).
    """
    dim = column.type.list_size
    x = np.empty((len(column), dim), np.float32) if out is None else out
    row = 0
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError(f"{chunk.null_count} embeddings are missing (null): rerun `enrich embed`")
        values = chunk.values.to_numpy(zero_copy_only=False)
        x[row : row + len(chunk)] = values[chunk.offset * dim : (chunk.offset + len(chunk)) * dim].reshape(-1, dim)
        row += len(chunk)
    return x


def bad_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and norms of the rows the tiles cannot take: non-finite, zero or not L2-normalised."""
    norms = np.linalg.norm(x, axis=1) if len(x) else np.zeros(0, np.float32)
    bad = ~np.isfinite(norms) | (norms > kernel.NORM_LIMIT) | (norms < 1 / kernel.NORM_LIMIT)
    return np.flatnonzero(bad), norms[bad]


def bad_rows_message(ids: np.ndarray, norms: np.ndarray) -> str:
    """The error for rows ``ids`` with ``norms``, naming the fix."""
    zero = int(np.count_nonzero(norms == 0))
    return (
        f"embeddings must be finite and L2-normalised: {len(ids)} rows are not (image ids "
        f"{ids[:5].tolist()}, norms {np.round(norms[:5], 4).tolist()}"
        + (f"; {zero} are zero vectors, which have no direction" if zero else "")
        + "); rerun `enrich embed`, which drops zero and non-finite embeddings into embeddings_errors/"
    )


READ_BATCH = 8192  # rows decoded at a time: Parquet list decoding holds several times its output


def read_spans(uri: str, storage_options: dict | None, spans: list[tuple[str, int, int]], dim: int) -> np.ndarray:
    """Rows ``start:stop`` of each shard in ``spans``, as one float32 matrix.

    Each shard is decoded ``READ_BATCH`` rows at a time straight into the block, so a task holds the block,
    one shard's file bytes and one batch, not each whole shard decoded and converted.
    """
    run = RunDir(uri, storage_options)
    block = np.empty((sum(stop - start for _, start, stop in spans), dim), np.float32)
    row = 0
    for path, start, stop in spans:
        shard = pq.ParquetFile(pa.BufferReader(run.read_bytes(path)), pre_buffer=False)  # no cache of read groups
        size = shard.schema_arrow.field("embedding").type.list_size
        if size != dim:
            raise ValueError(f"embedding shards of dimension {size} and {dim}: rerun `enrich embed`")
        seen = 0
        for batch in shard.iter_batches(batch_size=READ_BATCH, columns=["embedding"]):
            lo, hi = max(start, seen), min(stop, seen + batch.num_rows)
            if lo < hi:
                part = pa.chunked_array([batch.column(0).slice(lo - seen, hi - lo)])
                embedding_matrix(part, block[row : row + hi - lo])
                row += hi - lo
            seen += batch.num_rows
            if seen >= stop:
                break
        del shard
    pa.default_memory_pool().release_unused()
    return block[:row]


def digest(block: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(block).view(np.uint8).reshape(-1), digest_size=16).hexdigest()


@ray.remote(num_returns=2)
def _load_block(
    uri: str, storage_options: dict | None, spans: list[tuple[str, int, int]], dim: int
) -> tuple[np.ndarray, tuple[str, np.ndarray, np.ndarray]]:
    """One block: rows ``start:stop`` of each shard in ``spans``; and (digest, bad positions, their norms)."""
    block = read_spans(uri, storage_options, spans, dim)
    where, norms = bad_rows(block)
    return block, (digest(block), where, norms)


@dataclass(frozen=True)
class RowRange:
    """Rows ``start:stop`` of a float32 matrix with ``dim`` columns that a task reads: an object-store
    array (``ref``: a one-element list, so that Ray passes the reference, not the array), a raw scratch
    file of a run dir (``uri``, ``rel``), or rows of the embedding shards (``spans``)."""

    start: int
    stop: int
    dim: int
    ref: list | None = None
    uri: str | None = None
    storage_options: dict | None = None
    rel: str | None = None
    spans: tuple | None = None


def read_rows(where: RowRange) -> np.ndarray:
    """The rows ``where`` names (read-only; zero-copy from the object store on the same node)."""
    if where.ref is not None:
        return ray.get(where.ref[0])[where.start : where.stop]
    if where.spans is not None:
        block = read_spans(where.uri, where.storage_options, list(where.spans), where.dim)
        block.setflags(write=False)
        return block
    size = 4 * where.dim
    data = RunDir(where.uri, where.storage_options).read_range(where.rel, where.start * size, where.stop * size)
    return np.frombuffer(data, np.float32).reshape(-1, where.dim)


def fetch(pieces: dict) -> dict:
    """Each piece's rows: object-store refs fetched in one call, :class:`RowRange` pieces read."""
    refs = {key: value for key, value in pieces.items() if isinstance(value, ray.ObjectRef)}
    out = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    out.update({key: read_rows(value) for key, value in pieces.items() if key not in refs})
    return out


@dataclass
class MatrixSource:
    """An embedding matrix the driver already holds, offered to tasks as the shards are: block by block."""

    x: np.ndarray
    ids: np.ndarray

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def block(self, start: int, stop: int) -> RowRange:
        return RowRange(0, stop - start, self.dim, ref=[ray.put(self.x[start:stop])])


@dataclass
class ShardSource:
    """The run's embedding shards, read by loader tasks: the driver keeps the ids (ascending) only."""

    run: RunDir
    paths: list[str]
    starts: np.ndarray  # first image position of each shard; one more entry: the total
    ids: np.ndarray
    dim: int

    @classmethod
    def open(cls, run: RunDir) -> ShardSource | None:
        """The shards' ids and sizes; None when the ids do not increase across the shards (read whole then)."""
        shards = run.shards(EMBEDDINGS_DIR)
        if not shards:
            return None
        paths = list(shards.values())
        tables = [run.read_table(p, columns=["image_id"]) for p in paths]
        ids = np.concatenate([t.column("image_id").to_numpy() for t in tables]).astype(np.int64)
        if len(ids) == 0 or np.any(ids[1:] <= ids[:-1]):
            return None
        dim = run.read_table(paths[0], columns=["embedding"]).schema.field("embedding").type.list_size
        starts = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])
        return cls(run, paths, starts, ids, dim)

    def block(self, start: int, stop: int) -> RowRange:
        """Image positions ``start:stop`` as a task reads them from the shards."""
        return RowRange(
            start, stop, self.dim, uri=self.run.uri, storage_options=self.run.storage_options,
            spans=tuple(self.spans(start, stop)),
        )

    def spans(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """(shard, first row, row after the last) covering image positions ``start:stop``."""
        out = []
        for s in range(int(np.searchsorted(self.starts, start, side="right")) - 1, len(self.paths)):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo >= stop:
                break
            if hi > lo:
                out.append((self.paths[s], int(lo - self.starts[s]), int(hi - self.starts[s])))
        return out

    def load(self, ranges: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], ray.ObjectRef], list[str]]:
        """Each range's block as an object-store piece, and the blocks' digests in ``ranges`` order.

        Raises ValueError naming the images whose embeddings the tiles cannot take.
        """
        refs = {
            r: _load_block.remote(self.run.uri, self.run.storage_options, self.spans(*r), self.dim) for r in ranges
        }
        infos = ray.get([info for _, info in refs.values()])
        bad = [(start + where, norms) for (start, _), (_, where, norms) in zip(ranges, infos, strict=True) if len(where)]
        if bad:
            positions = np.concatenate([b[0] for b in bad])
            raise ValueError(bad_rows_message(self.ids[positions], np.concatenate([b[1] for b in bad])))
        return {r: piece for r, (piece, _) in refs.items()}, [digest for digest, _, _ in infos]
