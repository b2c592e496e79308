"""The select stage: rank every embedded image per replicate (Ray tasks) and report subset coverage.

Replicate ``r`` draws its seed set with ``np.random.default_rng([seed, r])`` and lists the seeds first
in that generator's random order, so a budget smaller than the seed set is still a uniform sample.
The random baseline shares those seeds, then takes every other image in a seeded random order: each
prefix is a uniform random subset, paired with the ENRICH subset of the same replicate. It is written
to ``selection/random_ranking.parquet`` (the ``RANKING`` schema, null scores) so later stages train
on exactly the subsets counted here. A budget given as a count is reported as the fraction count / N.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa
import ray

from ..config import SelectConfig, parse_size, resolve_size
from ..runtime import as_completed
from ..schema import EMBEDDINGS_DIR, MANIFEST_DIR, RANKING, SELECTION_DIR, SUBSETS
from ..storage import RunDir
from .greedy import AGGREGATES, Ranking, batch_greedy, choose_seeds, exact_greedy

log = logging.getLogger("enrich_dist.selection")

MODES = ("batch", "exact")
RANKING_PATH = posixpath.join(SELECTION_DIR, "ranking.parquet")
RANDOM_RANKING_PATH = posixpath.join(SELECTION_DIR, "random_ranking.parquet")
SUBSETS_PATH = posixpath.join(SELECTION_DIR, "subsets.parquet")
STATS_PATH = posixpath.join(SELECTION_DIR, "selection.json")


@ray.remote(num_cpus=1)
def _rank_replicate(x: np.ndarray, seeds: np.ndarray, mode: str, batch_size: int, aggregate: str) -> tuple:
    """One replicate's full ranking and the seconds it took."""
    start = time.perf_counter()
    if mode == "batch":
        ranking = batch_greedy(x, seeds, batch_size, aggregate)
    else:
        ranking = exact_greedy(x, seeds, aggregate)
    return ranking, time.perf_counter() - start


def run_select(run: RunDir, cfg: SelectConfig) -> dict:
    """Write ``selection/`` (rankings, subset coverage, stats) for ``cfg``; skip if already done."""
    if run.is_done(SELECTION_DIR):
        log.info("selection already done in %s; skipping", run.uri_of(SELECTION_DIR))
        return run.read_json(STATS_PATH)
    if cfg.mode not in MODES:
        raise ValueError(f"select mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.aggregate not in AGGREGATES:
        raise ValueError(f"select aggregate must be one of {AGGREGATES}, got {cfg.aggregate!r}")
    if cfg.replicates < 1:
        raise ValueError(f"select replicates must be >= 1, got {cfg.replicates}")
    started = time.perf_counter()
    ids, x = _load_embeddings(run)
    n = len(ids)
    seed_size, batch_size, budgets = _resolve_sizes(cfg, n)
    groups = _manifest_groups(run, ids)
    log.info(
        "selecting: %d images, dim %d, mode %s, aggregate %s, %d seeds, %d replicates",
        n,
        x.shape[1],
        cfg.mode,
        cfg.aggregate,
        seed_size,
        cfg.replicates,
    )

    seeds, randoms = [], []
    for r in range(cfg.replicates):
        rng = np.random.default_rng([cfg.seed, r])
        seed_rows = rng.permutation(choose_seeds(n, seed_size, rng))
        seeds.append(seed_rows)
        randoms.append(_random_ranking(n, seed_rows, rng))
    x_ref = ray.put(x)
    refs = [_rank_replicate.remote(x_ref, s, cfg.mode, batch_size, cfg.aggregate) for s in seeds]
    done: dict[int, tuple[Ranking, float]] = {}
    for r, (ranking, took) in as_completed(refs, "selection replicates", log):
        done[r] = (ranking, took)
        log.info("replicate %d ranked %d images in %.2f s", r, n, took)
    rankings = [done[r][0] for r in range(cfg.replicates)]
    seconds = [done[r][1] for r in range(cfg.replicates)]

    run.write_table(RANKING_PATH, _ranking_table(rankings, ids))
    run.write_table(RANDOM_RANKING_PATH, _ranking_table(randoms, ids))
    run.write_table(SUBSETS_PATH, _subsets_table({"enrich": rankings, "random": randoms}, budgets, groups))
    stats = {
        "config": {**dataclasses.asdict(cfg), "budgets": list(cfg.budgets)},
        "n_images": n,
        "dim": int(x.shape[1]),
        "seed_size": seed_size,
        "batch_size": batch_size if cfg.mode == "batch" else 1,
        "budgets": [{"budget": b, "n_images": k} for b, k in budgets],
        "replicate_seconds": seconds,
        "seconds": time.perf_counter() - started,
    }
    run.write_json(STATS_PATH, stats)
    run.mark_done(SELECTION_DIR, stats)
    log.info("selection written to %s in %.1f s", run.uri_of(SELECTION_DIR), stats["seconds"])
    return stats


def _load_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """Image ids (sorted) and their embedding rows as float32."""
    if not run.shards(EMBEDDINGS_DIR):
        raise FileNotFoundError(
            f"no embeddings in {run.uri_of(EMBEDDINGS_DIR)}: run `enrich embed --output {run.uri}` first"
        )
    table = run.read_table(EMBEDDINGS_DIR, columns=["image_id", "embedding"])
    ids = table["image_id"].to_numpy()
    column = table["embedding"].combine_chunks()
    dim = column.type.list_size
    x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(ids), dim)
    order = np.argsort(ids, kind="stable")
    ids, x = ids[order], x[order]
    if len(ids) == 0:
        raise ValueError(f"{run.uri_of(EMBEDDINGS_DIR)} holds no embeddings: rerun `enrich embed`")
    if np.any(ids[1:] == ids[:-1]):
        raise ValueError(f"{run.uri_of(EMBEDDINGS_DIR)} repeats image ids: rerun `enrich embed`")
    return ids, x


def _resolve_sizes(cfg: SelectConfig, n: int) -> tuple[int, int, list[tuple[float, int]]]:
    """Seed count, batch count and (budget fraction, image count) pairs, validated against ``n``."""
    seed_size = _count("seed_size", cfg.seed_size, n)
    if n > 1 and seed_size >= n:
        raise ValueError(
            f"select seed_size {cfg.seed_size!r} gives {seed_size} seeds; it must be < {n} images"
        )
    batch_size = _count("batch_size", cfg.batch_size, n)
    budgets = []
    for value in cfg.budgets:
        count = _count("budget", value, n)
        fraction = parse_size(value)
        budgets.append((float(fraction) if isinstance(fraction, float) else count / n, count))
        if count < seed_size:
            log.warning(
                "budget %r (%d images) is below the seed size %d: its subsets are random seeds",
                value,
                count,
                seed_size,
            )
    return seed_size, batch_size, budgets


def _count(name: str, value: object, n: int) -> int:
    """A size as a positive count of at most ``n`` images, or an error naming ``name`` and ``value``."""
    try:
        size = parse_size(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"select {name} {value!r}: {exc}") from None
    if isinstance(size, int) and not 1 <= size <= n:
        raise ValueError(f"select {name} {value!r}: a count must be in [1, {n}] (the number of images)")
    return resolve_size(size, n)


def _random_ranking(n: int, seed_rows: np.ndarray, rng: np.random.Generator) -> Ranking:
    """The random baseline: the same seeds, then every other row in a seeded random order."""
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), seed_rows)
    order = np.concatenate([seed_rows, rng.permutation(rest)])
    rounds = np.concatenate([np.zeros(len(seed_rows), np.int32), np.ones(len(rest), np.int32)])
    return Ranking(order, rounds, np.full(n, np.nan, dtype=np.float32))


def _ranking_table(rankings: list[Ranking], ids: np.ndarray) -> pa.Table:
    """Rankings of all replicates as a ``schema.RANKING`` table (null score for seeds and random picks)."""
    parts = []
    for r, ranking in enumerate(rankings):
        n = len(ranking.order)
        parts.append(
            pa.table(
                {
                    "replicate": pa.array(np.full(n, r, dtype=np.int32)),
                    "rank": pa.array(np.arange(n, dtype=np.int64)),
                    "image_id": pa.array(ids[ranking.order]),
                    "is_seed": pa.array(ranking.is_seed),
                    "round": pa.array(ranking.round),
                    "score": pa.array(ranking.score, mask=np.isnan(ranking.score)),
                },
                schema=RANKING,
            )
        )
    return pa.concat_tables(parts)


def _manifest_groups(run: RunDir, ids: np.ndarray) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per embedded row, codes of its patient, clip and label (-1 when null) and each code's name."""
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
    groups = {}
    for name in ("patient_id", "clip_id", "label"):
        if name not in table.column_names:
            groups[name] = (np.full(len(ids), -1, dtype=np.int64), [])
            continue
        encoded = table[name].cast(pa.string()).take(pa.array(rows)).combine_chunks().dictionary_encode()
        codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int64)
        groups[name] = (codes, encoded.dictionary.to_pylist())
    return groups


def _first_seen(codes: np.ndarray) -> np.ndarray:
    """Cumulative count of distinct non-negative codes along ``codes``."""
    first = np.zeros(len(codes), dtype=np.int64)
    valid = np.flatnonzero(codes >= 0)
    _, at = np.unique(codes[valid], return_index=True)
    first[valid[at]] = 1
    return np.cumsum(first)


def _subsets_table(
    rankings: dict[str, list[Ranking]],
    budgets: list[tuple[float, int]],
    groups: dict[str, tuple[np.ndarray, list[str]]],
) -> pa.Table:
    """Size, patients, clips and per-label counts of every ranking prefix at each budget."""
    rows: dict[str, list] = {field.name: [] for field in SUBSETS}
    label_codes, label_names = groups["label"]
    for method, per_replicate in rankings.items():
        for r, ranking in enumerate(per_replicate):
            patients = _first_seen(groups["patient_id"][0][ranking.order])
            clips = _first_seen(groups["clip_id"][0][ranking.order])
            labels = label_codes[ranking.order]
            for fraction, count in budgets:
                tally = np.bincount(labels[:count][labels[:count] >= 0], minlength=len(label_names))
                rows["method"].append(method)
                rows["replicate"].append(r)
                rows["budget"].append(fraction)
                rows["n_images"].append(count)
                rows["n_patients"].append(int(patients[count - 1]))
                rows["n_clips"].append(int(clips[count - 1]))
                rows["label_counts"].append(
                    sorted((name, int(c)) for name, c in zip(label_names, tally, strict=True) if c > 0)
                )
    return pa.table(rows, schema=SUBSETS)
