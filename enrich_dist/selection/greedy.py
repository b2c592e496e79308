"""Label-blind greedy selection: rank every image by how unlike the already-chosen set it is.

The driver loop (:func:`rank`) works on a candidate store: one :class:`~.shard.Shard` in this
process, or shards in Ray actors (``actors.py``). Each round it asks the store for the lowest
candidates, decides the picks here and sends them back to be folded into every score.

- ``batch`` (the paper): each round takes the ``batch_size`` lowest candidates by their scores at
  the start of the round (ties: lower row), then one update.
- ``exact``: farthest-first one image at a time. With max scores (which never fall) a pool of the
  lowest candidates is ranked exactly among themselves while each pick still precedes the best
  candidate outside the pool, then one update; the result equals the naive one-at-a-time loop for
  every pool size. Mean scores can fall, so ``mean`` takes one pick per round.

Caps and label balance (``rules.py``) apply in both modes. Similarities follow ``sims.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .rules import EXHAUSTED, MAYBE, NONE, YES, Rules
from .shard import AGGREGATES, CandidateState, Fetch, Shard
from .sims import error_scale, pool_sims

log = logging.getLogger("enrich_dist.selection")
PROGRESS_SECONDS = 60.0  # a long ranking logs how far it is this often

MODES = ("batch", "exact")
DEFAULT_POOL = 512
MIN_GROUP_POOL = 64


@dataclass(frozen=True)
class Ranking:
    """Rows in order of inclusion, the round each joined in (0 = seed) and its score then (NaN for seeds)."""

    order: np.ndarray
    round: np.ndarray
    score: np.ndarray

    @property
    def is_seed(self) -> np.ndarray:
        """Whether each ranked row is a seed."""
        return self.round == 0


@dataclass(frozen=True)
class Settings:
    """How one ranking is built."""

    mode: str = "exact"
    aggregate: str = "max"
    batch_size: int = 1
    pool: int = DEFAULT_POOL

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")


@dataclass
class State:
    """A ranking in progress: what is ranked so far, the candidates' state and whether caps still hold."""

    ranking: Ranking
    candidates: CandidateState
    capped: bool


class Store(Protocol):
    """Candidate store: a :class:`~.shard.Shard` or shards in Ray actors."""

    def start(
        self,
        rows: np.ndarray | None = ...,
        scores: np.ndarray | None = ...,
        sums: np.ndarray | None = ...,
        n_chosen: int = ...,
    ) -> None: ...

    def lowest(self, m: int, with_vectors: bool = ..., block: np.ndarray | None = ...) -> list[Fetch]: ...

    def lift(self) -> None: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...

    def update(self, rows: np.ndarray, vectors: np.ndarray) -> None: ...

    def state(self) -> CandidateState: ...


class Checkpointer(Protocol):
    """Where a ranking's progress is saved and resumed from (``checkpoint.py``)."""

    def load(self) -> State | None: ...

    def due(self) -> bool: ...

    def save(self, state: State) -> None: ...


class _Builder:
    """Accumulates a ranking: seeds first, then picks with their round and score."""

    def __init__(self, ranking: Ranking):
        self.order = [ranking.order.astype(np.int64)]
        self.round = [ranking.round.astype(np.int32)]
        self.score = [ranking.score.astype(np.float32)]
        self.size = len(ranking.order)
        self.last_round = int(ranking.round.max()) if len(ranking.round) else 0

    def add(self, rows: np.ndarray, round_: int | np.ndarray, scores: np.ndarray) -> None:
        """Append picked rows with their round (one for all, or one each) and scores."""
        self.order.append(np.asarray(rows, dtype=np.int64))
        self.round.append(np.broadcast_to(np.asarray(round_, dtype=np.int32), len(self.order[-1])))
        self.score.append(np.asarray(scores, dtype=np.float32))
        self.size += len(rows)
        self.last_round = int(self.round[-1].max())

    def build(self) -> Ranking:
        """The ranking so far as flat arrays."""
        return Ranking(np.concatenate(self.order), np.concatenate(self.round), np.concatenate(self.score))


def seed_ranking(seeds: np.ndarray) -> Ranking:
    """The ranking of the seeds alone (round 0, no scores)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    return Ranking(seeds, np.zeros(len(seeds), np.int32), np.full(len(seeds), np.nan, np.float32))


def check_seeds(seeds: np.ndarray, n: int) -> np.ndarray:
    """Seeds as int64 rows, or an error if empty, out of range or repeated."""
    seeds = np.asarray(seeds, dtype=np.int64).ravel()
    if len(seeds) == 0:
        raise ValueError("at least one seed row is needed")
    if seeds.min() < 0 or seeds.max() >= n or len(np.unique(seeds)) != len(seeds):
        raise ValueError(f"seed rows must be distinct indices in [0, {n})")
    return seeds


def rank(
    store: Store,
    n: int,
    seeds: np.ndarray,
    settings: Settings,
    rules: Rules | None = None,
    checkpoint: Checkpointer | None = None,
) -> Ranking:
    """Rank all ``n`` rows of ``store``: the seeds, then picks by ``settings`` under ``rules``."""
    seeds = check_seeds(seeds, n)
    rules = rules or Rules(n)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        store.start()
        builder = _Builder(seed_ranking(seeds))
        store.update(seeds, store.take(seeds))
        rules.add(seeds)
    else:
        if not np.array_equal(saved.ranking.order[: len(seeds)], seeds):
            raise ValueError("the checkpoint starts from other seeds")
        builder = _Builder(saved.ranking)
        store.start(saved.candidates.rows, saved.candidates.scores, saved.candidates.sums, builder.size)
        rules.add(builder.order[0])
        if not saved.capped:
            rules.lift()
        log.info("resuming a ranking at %d of %d images (round %d)", builder.size, n, builder.last_round)
    rounds, started = 0, time.perf_counter()
    reported = started
    complete = builder.size == n
    while builder.size < n:
        if settings.mode == "batch":
            rows, scores, vectors = _batch_round(store, rules, settings.batch_size)
            round_: int | np.ndarray = builder.last_round + 1
        else:
            rows, scores, vectors = _pool_round(store, rules, settings)
            round_ = np.arange(builder.last_round + 1, builder.last_round + 1 + len(rows))
        if len(rows) == 0:
            if not rules.capped:
                raise RuntimeError("no candidate left to pick although the ranking is incomplete")
            log.info("caps exhausted after %d images: ranking the remaining ones without caps", builder.size)
            rules.lift()
            store.lift()
            continue
        store.update(rows, vectors)
        builder.add(rows, round_, scores)
        rounds += 1
        if time.perf_counter() - reported >= PROGRESS_SECONDS:
            reported = time.perf_counter()
            log.info("ranked %d of %d images (%.1f %%) in %.0f s", builder.size, n, 100.0 * builder.size / n, reported - started)
        if checkpoint is not None and builder.size < n and checkpoint.due():
            checkpoint.save(State(builder.build(), store.state(), rules.capped))
    ranking = builder.build()
    if checkpoint is not None and not complete:
        checkpoint.save(State(ranking, store.state(), rules.capped))
    log.debug("ranked %d images in %d rounds, %.2f s", n, rounds, time.perf_counter() - started)
    return ranking


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.float32), np.empty((0, 0), np.float32)


def _fetch(store: Store, rules: Rules, m: int, with_vectors: bool) -> list[Fetch]:
    """The store's ``m`` lowest eligible candidates per group, after passing on the rows the caps block."""
    fetches = store.lowest(m, with_vectors=with_vectors, block=rules.take_blocked())
    if len(fetches) != (rules.n_groups if rules.balance else 1):
        raise ValueError(f"the store has {len(fetches)} label groups, the rules {rules.n_groups}")
    return fetches


def _batch_round(store: Store, rules: Rules, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch round: up to ``batch_size`` picks by the scores at the round's start; rows, scores, vectors."""
    rows: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    picked = 0
    while picked < batch_size:
        fetches = _fetch(store, rules, batch_size - picked, False)
        if rules.constrained:
            new_rows, new_scores, outcome = _walk(fetches, rules, batch_size - picked)
        else:
            new_rows, new_scores = fetches[0].rows, fetches[0].scores
            outcome = EXHAUSTED if fetches[0].n_eligible == len(new_rows) else YES
            rules.add(new_rows)
        if len(new_rows):
            rows.append(new_rows)
            scores.append(new_scores)
            vectors.append(store.take(new_rows))
            picked += len(new_rows)
        if outcome == EXHAUSTED:
            break
    if not rows:
        return _empty()
    return np.concatenate(rows), np.concatenate(scores), np.concatenate(vectors)


def _walk(fetches: list[Fetch], rules: Rules, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Picks in rule order from fetched lists until ``limit``, a group needing a new fetch, or none left."""
    at = np.zeros(len(fetches), dtype=np.int64)
    status = np.zeros(len(fetches), dtype=np.int8)
    rows: list[int] = []
    scores: list[float] = []
    outcome = YES
    while len(rows) < limit:
        for g, fetch in enumerate(fetches):
            while at[g] < len(fetch.rows) and not rules.allows(int(fetch.rows[at[g]])):
                at[g] += 1
            if at[g] < len(fetch.rows):
                status[g] = YES
            else:
                status[g] = MAYBE if fetch.n_eligible > len(fetch.rows) else NONE
        group = rules.next_group(status)
        if group < 0:
            outcome = group
            break
        row = int(fetches[group].rows[at[group]])
        rows.append(row)
        scores.append(float(fetches[group].scores[at[group]]))
        at[group] += 1
        rules.add(np.array([row]))
    return np.array(rows, dtype=np.int64), np.array(scores, dtype=np.float32), outcome


def _pool_round(store: Store, rules: Rules, settings: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact picks from a pool of the lowest candidates (one pick for mean scores); rows, scores, vectors."""
    monotone = settings.aggregate == "max"
    groups = rules.n_groups if rules.balance else 1
    size = settings.pool if groups == 1 else max(MIN_GROUP_POOL, settings.pool // groups)
    size = size if monotone else 1
    fetches = _fetch(store, rules, size + 1, monotone)
    if all(f.n_eligible == 0 for f in fetches):
        return _empty()
    pool = _Pool(fetches, size, monotone, rules)
    picks = pool.run(monotone)
    if not picks:
        return _empty()
    rows = pool.rows[picks]
    return rows, pool.scores[picks], store.take(rows)


class _Pool:
    """The lowest candidates of each group, ranked exactly among themselves while no outsider can come first."""

    def __init__(self, fetches: list[Fetch], size: int, monotone: bool, rules: Rules):
        self.rules = rules
        members = [
            (f.scores[:size], f.rows[:size], np.full(min(size, len(f.rows)), g))
            for g, f in enumerate(fetches)
        ]
        rows = np.concatenate([m[1] for m in members])
        order = np.argsort(rows, kind="stable")
        self.rows = rows[order]
        self.scores = np.concatenate([m[0] for m in members])[order]
        self.group = np.concatenate([m[2] for m in members]).astype(np.int64)[order]
        self.members = [np.flatnonzero(self.group == g) for g in range(len(fetches))]
        self.left = np.array([len(m) for m in self.members], dtype=np.int64)
        self.outside = [f.n_eligible > size for f in fetches]
        self.bound = [(f.scores[size], f.rows[size]) if len(f.rows) > size else None for f in fetches]
        self.sims = None
        if monotone:
            vectors = np.concatenate([f.vectors[:size] for f in fetches])[order]
            norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
            self.sims = pool_sims(vectors, self.scores, norms, error_scale(vectors.shape[1]))

    def run(self, monotone: bool) -> list[int]:
        """Member indices picked, in order; their scores are left in ``self.scores``."""
        if not self.rules.constrained:
            return self._run_free(monotone)
        live = self.scores.copy()
        picks: list[int] = []
        status = np.zeros(len(self.members), dtype=np.int8)
        while True:
            status[:] = np.where(self.left > 0, YES, np.where(self.outside, MAYBE, NONE))
            group = self.rules.next_group(status)
            if group < 0:
                break
            members = self.members[group]
            best = int(members[np.argmin(live[members])])
            score = live[best]
            bound = self.bound[group]
            if bound is not None and (score > bound[0] or (score == bound[0] and self.rows[best] > bound[1])):
                break
            picks.append(best)
            self.scores[best] = score
            self._remove(np.array([best]))
            live[best] = np.inf
            blocked = self.rules.add(self.rows[[best]])
            if len(blocked):
                gone = np.flatnonzero(np.isin(self.rows, blocked) & (live < np.inf))
                live[gone] = np.inf
                self._remove(gone)
            if not monotone:
                break
            np.maximum(live, self.sims[best], out=live)
        return picks

    def _run_free(self, monotone: bool) -> list[int]:
        """:meth:`run` without caps or balance: one group, nothing blocked."""
        live = self.scores.copy()
        bound = self.bound[0]
        picks: list[int] = []
        while True:
            best = int(np.argmin(live))
            score = live[best]
            if score == np.inf:
                break
            if bound is not None and (score > bound[0] or (score == bound[0] and self.rows[best] > bound[1])):
                break
            picks.append(best)
            self.scores[best] = score
            live[best] = np.inf
            if not monotone:
                break
            np.maximum(live, self.sims[best], out=live)
        self.rules.add(self.rows[picks])
        return picks

    def _remove(self, members: np.ndarray) -> None:
        """Members no longer available to this pool."""
        np.subtract.at(self.left, self.group[members], 1)


def batch_greedy(
    x: np.ndarray,
    seed_idx: np.ndarray,
    batch_size: int,
    aggregate: str = "max",
    *,
    rules: Rules | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> Ranking:
    """Rank all rows of ``x``: seeds, then rounds of the ``batch_size`` lowest-scoring candidates (ties: lower row).

    Within a round rows are ordered by (score, row), so a budget ending mid-round keeps the least
    similar ones. Scores are those at the start of the round the row joined in.
    """
    settings = Settings("batch", aggregate, batch_size)
    return rank(_local_store(x, aggregate, rules, neighbors), len(x), seed_idx, settings, rules)


def exact_greedy(
    x: np.ndarray,
    seed_idx: np.ndarray,
    aggregate: str = "max",
    pool: int = DEFAULT_POOL,
    *,
    rules: Rules | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> Ranking:
    """Rank all rows of ``x`` one at a time, always taking the lowest-scoring candidate (ties: lower row).

    Round ``k`` is the k-th pick. ``neighbors`` (top-k rows and similarities per row, best first)
    turn on pruning; the result is the same with or without it, and for every ``pool``.
    """
    settings = Settings("exact", aggregate, 1, pool)
    return rank(_local_store(x, aggregate, rules, neighbors), len(x), seed_idx, settings, rules)


def _local_store(
    x: np.ndarray, aggregate: str, rules: Rules | None, neighbors: tuple[np.ndarray, np.ndarray] | None
) -> Shard:
    """One in-process shard over every row of ``x``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows x dim), got shape {x.shape}")
    groups, n_groups = (rules.groups, rules.n_groups) if rules is not None and rules.balance else (None, 1)
    shard = Shard(np.arange(len(x)), x, aggregate, groups, n_groups)
    if (
        neighbors is not None
        and aggregate == "max"
        and not shard.enable_pruning(neighbors[0], neighbors[1], shard.max_norm, len(x))
    ):
        raise ValueError("the neighbor lists do not match the vectors")
    return shard


def choose_seeds(n: int, seed_size: int, rng: np.random.Generator) -> np.ndarray:
    """``seed_size`` distinct row indices drawn uniformly from ``range(n)``, sorted."""
    if not 1 <= seed_size <= n:
        raise ValueError(f"seed_size must be in [1, {n}], got {seed_size}")
    return np.sort(rng.choice(n, size=seed_size, replace=False)).astype(np.int64)
