"""The similarity stage: tiles as Ray tasks, an incremental reduce on the driver, checkpoints and artifacts in the run dir."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import posixpath
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import ray
from threadpoolctl import threadpool_limits

from .. import stages
from ..config import RunConfig, SimilarityConfig, check_section, parse_memory
from ..executor import Context, execute
from ..invariants import count_duplicates, float_values, ids_of
from ..runtime import cluster_resources
from ..schema import (
    DUPLICATES_DIR,
    EDGES_DIR,
    EMBEDDINGS_DIR,
    NEIGHBORS_DIR,
    SIMILARITY_SUMMARY,
    neighbors_schema,
)
from ..storage import RunDir, shard_name
from . import approx, kernel, partitioned
from .duplicates import write_duplicates
from .plan import (
    GPU_BLOCK,
    Tile,
    approx_driver_bytes,
    choose_block,
    group_tiles,
    histogram_edges,
    partition_tile_plan,
    schedule,
    tile_plan,
)
from .reduce import PARTIALS_DIR, EdgeCapError, Reduction, load_checkpoint, save_checkpoint
from .siblings import sibling_recall_from_run
from .source import MatrixSource, ShardSource, bad_rows, bad_rows_message, embedding_matrix, fetch

log = logging.getLogger("enrich_dist.similarity")

PAPER_THRESHOLDS = (0.5, 0.7, 0.9)
SHARD_ROWS = 50_000
EDGE_SHARD_ROWS = 5_000_000
EDGES_SCHEMA = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("sim", pa.float32())])
MIN_TASK_PAIRS = 1 << 22
SUMMARY = SIMILARITY_SUMMARY
PARTITIONS = partitioned.PARTITIONS
MODES = ("exact", "approx")
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """What a tile task runs: the compiled CPU kernel (``numba``), or the ``torch`` or ``triton`` one on ``device``."""

    backend: str
    device: str
    precision: str
    k: int
    thresholds: tuple[float, ...]
    edges: np.ndarray
    edge_threshold: float | None = None


def _tile_group(
    rows: Callable[[int, int], np.ndarray],
    tiles: list[Tile],
    floors: list[tuple[np.ndarray | None, np.ndarray | None]],
    spec: _Kernel,
) -> list[tuple[Tile, kernel.TileStats]]:
    """Ray task body: a few tiles; numba with one BLAS thread (the task's one CPU), or torch (blocks moved once).

    ``rows(start, stop)`` gives the embedding rows of a tile's side.
    """
    def common(tile: Tile, xi, xj) -> tuple:
        return xi, xj, tile[0] == tile[2], spec.k, spec.thresholds, spec.edges

    if spec.backend == "numba":
        with threadpool_limits(limits=1):
            return [
                (
                    tile,
                    kernel.tile_stats(
                        *common(tile, rows(tile[0], tile[1]), rows(tile[2], tile[3])),
                        row_offset=tile[0], col_offset=tile[2], row_floor=rf, col_floor=cf,
                        edge_threshold=spec.edge_threshold,
                    ),
                )
                for tile, (rf, cf) in zip(tiles, floors, strict=True)
            ]
    import torch

    if spec.backend == "triton":
        from .triton_kernel import tile_stats_triton as tile_stats
    else:
        from .torch_kernel import tile_stats_torch as tile_stats

    torch.set_float32_matmul_precision("highest")
    blocks: dict[tuple[int, int], torch.Tensor] = {}

    def block(start: int, stop: int) -> torch.Tensor:
        if (start, stop) not in blocks:
            blocks[(start, stop)] = torch.tensor(rows(start, stop), device=spec.device)
        return blocks[(start, stop)]

    return [
        (
            tile,
            tile_stats(
                *common(tile, block(tile[0], tile[1]), block(tile[2], tile[3])),
                row_offset=tile[0], col_offset=tile[2], device=spec.device, precision=spec.precision,
                edge_threshold=spec.edge_threshold,
            ),
        )
        for tile in tiles
    ]


def _tile_group_on_node(
    pieces: dict[tuple[int, int], ray.ObjectRef], tiles: list[Tile], floors: list, spec: _Kernel
) -> tuple[str, list]:
    """A tile task: the node it ran on (the summary counts them), and the group's results.

    ``pieces`` holds just the row ranges its tiles read (object-store refs, or ranges of the approximate
    mode's scratch files), fetched here: a node receives the blocks its tasks use, never the whole matrix.
    """
    arrays = fetch(pieces)
    results = _tile_group(lambda start, stop: arrays[(start, stop)], tiles, floors, spec)
    return ray.get_runtime_context().get_node_id(), results


_tile_task = ray.remote(num_cpus=1)(_tile_group_on_node)


def _warm_up(spec: _Kernel) -> None:
    """Load the compiled kernel in this worker process (from numba's on-disk cache after the first run).

    numba keeps one compiled version per argument types, so the tiles here are typed as the stage's
    are: read-only rows (as tasks get them from the object store), floors from a reduction, diagonal
    and off-diagonal tiles.
    """
    x = np.random.default_rng(0).standard_normal((2 * WARM_ROWS, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x.setflags(write=False)
    reduction = Reduction(len(x), min(spec.k, len(x) - 1), len(spec.thresholds), len(spec.edges) - 1)
    tiles = [(0, WARM_ROWS, 0, WARM_ROWS), (0, WARM_ROWS, WARM_ROWS, 2 * WARM_ROWS)]
    floors = [reduction.floors(tile) for tile in tiles]
    _tile_group(lambda start, stop: x[start:stop], tiles, floors, dataclasses.replace(spec, k=reduction.k))


_warm_task = ray.remote(num_cpus=1)(_warm_up)
WARM_ROWS = 8


def _spec(cfg: SimilarityConfig, backend: str, device: str, k: int) -> _Kernel:
    """The tile kernel's settings: the thresholds asked for, the paper's and the edge threshold."""
    edge_t = None if cfg.edge_threshold is None else float(cfg.edge_threshold)
    thresholds = sorted({float(t) for t in cfg.thresholds} | set(PAPER_THRESHOLDS) | ({edge_t} - {None}))
    return _Kernel(backend, device, cfg.precision, k, tuple(thresholds), histogram_edges(cfg.bins), edge_t)


def warm_workers(cfg: SimilarityConfig) -> list[ray.ObjectRef]:
    """Start one CPU worker per core loading the kernel while the driver reads the embeddings.

    A cold worker spends about a second importing the package and loading the compiled kernel before
    its first tile; started here, that overlaps the read instead of delaying the first tiles. Not for
    GPU runs (their tiles use torch) nor the approximate mode (its k-means task takes every core first).
    """
    resources = cluster_resources()
    if cfg.mode != "exact" or _backend(cfg, _device(cfg, resources.gpus)) != "numba":
        return []
    spec = _spec(cfg, "numba", "cpu", cfg.top_k)
    return [_warm_task.remote(spec) for _ in range(resources.cpus)]


def _device(cfg: SimilarityConfig, gpus: int) -> str:
    """``cpu`` or ``cuda`` from the config and the cluster; says so when a GPU is asked for and absent."""
    if cfg.device not in DEVICES:
        raise ValueError(f"similarity device must be one of {DEVICES}, got {cfg.device!r}")
    if cfg.device == "cuda" and gpus == 0:
        raise ValueError(
            "similarity device cuda asked for, but the Ray cluster has no GPU: use --similarity-device cpu"
        )
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
    if device == "cpu" and cfg.precision != "fp32":
        raise ValueError(f"precision {cfg.precision!r} needs a GPU; the CPU kernel computes in fp32")
    return device


def _backend(cfg: SimilarityConfig, device: str) -> str:
    """The tile kernel: numba on CPUs and Triton (else torch) on GPUs unless ``cfg.kernel`` names one."""
    if cfg.kernel == "auto":
        if device == "cpu":
            return "numba"
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    if cfg.kernel == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("--similarity-kernel triton needs Triton: pip install triton (or use --similarity-kernel torch)")
    return cfg.kernel


def _fingerprint(x: np.ndarray, ids: np.ndarray, settings: dict) -> str:
    """Hash of the embeddings, ids and every setting the results depend on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1))
    digest.update(ids.view(np.uint8))
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def tile_ranges(tiles: list[Tile]) -> list[tuple[int, int]]:
    """The row ranges the tiles read (rows and columns), each once, in order."""
    return sorted({(t[0], t[1]) for t in tiles} | {(t[2], t[3]) for t in tiles})


def put_pieces(x: np.ndarray, tiles: list[Tile]) -> dict[tuple[int, int], ray.ObjectRef]:
    """Each row range the tiles read, put in the object store once (a tile task fetches only its own)."""
    return {(start, stop): ray.put(x[start:stop]) for start, stop in tile_ranges(tiles)}


def _run_tiles(
    pieces: dict[tuple[int, int], ray.ObjectRef],
    tiles: list[Tile],
    reduction: Reduction,
    spec: _Kernel,
    workers: int,
    checkpoint: tuple[RunDir, str, float] | None,
    done: np.ndarray,
    progress: bool,
) -> tuple[int, int]:
    """Submit tile groups through a bounded window, reduce each result as it completes.

    Returns the tiles computed and the number of nodes they ran on. A task whose worker or node dies is
    resubmitted by Ray (tasks are idempotent: a tile's result depends on its rows only).
    """
    index = {tile: i for i, tile in enumerate(tiles)}
    todo = [tile for tile in tiles if not done[index[tile]]]
    groups: Iterator[list[Tile]] = iter(group_tiles(todo, MIN_TASK_PAIRS if spec.backend == "numba" else 1))
    task = _tile_task.options(num_gpus=1) if spec.device == "cuda" else _tile_task
    if spec.backend == "triton" and spec.device == "cpu":  # Triton's interpreter, set before triton is imported
        task = task.options(runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}})
    window = 2 * max(1, workers)
    pending: dict[ray.ObjectRef, int] = {}

    def submit() -> None:
        group = next(groups, None)
        if group is not None:
            floors = [reduction.floors(tile) if spec.backend == "numba" else (None, None) for tile in group]
            needed = {(t[0], t[1]) for t in group} | {(t[2], t[3]) for t in group}
            pending[task.remote({r: pieces[r] for r in needed}, group, floors, spec)] = len(group)

    for _ in range(window):
        submit()
    start = last_save = time.perf_counter()
    computed, logged, nodes = 0, 0, set()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            node, results = ray.get(ref)
            nodes.add(node)
            for tile, stats in results:
                reduction.add(tile, stats)
                done[index[tile]] = True
                computed += 1
            submit()
        if checkpoint is not None and (time.perf_counter() - last_save >= checkpoint[2] or not pending):
            save_checkpoint(checkpoint[0], reduction, done, checkpoint[1])
            last_save = time.perf_counter()
        if progress and (10 * computed // max(len(todo), 1) > logged or not pending):
            logged = 10 * computed // max(len(todo), 1)
            elapsed = time.perf_counter() - start
            log.info(
                "similarity: %d/%d tiles (%.0f%%), %.2f tiles/s",
                computed,
                len(todo),
                100 * computed / max(len(todo), 1),
                computed / max(elapsed, 1e-9),
            )
    return computed, len(nodes)


def _check_embeddings(x: np.ndarray, ids: np.ndarray) -> None:
    """Reject what the tiles cannot handle, naming the images: non-finite, zero or unnormalised rows, duplicate ids."""
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need a 2-d embedding matrix and one id per row, got {x.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    where, norms = bad_rows(x)
    if len(where):
        raise ValueError(bad_rows_message(ids[where], norms))


def _summary(
    n: int,
    pairs_above: dict[float, int],
    reduction: Reduction,
    cfg: SimilarityConfig,
    edges: np.ndarray,
    thresholds: list[float],
) -> dict:
    """The ``similarity/summary.json`` record, less timing and mode details."""
    n_pairs = n * (n - 1) // 2

    def fraction(count: int, total: int) -> float:
        return count / total if total else 0.0

    per_threshold = {}
    for t in cfg.thresholds:
        with_neighbor = int(np.count_nonzero(reduction.counts[thresholds.index(float(t))]))
        per_threshold[f"{t:g}"] = {
            "pairs": pairs_above[float(t)],
            "pair_fraction": fraction(pairs_above[float(t)], n_pairs),
            "images_with_neighbor": with_neighbor,
            "image_fraction": fraction(with_neighbor, n),
        }
    low, mid, high = (pairs_above[t] for t in PAPER_THRESHOLDS)
    paper = {"<=0.5": n_pairs - low, "0.5-0.7": low - mid, "0.7-0.9": mid - high, ">0.9": high}
    return {
        "n_images": n,
        "n_pairs": n_pairs,
        "histogram": {"edges": edges.tolist(), "counts": reduction.hist.tolist()},
        "thresholds": per_threshold,
        "paper_bins": {name: {"pairs": c, "fraction": fraction(c, n_pairs)} for name, c in paper.items()},
        "exact": cfg.mode == "exact" and cfg.precision == "fp32",
        "inexact_reasons": inexact_reasons(cfg.mode, cfg.precision),
        "top_k": cfg.top_k,
    }


def inexact_reasons(mode: str, precision: str) -> list[str]:
    """Why a summary is not exact (empty when it is): the approximate mode, half-precision products, or both."""
    reasons = []
    if mode == "approx":
        reasons.append(
            "approximate mode: only pairs within and across nearby k-means partitions were compared"
        )
    if precision != "fp32":
        reasons.append(f"{precision} products on the GPU: similarities carry half-precision rounding")
    return reasons


def _neighbors_table(
    ids: np.ndarray, reduction: Reduction, cfg: SimilarityConfig, thresholds: list[float]
) -> pa.Table:
    """One row per image, sorted by ``image_id``, neighbors best first; ``-1`` pads lists of unfound neighbors."""
    n, k = reduction.idx.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    columns = {
        "image_id": pa.array(ids),
        "max_sim": pa.array(reduction.vals[:, 0]) if k else pa.nulls(n, pa.float32()),
        "nn_ids": pa.ListArray.from_arrays(
            offsets, pa.array(np.where(reduction.idx >= 0, ids[reduction.idx], -1).reshape(-1))
        ),
        "nn_sims": pa.ListArray.from_arrays(offsets, pa.array(reduction.vals.reshape(-1))),
    }
    schema = neighbors_schema(cfg.thresholds)
    for t, name in zip(cfg.thresholds, schema.names[4:], strict=True):
        columns[name] = pa.array(reduction.counts[thresholds.index(float(t))])
    return pa.Table.from_pydict(columns, schema=schema)


def compute_similarity(
    x: np.ndarray, ids: np.ndarray, cfg: SimilarityConfig, progress: bool = True, run: RunDir | None = None
) -> tuple[pa.Table, dict]:
    """All-pairs similarity of L2-normalised rows ``x``: the neighbors table and the summary.

    With ``run``, partial reductions are committed under ``similarity/partials/`` and a rerun resumes
    from them.
    """
    table, summary, _ = compute_similarity_edges(x, ids, cfg, progress, run)
    return table, summary


def compute_similarity_edges(
    x: np.ndarray | ShardSource,
    ids: np.ndarray | None,
    cfg: SimilarityConfig,
    progress: bool = True,
    run: RunDir | None = None,
) -> tuple[pa.Table, dict, pa.Table]:
    """:func:`compute_similarity` plus the edge table: every pair above ``cfg.edge_threshold``.

    The edge table has image ids ``i`` < ``j`` and their similarity ``sim``, sorted by the two ids; it is
    empty when ``cfg.edge_threshold`` is None. In approximate mode it holds the pairs compared. ``x``
    may be a :class:`ShardSource` (``ids`` is then its own): tasks read the row blocks from the shards
    and no process holds the whole matrix.
    """
    start = time.perf_counter()
    check_section("similarity", cfg)
    source = x if isinstance(x, ShardSource) else None
    if source is not None:
        ids, n, dim = source.ids, len(source.ids), source.dim
    else:
        x = np.asarray(x, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        _check_embeddings(x, ids)
        if np.any(ids[1:] < ids[:-1]):
            order = np.argsort(ids, kind="stable")
            ids, x = ids[order], x[order]
        x = np.ascontiguousarray(x)
        n, dim = x.shape
    edge_t = None if cfg.edge_threshold is None else float(cfg.edge_threshold)
    k = min(cfg.top_k, max(n - 1, 0))
    resources = cluster_resources()
    device = _device(cfg, resources.gpus)
    backend = _backend(cfg, device)
    spec = _spec(cfg, backend, device, k)
    thresholds = list(spec.thresholds)
    workers = max(1, resources.gpus if device == "cuda" else resources.cpus)
    if cfg.block_size:
        block = cfg.block_size
    elif device == "cuda":
        block = max(1, min(GPU_BLOCK, n))
    else:
        block = choose_block(
            n, dim, k, len(thresholds), parse_memory(cfg.max_memory), workers, kernel.chunk_rows(n),
            # the approximate mode keeps the rows in scratch files: the driver holds ids, assignment, reduction
            held=approx_driver_bytes(n, dim, k, len(thresholds), approx.kmeans_rows(n, cfg.n_partitions))
            if cfg.mode == "approx" else None,
        )
    settings = {
        "k": k,
        "thresholds": thresholds,
        "bins": cfg.bins,
        "block": block,
        "mode": cfg.mode,
        "seed": cfg.seed,
        "n_partitions": cfg.n_partitions,
        "nprobe": cfg.nprobe,
        "device": device,
        "precision": cfg.precision,
        "edge_threshold": edge_t,
    }
    parts = layout = None
    if cfg.mode == "approx":  # scan, k-means on a sample, scatter and gather: see partitioned.py
        size = cfg.n_partitions or approx.default_partitions(n)
        found = partitioned.scan(
            source if source is not None else MatrixSource(x, ids),
            n,
            np.union1d(approx.kmeans_sample(n, size, cfg.seed), approx.quality_sample(n, cfg.sample_size, cfg.seed)),
        )
        fingerprint = _fingerprint(np.frombuffer("".join(found.digests).encode(), np.uint8), ids, settings)
        threads = max(
            1, min(resources.cpus, max(int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node["Alive"]))
        )
        cents = partitioned.centroids(
            found, n, size, cfg.nprobe, cfg.seed, threads, device == "cuda", run, fingerprint
        )
        layout = partitioned.layout(
            found, cents, n, dim, cfg.sample_size, cfg.seed, k, thresholds, histogram_edges(cfg.bins), run
        )
        found = None  # the sampled rows and, for a matrix held here, its blocks in the object store go now
        parts = layout.parts
        tiles = schedule(partition_tile_plan(parts.bounds, parts.pairs, block))
        pieces = layout.pieces(tile_ranges(tiles))
    elif source is not None:  # loader tasks read the blocks from the shards; the digests stand for the matrix
        tiles = schedule(tile_plan(n, block))
        pieces, digests = source.load(tile_ranges(tiles))
        fingerprint = _fingerprint(np.frombuffer("".join(digests).encode(), np.uint8), ids, settings)
    else:
        fingerprint = _fingerprint(x, ids, settings) if run is not None else ""
        tiles = schedule(tile_plan(n, block))
        pieces = put_pieces(x, tiles)
    if progress:
        log.info(
            "similarity: tile tasks read only their own blocks (two of at most %d rows, %s each) from %d pieces",
            block, _mib(block * dim * 4), len(pieces),
        )
        log.info(
            "similarity: %d images, dim %d, %s mode on %s (%s kernel, %s), block %d (%s), %d tiles, top-%d",
            n,
            dim,
            cfg.mode,
            device,
            backend,
            cfg.precision,
            block,
            "--block-size" if cfg.block_size else f"--max-memory {cfg.max_memory}",
            len(tiles),
            k,
        )
    reduction = Reduction(
        n, k, len(thresholds), cfg.bins, None if parts is None else parts.perm, max_edges=cfg.max_edges
    )
    done = (
        np.zeros(len(tiles), bool)
        if run is None
        else load_checkpoint(run, reduction, len(tiles), fingerprint)
    )
    checkpoint = None if run is None else (run, fingerprint, cfg.checkpoint_seconds)
    computed, n_nodes = _run_tiles(pieces, tiles, reduction, spec, workers, checkpoint, done, progress)
    edges = histogram_edges(cfg.bins)
    n_pairs = n * (n - 1) // 2
    details: dict = {}
    if layout is not None:
        reduction.hist += approx.missing_histogram(layout.sampled_hist, n_pairs - reduction.pairs)
        quality = approx.sample_quality(
            reduction.idx[layout.sample], reduction.counts[:, layout.sample], layout.exact_idx,
            layout.exact_counts, thresholds,
        )
        sampled = int(layout.sampled_hist.sum())
        details["approx"] = {
            **quality,
            "n_partitions": len(parts.bounds) - 1,
            "partition_device": parts.device,
            "partition_device_note": parts.device_note,
            "nprobe": cfg.nprobe,
            "pairs_computed": reduction.pairs,
            "pair_fraction_computed": reduction.pairs / n_pairs if n_pairs else 1.0,
            "histogram": f"computed pairs exact; the other pairs estimated from {sampled} pairs of the sampled images",
            "threshold_counts": "lower bounds: pairs in partitions never compared are not counted",
        }
    pairs_above = {t: int(reduction.counts[i].sum()) // 2 for i, t in enumerate(thresholds)}
    table = _neighbors_table(ids, reduction, cfg, thresholds)
    summary = _summary(n, pairs_above, reduction, cfg, edges, thresholds)
    edge_a, edge_b, edge_s = reduction.edges()
    edge_table = pa.table(
        {"i": pa.array(ids[edge_a]), "j": pa.array(ids[edge_b]), "sim": pa.array(edge_s)},
        schema=EDGES_SCHEMA,
    )
    summary["edges"] = (
        None
        if edge_t is None
        else {
            "threshold": edge_t,
            "pairs": len(edge_a),
            "max_edges": cfg.max_edges,
            "complete": parts is None,
            "path": EDGES_DIR,
        }
    )
    summary.update(
        mode=cfg.mode,
        device=device,
        kernel=backend,
        precision=cfg.precision,
        block_size=block,
        tiles={"total": len(tiles), "computed": computed, "resumed": len(tiles) - computed, "nodes": n_nodes},
        seconds=time.perf_counter() - start,
        **details,
    )
    if progress:
        log.info("similarity: %d pairs in %.1f s", n_pairs, summary["seconds"])
        if edge_t is not None:
            log.info("similarity: %d pairs above %g kept in %s", len(edge_a), edge_t, EDGES_DIR)
    return table, summary, edge_table


def _read_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings artifact as a float32 matrix and its image ids."""
    if not run.shards(EMBEDDINGS_DIR):
        raise FileNotFoundError(
            f"no embeddings under {run.uri_of(EMBEDDINGS_DIR)}: run `enrich embed --output {run.uri}` first"
        )
    table = run.read_table(EMBEDDINGS_DIR, columns=["image_id", "embedding"])
    return embedding_matrix(table.column("embedding")), table.column("image_id").to_numpy()


def _write_shards(run: RunDir, folder: str, table: pa.Table, shard_rows: int) -> None:
    """Replace ``folder`` with ``table`` in shards of at most ``shard_rows`` rows (one shard, maybe empty, at least)."""
    run.remove(folder)
    n_shards = max(1, math.ceil(len(table) / shard_rows))
    rows = max(1, math.ceil(len(table) / n_shards))
    for i in range(n_shards):
        run.write_table(posixpath.join(folder, shard_name(i)), table.slice(i * rows, rows))


def run_similarity(run: RunDir, cfg: SimilarityConfig) -> dict:
    """The stage: read embeddings, write ``similarity/neighbors`` shards and ``summary.json`` (with sibling recall)."""
    return execute(stages.SIMILARITY, run, Context(RunConfig(similarity=cfg), run.storage_options)).stats


def prepare_stage(ctx: Context) -> None:
    """As soon as Ray is up: CPU workers start loading the kernel (the stage itself waits for nothing here)."""
    try:
        warm_workers(ctx.config.similarity)
    except ValueError:  # a setting the stage itself will refuse, with its message, when it runs
        return


def remove_partials(run: RunDir) -> None:
    """Once the stage is committed, its checkpoint is scratch."""
    run.remove(PARTIALS_DIR)


def compute_stage(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): neighbor shards, edges, duplicates, summary."""
    cfg = ctx.config.similarity
    check_section("similarity", cfg)
    warming = warm_workers(cfg)
    source = ShardSource.open(run)
    x, ids = (source, None) if source is not None else _read_embeddings(run)
    try:
        table, summary, edge_table = compute_similarity_edges(x, ids, cfg, run=run)
    except EdgeCapError as exc:
        raise ValueError(f"similarity: {exc}") from None
    ray.get(warming)  # long done; a warm-up that failed says so here
    _write_shards(run, NEIGHBORS_DIR, table, SHARD_ROWS)
    _write_shards(run, EDGES_DIR, edge_table, EDGE_SHARD_ROWS)
    summary["duplicates"] = None
    run.remove(DUPLICATES_DIR)  # a rerun without duplicates leaves none of an earlier run's behind
    if cfg.edge_threshold is not None and cfg.duplicate_thresholds:
        sorted_ids = table.column("image_id").to_numpy()
        summary["duplicates"] = write_duplicates(
            run,
            sorted_ids,
            np.searchsorted(sorted_ids, edge_table.column("i").to_numpy()),
            np.searchsorted(sorted_ids, edge_table.column("j").to_numpy()),
            edge_table.column("sim").to_numpy(),
            cfg.duplicate_thresholds,
            cfg.keep,
        )
    recall, why_not = sibling_recall_from_run(run, cfg.top_k)
    summary.update(sibling_recall=recall, sibling_recall_not_measured=why_not)
    if recall is None:
        log.info("similarity: sibling recall not measured (%s)", why_not)
    else:
        log.info(
            "similarity: sibling recall@1 %.3f, @%d %.3f over %d images with a clip sibling",
            recall["at_1"],
            recall["k"],
            recall["at_k"],
            recall["n_eligible"],
        )
    run.write_json(SUMMARY, summary)
    return summary


def check_similarity(run: RunDir) -> tuple[dict, list[str]]:
    """One neighbor row per embedding, no id twice, finite similarities, neighbors among the embedded ids."""
    embedded = np.sort(ids_of(run, EMBEDDINGS_DIR))
    rows = nan = stray = 0
    for path in run.shards(NEIGHBORS_DIR).values():
        table = run.read_table(path, columns=["max_sim", "nn_ids", "nn_sims"])
        rows += table.num_rows
        for name in ("max_sim", "nn_sims"):
            values = float_values(table[name])
            nan += int(np.count_nonzero(np.isnan(values)))
        nn = table["nn_ids"].combine_chunks().flatten().fill_null(-1).to_numpy(zero_copy_only=False)
        nn = nn[nn >= 0]
        stray += int(np.count_nonzero(~np.isin(nn, embedded)))
    ids = np.sort(ids_of(run, NEIGHBORS_DIR))
    dup = count_duplicates(ids)
    problems = []
    if rows != len(embedded) or not np.array_equal(np.unique(ids), embedded):
        problems.append(f"{rows} neighbor rows for {len(embedded)} embeddings (or other image_ids)")
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if nan:
        problems.append(f"{nan} NaN similarities")
    if stray:
        problems.append(f"{stray} neighbor ids that are not embedded images")
    summary_path = SIMILARITY_SUMMARY
    summary = run.read_json(summary_path) if run.exists(summary_path) else {}
    if summary.get("n_images") != rows:
        problems.append(f"summary.json counts {summary.get('n_images')} images, the neighbor shards {rows}")
    return {"rows": rows, "embeddings": int(len(embedded)), "duplicate_ids": dup, "nan": nan}, problems
