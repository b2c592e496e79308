"""The select stage: rank every embedded image per replicate and report the coverage of budget prefixes.

Replicate ``r`` draws its seed set with ``np.random.default_rng([seed, r])`` and lists the seeds first
in that generator's random order, so a budget smaller than the seed set is still a uniform sample.
With ``seed_ids`` every replicate starts from that file's images in file order; the ranking is then
the same for every replicate (ties go to the lower image id, balance turns by label order), so it is
computed once and written for each. The random baseline shares the seeds, then takes every other
image in a seeded random order, per replicate; it is written to ``selection/random_ranking.parquet``
(the ``RANKING`` schema, null scores) so later stages train on exactly the subsets counted here. A
budget given as a count is reported as the fraction count / N.

Up to ``LOCAL_FLOATS`` embedding values the rankings run as Ray tasks, one replicate each, on a
shared copy of the embeddings; above it (or with ``workers``) shard actors hold the candidates and
replicates run one after another. A replicate's progress is checkpointed under
``selection/checkpoints/`` and a rerun resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa
import ray
from threadpoolctl import threadpool_limits

from .. import stages
from ..config import RunConfig, SelectConfig, check_section, parse_size, resolve_size
from ..executor import Context, execute
from ..invariants import count_duplicates, ids_of
from ..pairgraph import float32_below, removal
from ..runtime import as_completed, cluster_resources
from ..schema import (
    EDGES_DIR,
    EMBEDDINGS_DIR,
    RANDOM_RANKING_PATH,
    RANKED_REMOVAL_DIR,
    RANKING,
    RANKING_PATH,
    REMOVE_SCHEMA,
    SELECTION_DIR,
    SELECTION_STATS,
    SIMILARITY_DIR,
    SIMILARITY_SUMMARY,
    SUBSETS,
    SUBSETS_PATH,
    threshold_folder,
)
from ..storage import RunDir
from .actors import start_actors
from .cells import CELLS_MODE, cell_count, cells_in_flight, make_cells, rank_by_cells, vectors_of
from .checkpoint import CHECKPOINT_DIR, Checkpoint
from .covering import COVER_MODES, finish, guard_groups, rank_covering
from .greedy import DEFAULT_POOL, Ranking, Settings, State, choose_seeds, rank
from .inputs import (
    Part,
    codes,
    edge_list,
    embedding_ids,
    neighbor_parts,
    read_manifest,
    read_neighbors,
    read_seed_ids,
    read_vectors,
    scope_ids,
)
from .repeats import redundancy_concentration, repeat_measure
from .rules import Rules
from .shard import CandidateState, Shard, vectors_checksum

log = logging.getLogger("enrich_dist.selection")

STATS_PATH = SELECTION_STATS
LOCAL_FLOATS = 2e8
BOUND_MIN_CELLS = 64  # cell bounds only for archives of at least this many cells
LARGE_RANKING = 1_000_000  # above this a complete ranking takes hours on a few CPUs: the log says so


@dataclasses.dataclass
class _Job:
    """One ranking to compute: its seeds, the replicates that share it and its checkpoint."""

    seeds: np.ndarray
    replicates: list[int]
    checkpoint: Checkpoint


@ray.remote
def _rank_task(
    shard: Shard, n: int, seeds: np.ndarray, settings: Settings, rules_args: dict, checkpoint: Checkpoint
) -> tuple[Ranking, float]:
    """One replicate's ranking in one process, and the seconds it took."""
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    start = time.perf_counter()
    with threadpool_limits(limits=threads):
        ranking = rank(shard, n, seeds, settings, Rules(**rules_args), checkpoint)
    _log_products(*shard.products())
    return ranking, time.perf_counter() - start


def run_select(run: RunDir, cfg: SelectConfig) -> dict:
    """Write ``selection/`` (rankings, subset coverage, stats) for ``cfg``; skip if already done."""
    return execute(stages.SELECT, run, Context(RunConfig(select=cfg), run.storage_options)).stats


def compute_selection(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): rankings, random baselines, subsets, stats."""
    cfg = ctx.config.select
    check_section("select", cfg)
    started = time.perf_counter()
    parts, ids, dim = embedding_ids(run, cfg.scope)
    n = len(ids)
    manifest_all, manifest = read_manifest(run, ids)
    groups = {name: codes(manifest, name) for name in ("patient_id", "clip_id", "label")}
    fixed = read_seed_ids(cfg.seed_ids, run.storage_options, manifest_all, ids) if cfg.seed_ids else None
    seed_size, batch_size, budgets = _resolve_sizes(cfg, n, None if fixed is None else len(fixed))
    covering = cfg.mode in COVER_MODES
    by_cells = cfg.mode == CELLS_MODE
    settings = Settings("batch" if cfg.mode == "batch" else "exact", cfg.aggregate, batch_size if cfg.mode == "batch" else 1)
    rules_args = _rules_args(cfg, groups, n)
    workers = 0 if covering or by_cells else _workers(cfg, n, dim)
    device = _device(cfg)
    lists = neighbor_parts(run, n) if cfg.aggregate == "max" and not (covering or by_cells) else None
    log.info(
        "selecting: %d images, dim %d, mode %s, aggregate %s, %d seeds%s, %d replicates, %s",
        n,
        dim,
        cfg.mode,
        cfg.aggregate,
        seed_size,
        f" from {cfg.seed_ids}" if fixed is not None else "",
        cfg.replicates,
        f"cells of about {cfg.cell_size} images" if by_cells else
        f"{workers} shard actors" if workers else "one process per replicate",
    )
    if device is not None:
        log.info("selecting: the rankings' products run on %s (exact float32 GEMMs, decisive entries rechecked)", device)

    if cfg.mode in ("exact", "batch") and n > LARGE_RANKING:
        log.warning(
            "a complete %s ranking of %d images folds every pick into every candidate: about %.1e similarity "
            "products per replicate, growing as N^2; --mode cells ranks within k-means cells instead (about %.1e)%s",
            cfg.mode, n, n * (n - 1) / 2, n * cfg.cell_size / 2,
            "; this cluster has GPUs: --select-device cuda computes the products there"
            if device is None and cluster_resources().gpus else "",
        )
    seeds, randoms = [], []
    for r in range(cfg.replicates):
        rng = np.random.default_rng([cfg.seed, r])
        seed_rows = fixed if fixed is not None else rng.permutation(choose_seeds(n, seed_size, rng))
        seeds.append(seed_rows)
        randoms.append(_random_ranking(n, seed_rows, rng))
    cover = cells_record = None
    if by_cells:
        rankings, seconds, cells_record = _rank_in_cells(run, parts, ids, dim, seeds, cfg)
        pruning = False
    elif covering:
        rankings, seconds, cover = rank_covering(
            read_vectors(run, parts, ids), seeds, cfg, rules_args, edge_list(run, ids)
        )
        pruning = False
    elif workers:
        rankings, seconds, pruning = _rank_with_actors(
            run, parts, ids, dim, workers, lists, seeds, settings, rules_args, cfg, device
        )
    else:
        rankings, seconds, pruning = _rank_in_tasks(
            run, parts, ids, lists, seeds, settings, rules_args, cfg, device
        )
    if cfg.duplicate_threshold is not None and not covering:
        with vectors_of(run, parts, ids, dim) as x:  # mapped from a file above 1 GiB: the driver never holds N x d
            guard = guard_groups(x, cfg, edge_list(run, ids))
        no_rules = Rules(n)
        rankings = [finish(r, int(r.is_seed.sum()), no_rules, guard) for r in rankings]

    run.write_table(RANKING_PATH, _ranking_table(rankings, ids))
    run.write_table(RANDOM_RANKING_PATH, _ranking_table(randoms, ids))
    # near-duplicates to drop when labelling follows the ranking: keep whichever the first replicate ranks first
    ranked_removal = write_ranked_removal(run, ids, rankings[0].order, RANKED_REMOVAL_DIR)
    measure, repeat_flags = repeat_measure(run, ids, groups["clip_id"][0])
    run.write_table(
        SUBSETS_PATH, _subsets_table({"enrich": rankings, "random": randoms}, budgets, groups, repeat_flags)
    )
    stats = {
        "config": {**dataclasses.asdict(cfg), "budgets": list(cfg.budgets)},
        "n_images": n,
        "dim": dim,
        "seed_size": seed_size,
        "batch_size": batch_size if cfg.mode == "batch" else 1,
        "budgets": [{"budget": b, "n_images": k} for b, k in budgets],
        "workers": workers,
        "pruning": pruning,
        "coverage": cover,
        "cells": cells_record,
        "remove_by_ranking": ranked_removal,
        "repeats_measured_by": measure,
        "redundancy_concentration": redundancy_concentration(run, ids, groups["clip_id"][0]),
        "replicate_seconds": seconds,
        "seconds": time.perf_counter() - started,
    }
    run.write_json(STATS_PATH, stats)
    run.remove(CHECKPOINT_DIR)
    log.info("selection written to %s in %.1f s", run.uri_of(SELECTION_DIR), stats["seconds"])
    return stats


def _device(cfg: SelectConfig) -> str | None:
    """Where the rankings' fold runs: None on the CPU (numpy), ``cuda`` where the cluster has GPUs."""
    if cfg.device == "cpu":
        return None
    if cluster_resources().gpus == 0:
        raise ValueError("select device cuda asked for, but the Ray cluster has no GPU: use --select-device cpu")
    return cfg.device


def _workers(cfg: SelectConfig, n: int, dim: int) -> int:
    """Shard actors to use: 0 (one process per replicate) or more, never more than rows."""
    if cfg.workers is not None:
        return min(cfg.workers, n)
    if n * dim <= LOCAL_FLOATS:
        return 0
    return min(n, max(2, cluster_resources().cpus))


def _rules_args(cfg: SelectConfig, groups: dict, n: int) -> dict:
    """Keyword arguments of :class:`~.rules.Rules` for ``cfg`` (a fresh Rules per ranking)."""
    caps = []
    for name, column in (("max_per_clip", "clip_id"), ("max_per_patient", "patient_id")):
        limit = getattr(cfg, name)
        if limit is None:
            continue
        if not groups[column][1]:
            log.warning("select %s: the manifest has no %s values, so the cap has no effect", name, column)
            continue
        caps.append((groups[column][0], limit))
    label_groups = None
    if cfg.balance_labels:
        label_codes, names = groups["label"]
        if not names:
            raise ValueError("select balance_labels needs labels: the manifest has no label values")
        label_groups = np.where(label_codes >= 0, label_codes, len(names))
    return {"n": n, "groups": label_groups, "caps": caps}


def _jobs(
    run: RunDir, ids: np.ndarray, seeds: list[np.ndarray], fingerprint: dict, cfg: SelectConfig
) -> list[_Job]:
    """One job per distinct seed list (replicates sharing seeds share the ranking)."""
    jobs: dict[bytes, _Job] = {}
    for r, seed_rows in enumerate(seeds):
        key = seed_rows.tobytes()
        if key in jobs:
            jobs[key].replicates.append(r)
            continue
        digest = hashlib.sha256(seed_rows.astype(np.int64).tobytes()).hexdigest()[:16]
        checkpoint = Checkpoint(run, r, ids, {**fingerprint, "seeds": digest}, cfg.checkpoint_seconds)
        jobs[key] = _Job(seed_rows, [r], checkpoint)
    return list(jobs.values())


def _fingerprint(settings: Settings, cfg: SelectConfig, n: int, dim: int, checksum: int) -> dict:
    """What a checkpoint must match to be resumed."""
    return {
        "mode": settings.mode,
        "aggregate": settings.aggregate,
        "batch_size": settings.batch_size,
        "max_per_clip": cfg.max_per_clip,
        "max_per_patient": cfg.max_per_patient,
        "balance_labels": cfg.balance_labels,
        "n": n,
        "dim": dim,
        "embeddings": checksum,
    }


def _spread(
    jobs: list[_Job], rankings: dict[int, Ranking], seconds: dict[int, float], n_replicates: int
) -> tuple:
    """Per replicate, its job's ranking and (for the replicate that computed it) the seconds."""
    out_rankings: list[Ranking] = [None] * n_replicates  # type: ignore[list-item]
    out_seconds = [0.0] * n_replicates
    for j, job in enumerate(jobs):
        for r in job.replicates:
            out_rankings[r] = rankings[j]
        out_seconds[job.replicates[0]] = seconds[j]
    return out_rankings, out_seconds


def _rank_in_tasks(
    run: RunDir,
    parts: list[Part],
    ids: np.ndarray,
    lists: list[Part] | None,
    seeds: list[np.ndarray],
    settings: Settings,
    rules_args: dict,
    cfg: SelectConfig,
    device: str | None = None,
) -> tuple[list[Ranking], list[float], bool]:
    """Every distinct ranking as a Ray task over one shared in-memory shard (each task a GPU with ``device``)."""
    n = len(ids)
    x = read_vectors(run, parts, ids)
    probe = Rules(**rules_args)
    shard = Shard(
        np.arange(n), x, settings.aggregate, probe.groups if probe.balance else None, probe.n_groups, device
    )
    pruning = False
    if lists is not None:
        nn = read_neighbors(run, lists, ids, ids)
        pruning = nn is not None and shard.enable_pruning(*nn, shard.max_norm, n)
        _log_pruning(pruning, nn is not None)
    fingerprint = _fingerprint(settings, cfg, n, x.shape[1], shard.checksum())
    jobs = _jobs(run, ids, seeds, fingerprint, cfg)
    cpus = max(1, cluster_resources().cpus)
    if _bounded(cfg, settings, n, device):
        started = time.perf_counter()
        cells = shard.enable_bounds(cfg.bound_cells, cfg.seed, cpus)
        log.info("cell bounds: %d cells of about %d images in %.1f s", cells, cfg.bound_cells, time.perf_counter() - started)
    per_task = max(1, cpus // len(jobs))
    shard_ref = ray.put(shard)
    refs = [
        _rank_task.options(num_cpus=per_task, num_gpus=_gpus_each(device, len(jobs))).remote(
            shard_ref, n, job.seeds, settings, rules_args, job.checkpoint
        )
        for job in jobs
    ]
    rankings, seconds = {}, {}
    for j, (ranking, took) in as_completed(refs, "selection replicates", log):
        rankings[j], seconds[j] = ranking, took
        log.info("replicate %d ranked %d images in %.2f s", jobs[j].replicates[0], n, took)
    return (*_spread(jobs, rankings, seconds, len(seeds)), pruning)


def _rank_with_actors(
    run: RunDir,
    parts: list[Part],
    ids: np.ndarray,
    dim: int,
    workers: int,
    lists: list[Part] | None,
    seeds: list[np.ndarray],
    settings: Settings,
    rules_args: dict,
    cfg: SelectConfig,
    device: str | None = None,
) -> tuple[list[Ranking], list[float], bool]:
    """Every distinct ranking in turn over shard actors that read their own rows (on GPUs with ``device``)."""
    n = len(ids)
    probe = Rules(**rules_args)
    groups = probe.groups if probe.balance else None
    store, pruning, checksum = start_actors(
        run, parts, ids, workers, settings.aggregate, groups, probe.n_groups, lists,
        device, _gpus_each(device, workers),
    )
    try:
        if lists is not None:
            _log_pruning(pruning, True)
        if _bounded(cfg, settings, n, device):
            started = time.perf_counter()
            cells = store.enable_bounds(cfg.bound_cells, cfg.seed)
            log.info(
                "cell bounds: %d cells of about %d images over %d shards in %.1f s",
                cells, cfg.bound_cells, workers, time.perf_counter() - started,
            )
        jobs = _jobs(run, ids, seeds, _fingerprint(settings, cfg, n, dim, checksum), cfg)
        rankings, seconds = {}, {}
        for j, job in enumerate(jobs):
            start = time.perf_counter()
            rankings[j] = rank(store, n, job.seeds, settings, Rules(**rules_args), job.checkpoint)
            seconds[j] = time.perf_counter() - start
            _log_products(*store.products())
            log.info("replicate %d ranked %d images in %.2f s", job.replicates[0], n, seconds[j])
    finally:
        store.close()
    return (*_spread(jobs, rankings, seconds, len(seeds)), pruning)


def _gpus_each(device: str | None, tasks: int) -> float:
    """GPUs per ranking task or shard actor: a share of the cluster's, at most one each."""
    if device is None:
        return 0
    return min(1.0, cluster_resources().gpus / max(1, tasks))


def _rank_in_cells(
    run: RunDir, parts: list[Part], ids: np.ndarray, dim: int, seeds: list[np.ndarray], cfg: SelectConfig
) -> tuple[list[Ranking], list[float], dict]:
    """Every distinct ranking by farthest-first within k-means cells (``cells.py``); and the cells' record.

    Each finished ranking is checkpointed, so a rerun after a failure redoes only the rankings not finished.
    """
    n = len(ids)
    with vectors_of(run, parts, ids, dim) as x:
        fingerprint = {
            "mode": CELLS_MODE, "cell_size": cfg.cell_size, "seed": cfg.seed, "n": n, "dim": dim,
            "embeddings": vectors_checksum(np.arange(n), x),
        }
        jobs = _jobs(run, ids, seeds, fingerprint, cfg)
        saved = {j: job.checkpoint.load() for j, job in enumerate(jobs)}
        rankings = {j: state.ranking for j, state in saved.items() if state is not None and len(state.ranking.order) == n}
        seconds = dict.fromkeys(rankings, 0.0)
        for j in rankings:
            log.info("replicate %d: ranking resumed whole from its checkpoint", jobs[j].replicates[0])
        start = time.perf_counter()
        cells = make_cells(x, cell_count(n, cfg.cell_size), cfg.seed, max(1, cluster_resources().cpus))
        kmeans_seconds = time.perf_counter() - start
        sizes = np.diff(cells.bounds)
        log.info(
            "cells mode: %d cells (sizes %d-%d, median %d) in %.1f s",
            cells.count, sizes.min(), sizes.max(), int(np.median(sizes)), kmeans_seconds,
        )
        products = float(np.sum(sizes.astype(np.float64) ** 2) / 2)
        for j, job in enumerate(jobs):
            if j in rankings:
                continue
            rankings[j], cost = rank_by_cells(x, cells, job.seeds, DEFAULT_POOL, cells_in_flight())
            seconds[j] = cost["seconds"]
            job.checkpoint.save(State(rankings[j], CandidateState(np.empty(0, np.int64), np.empty(0, np.float32), None), False))
            log.info("replicate %d ranked %d images (cells) in %.2f s", job.replicates[0], n, seconds[j])
    record = {
        "n_cells": int(cells.count),
        "cell_size": cfg.cell_size,
        "largest_cell": int(sizes.max()),
        "kmeans_seconds": kmeans_seconds,
        "products_per_replicate": products,
        "products_complete": n * (n - 1) / 2,
    }
    return (*_spread(jobs, rankings, seconds, len(seeds)), record)


def _bounded(cfg: SelectConfig, settings: Settings, n: int, device: str | None) -> bool:
    """Whether folds skip cells by their bounds: max scores on the host, with enough images for many cells."""
    return (
        cfg.bound_cells > 0 and settings.aggregate == "max" and device is None
        and n >= BOUND_MIN_CELLS * cfg.bound_cells
    )


def _log_products(computed: int, skipped: int) -> None:
    """Log the folds' products and the share the cell bounds skipped (nothing without bounds)."""
    if skipped:
        log.info(
            "folds computed %d products; cell bounds skipped %d (%.1f %%)",
            computed, skipped, 100.0 * skipped / (computed + skipped),
        )


def _log_pruning(pruning: bool, readable: bool) -> None:
    """Say whether the similarity stage's top-k lists prune the updates."""
    if pruning:
        log.info("pruning updates with the similarity stage's top-k lists")
    elif readable:
        log.warning("the similarity stage's top-k lists do not match the embeddings (stale?): no pruning")


def _resolve_sizes(
    cfg: SelectConfig, n: int, seed_count: int | None
) -> tuple[int, int, list[tuple[float, int]]]:
    """Seed count, batch count and (budget fraction, image count) pairs, validated against ``n``."""
    if seed_count is None:
        seed_size = _count("seed_size", cfg.seed_size, n)
        if n > 1 and seed_size >= n:
            raise ValueError(
                f"select seed_size {cfg.seed_size!r} gives {seed_size} seeds; it must be < {n} images"
            )
    else:
        seed_size = seed_count
    batch_size = _count("batch_size", cfg.batch_size, n)
    budgets = []
    for value in cfg.budgets:
        count = _count("budget", value, n)
        fraction = parse_size(value)
        budgets.append((float(fraction) if isinstance(fraction, float) else count / n, count))
        if count < seed_size:
            log.warning(
                "budget %r (%d images) is below the seed size %d: its subsets are seeds only",
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


def _first_seen(codes_: np.ndarray) -> np.ndarray:
    """Cumulative count of distinct non-negative codes along ``codes_``."""
    first = np.zeros(len(codes_), dtype=np.int64)
    valid = np.flatnonzero(codes_ >= 0)
    _, at = np.unique(codes_[valid], return_index=True)
    first[valid[at]] = 1
    return np.cumsum(first)


def _subsets_table(
    rankings: dict[str, list[Ranking]],
    budgets: list[tuple[float, int]],
    groups: dict[str, tuple[np.ndarray, list[str]]],
    repeat_flags=None,
) -> pa.Table:
    """Size, patients, clips, repeats (``repeat_flags``: order -> flags; null without) and per-label counts per prefix."""
    rows: dict[str, list] = {field.name: [] for field in SUBSETS}
    label_codes, label_names = groups["label"]
    for method, per_replicate in rankings.items():
        for r, ranking in enumerate(per_replicate):
            patients = _first_seen(groups["patient_id"][0][ranking.order])
            clips = _first_seen(groups["clip_id"][0][ranking.order])
            labels = label_codes[ranking.order]
            repeats = None if repeat_flags is None else np.cumsum(repeat_flags(ranking.order))
            for fraction, count in budgets:
                tally = np.bincount(labels[:count][labels[:count] >= 0], minlength=len(label_names))
                rows["method"].append(method)
                rows["replicate"].append(r)
                rows["budget"].append(fraction)
                rows["n_images"].append(count)
                rows["n_patients"].append(int(patients[count - 1]))
                rows["n_clips"].append(int(clips[count - 1]))
                rows["n_repeats"].append(None if repeats is None else int(repeats[count - 1]))
                rows["label_counts"].append(
                    sorted((name, int(c)) for name, c in zip(label_names, tally, strict=True) if c > 0)
                )
    return pa.table(rows, schema=SUBSETS)


def check_select(run: RunDir) -> tuple[dict, list[str]]:
    """Every replicate of each ranking is a permutation of the ranked ids, ranked 0..N-1; no NaN score.

    The ranked ids are the embedded ones, within ``incremental/scope.parquet`` in an incremental run.
    """
    embedded = np.sort(ids_of(run, EMBEDDINGS_DIR))
    # an incremental run ranks its labelled and new images only (the scope its selection recorded)
    scope = scope_ids(run, (run.read_json(SELECTION_STATS).get("config") or {}).get("scope"))
    if scope is not None:
        embedded = embedded[np.isin(embedded, scope)]
    problems, record = [], {"rows": int(len(embedded)), "duplicate_ids": 0, "nan": 0, "replicates": 0}
    for rel in (RANKING_PATH, RANDOM_RANKING_PATH):
        if not run.exists(rel):
            problems.append(f"{rel} is missing")
            continue
        table = run.read_table(rel, columns=["replicate", "rank", "image_id", "score"])
        replicate = table["replicate"].to_numpy()
        image_id, rank = table["image_id"].to_numpy(), table["rank"].to_numpy()
        scores = table["score"].fill_null(0.0).to_numpy(zero_copy_only=False)
        record["nan"] += int(np.count_nonzero(np.isnan(scores)))
        reps = np.unique(replicate)
        record["replicates"] = max(record["replicates"], len(reps))
        order = np.lexsort((image_id, replicate))
        for r in reps:
            mine = order[replicate[order] == r]
            got = image_id[mine]
            dup = count_duplicates(got)
            record["duplicate_ids"] += dup
            if dup or not np.array_equal(got, embedded):
                problems.append(
                    f"{rel} replicate {int(r)} is not a permutation of the {len(embedded)} embedded ids "
                    f"({len(got)} rows, {dup} duplicates)"
                )
            if not np.array_equal(np.sort(rank[mine]), np.arange(len(mine))):
                problems.append(f"{rel} replicate {int(r)} ranks are not 0..{len(mine) - 1}")
    if record["nan"]:
        problems.append(f"{record['nan']} NaN scores")
    return record, problems


def write_ranked_removal(run: RunDir, ids: np.ndarray, order: np.ndarray, folder: str) -> dict:
    """Per duplicate threshold of the similarity stage, ``FOLDER/t=….parquet``: drop lists keeping the first in ``order``.

    ``ids`` are the ranked images' ids (sorted), ``order`` a ranking of their positions. Returns
    {threshold: images dropped}; {} when the similarity stage wrote no duplicates or no complete edge list.
    """
    summary_path = SIMILARITY_SUMMARY
    if not run.is_done(SIMILARITY_DIR) or not run.exists(summary_path):
        return {}
    summary = run.read_json(summary_path)
    dups, edges = summary.get("duplicates"), summary.get("edges") or {}
    if not dups or not edges.get("complete") or not run.shards(EDGES_DIR):
        return {}
    table = run.read_table(EDGES_DIR, columns=["i", "j", "sim"])
    i, j, sims = (table[c].to_numpy() for c in ("i", "j", "sim"))
    inside = np.isin(i, ids) & np.isin(j, ids)  # an incremental run ranks only its new images
    a, b, sims = np.searchsorted(ids, i[inside]), np.searchsorted(ids, j[inside]), sims[inside]
    out = {}
    run.remove(folder)
    for key in sorted(dups.get("thresholds", {}), key=float):
        t = float(key)
        above = sims > float32_below(t)
        kept_of, kept_sim = removal(len(ids), a[above], b[above], sims[above], "ranking", order=order)
        drop = kept_of >= 0
        name = threshold_folder(t).split("/", 1)[1]
        run.write_table(
            posixpath.join(folder, f"{name}.parquet"),
            pa.table({"image_id": ids[drop], "kept_image_id": ids[kept_of[drop]], "sim": kept_sim[drop]},
                     schema=REMOVE_SCHEMA),
        )
        out[key] = int(drop.sum())
    return out
