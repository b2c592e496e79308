"""The select stage's coverage rules (``--mode coverage`` / ``herding``) and the duplicate guard for every rule.

The rules themselves live in ``coverage.py``; this module runs them for a stage run: delta (given, or
ProbCover's purity rule, recorded with how it was chosen), the exact neighbor graph above delta
(capped by ``max_edges``), one ranking per distinct seed list, and then the same constraints the
greedy rules honour, applied to the finished order:

- caps per clip / patient: walking the ranking, an image whose clip (or patient) already holds the
  limit is deferred; once every remaining image is deferred the caps are lifted and the deferred ones
  follow in ranking order (the semantics of ``rules.py``);
- label balance: each next image comes from the label with the fewest chosen so far (seeds
  included), the first such image in ranking order;
- the duplicate guard (``duplicate_threshold``): no second member of a near-duplicate group (pairs
  above the threshold, exact, connected components) before every group has one.

Seeds stay first and in their order. Rankings take seconds (O(edges)), so they are not checkpointed.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..config import SelectConfig
from ..schema import EDGES_DIR
from .coverage import (
    choose_delta,
    coverage_ranking,
    duplicate_groups,
    duplicate_guard,
    graph_from_pairs,
    herding_ranking,
    neighbor_graph,
)
from .greedy import Ranking
from .inputs import EdgeList
from .rules import Rules

log = logging.getLogger("enrich_dist.selection")

COVER_MODES = ("coverage", "herding")


def permute(ranking: Ranking, positions: np.ndarray) -> Ranking:
    """The ranking with its entries taken in ``positions`` order (each row keeps its round and score)."""
    return Ranking(ranking.order[positions], ranking.round[positions], ranking.score[positions])


def constrained_positions(order: np.ndarray, n_seeds: int, rules: Rules) -> np.ndarray:
    """Positions into ``order`` that honour ``rules`` (caps, label balance), seeds first; identity without rules."""
    n = len(order)
    if not rules.constrained:
        return np.arange(n)
    rules.add(order[:n_seeds])
    out = list(range(n_seeds))
    groups = rules.groups[order]
    # per label, its positions in ranking order; a cursor per label, deferred (capped) positions per label
    queues = [np.flatnonzero(groups == g) for g in range(rules.n_groups)]
    queues = [q[q >= n_seeds] for q in queues]
    cursor = [0] * rules.n_groups
    deferred: list[list[int]] = [[] for _ in range(rules.n_groups)]
    remaining = n - n_seeds
    while remaining:
        open_groups = [g for g in range(rules.n_groups) if cursor[g] < len(queues[g]) or deferred[g]]
        order_groups = sorted(open_groups, key=lambda g: (rules.counts[g], g)) if rules.balance else open_groups
        picked = None
        for g in order_groups:
            while cursor[g] < len(queues[g]):
                pos = int(queues[g][cursor[g]])
                cursor[g] += 1
                if rules.allows(int(order[pos])):
                    picked = pos
                    break
                deferred[g].append(pos)
            if picked is not None:
                break
        if picked is None:  # every remaining image is capped: lift the caps, deferred ones follow in order
            rules.lift()
            for g in range(rules.n_groups):
                queues[g] = np.asarray(sorted(deferred[g]) + queues[g][cursor[g]:].tolist(), dtype=np.int64)
                cursor[g], deferred[g] = 0, []
            continue
        out.append(picked)
        rules.add(np.asarray([order[picked]]))
        remaining -= 1
    return np.asarray(out, dtype=np.int64)


def _from_edges(x: np.ndarray, edges: EdgeList | None, t: float, max_edges: int):
    """The exact graph above ``t`` from the similarity stage's edge list, or None when the list cannot give it."""
    if edges is None:
        return None
    return graph_from_pairs(x, edges.a, edges.b, edges.threshold, t, max_edges)


def guard_groups(x: np.ndarray, cfg: SelectConfig, edges: EdgeList | None = None) -> np.ndarray | None:
    """Near-duplicate group per row (pairs above ``cfg.duplicate_threshold``), or None when the guard is off.

    The pairs come from the similarity stage's edge list when its threshold lies below the guard's
    (with room for float32 rounding), else from a blocked pass over the embeddings.
    """
    if cfg.duplicate_threshold is None:
        return None
    start = time.perf_counter()
    graph = _from_edges(x, edges, cfg.duplicate_threshold, cfg.max_edges)
    groups = duplicate_groups(x if graph is None else graph, cfg.duplicate_threshold)
    n_groups = len(np.unique(groups))
    log.info(
        "duplicate guard: %d groups of near-duplicates (similarity > %.2f) among %d images, %.1f s (%s)",
        n_groups, cfg.duplicate_threshold, len(x), time.perf_counter() - start,
        "pass over the embeddings" if graph is None else "from similarity/edges",
    )
    return groups


def finish(ranking: Ranking, n_seeds: int, rules: Rules, groups: np.ndarray | None) -> Ranking:
    """Apply the duplicate guard (when on), then caps and balance, to a finished ranking."""
    if groups is not None:
        ranking = permute(ranking, _positions_of(ranking.order, duplicate_guard(ranking.order, groups, n_seeds)))
    return permute(ranking, constrained_positions(ranking.order, n_seeds, rules))


def _positions_of(order: np.ndarray, new_order: np.ndarray) -> np.ndarray:
    """Positions p with order[p] == new_order (both permutations of the same rows)."""
    where = np.empty(int(order.max()) + 1 if len(order) else 0, dtype=np.int64)
    where[order] = np.arange(len(order))
    return where[new_order]


def cover_graph(x: np.ndarray, cfg: SelectConfig, edges: EdgeList | None = None):
    """(graph above delta, delta record): delta from the config or ProbCover's purity rule.

    The graph comes from the similarity stage's edge list when it holds every pair above delta.
    """
    start = time.perf_counter()
    if cfg.delta is not None:
        delta, record = float(cfg.delta), {"delta": float(cfg.delta), "how": "given (--delta)"}
    else:
        delta, info = choose_delta(x, seed=cfg.seed)
        record = {"delta": float(delta), **{k: v for k, v in info.items() if k != "delta"}}
    try:
        graph = _from_edges(x, edges, delta, cfg.max_edges)
        record["graph_from"] = EDGES_DIR
        if graph is None:
            graph = neighbor_graph(x, delta, max_edges=cfg.max_edges)
            record["graph_from"] = "a pass over the embeddings"
    except ValueError as exc:
        raise ValueError(f"select --mode {cfg.mode}: {exc} (options --delta, --max-edges)") from None
    record.update(edges=int(graph.nnz), seconds=round(time.perf_counter() - start, 3))
    log.info(
        "%s: delta %.3f (%s), %d neighbor pairs, mean ball %.1f images, %.1f s",
        cfg.mode, delta, record.get("how"), graph.nnz // 2, 1 + graph.nnz / max(1, len(x)), record["seconds"],
    )
    return graph, record


def _rank_one(graph, n: int, seed_rows: np.ndarray, mode: str, rules_args: dict, groups) -> tuple[Ranking, float]:
    start = time.perf_counter()
    rule = coverage_ranking if mode == "coverage" else herding_ranking
    return finish(rule(graph, n, seed_rows), len(seed_rows), Rules(**rules_args), groups), time.perf_counter() - start


def rank_covering(
    x: np.ndarray, seeds: list[np.ndarray], cfg: SelectConfig, rules_args: dict, edges: EdgeList | None = None
) -> tuple[list[Ranking], list[float], dict]:
    """One coverage/herding ranking per replicate (shared when seeds are shared), constrained; plus the delta record.

    With a Ray attached and more than one distinct seed set, the replicates rank in parallel Ray tasks that
    share the graph through the object store (put once); the rankings are those of the serial loop.
    """
    graph, record = cover_graph(x, cfg, edges)
    groups = guard_groups(x, cfg, edges)
    distinct = list(dict.fromkeys(s.tobytes() for s in seeds))
    first = {key: next(s for s in seeds if s.tobytes() == key) for key in distinct}
    done: dict[bytes, tuple[Ranking, float]] = {}
    if len(distinct) > 1 and _ray_ready():
        import ray

        task = ray.remote(num_cpus=1)(_rank_one)
        shared = ray.put(graph)
        refs = {key: task.remote(shared, len(x), first[key], cfg.mode, rules_args, groups) for key in distinct}
        done = dict(zip(refs, ray.get(list(refs.values())), strict=True))
        record["parallel_replicates"] = len(distinct)
    else:
        for key in distinct:
            done[key] = _rank_one(graph, len(x), first[key], cfg.mode, rules_args, groups)
    rankings, seconds = [], []
    for r, seed_rows in enumerate(seeds):
        ranking, took = done[seed_rows.tobytes()]
        rankings.append(ranking)
        seconds.append(took)
        log.info("replicate %d ranked %d images (%s) in %.2f s", r, len(x), cfg.mode, took)
    return rankings, seconds, record


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()
