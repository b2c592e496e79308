"""Label-blind greedy selection: rank every image by how unlike the already-chosen set it is.

Similarities are dot products of the rows of ``x`` (cosine similarity for unit rows), accumulated in
float64 and rounded to float32. A float32 GEMM gives different last bits for the same pair depending
on the matrix shape; the float64-then-round value does not (short of a ~1e-9 chance of landing on a
float32 rounding boundary), so ties and the exact == naive guarantee do not depend on block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGGREGATES = ("max", "mean")
GEMM_BYTES = 256 * 2**20
DEFAULT_POOL = 1024


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


class _Candidates:
    """Rows not chosen yet: float64 vectors, scores (inf once chosen), compacted as chosen rows pile up."""

    def __init__(self, x: np.ndarray, aggregate: str):
        self.vectors = np.array(x, dtype=np.float64)
        self.rows = np.arange(len(x), dtype=np.int64)
        self.alive = np.ones(len(x), dtype=bool)
        self.n_alive = len(x)
        self.scores = np.full(len(x), -np.inf, dtype=np.float32)
        self.sums = np.zeros(len(x), dtype=np.float64) if aggregate == "mean" else None
        self.n_chosen = 0

    def lowest(self, k: int) -> np.ndarray:
        """Positions of the ``k`` alive candidates with the lowest (score, row), in that order."""
        kth = np.partition(self.scores, k - 1)[k - 1]
        below = np.flatnonzero(self.scores < kth)
        tied = np.flatnonzero(self.scores == kth)[: k - len(below)]
        picked = np.concatenate([below, tied])
        return picked[np.lexsort((picked, self.scores[picked]))]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Mark ``positions`` chosen and return their vectors."""
        new = self.vectors[positions]
        self.alive[positions] = False
        self.scores[positions] = np.inf
        self.n_alive -= len(positions)
        return new

    def update(self, new: np.ndarray) -> None:
        """Fold the similarities to the newly chosen rows ``new`` into every score (chunked GEMM)."""
        self.n_chosen += len(new)
        if len(new) == 0 or self.n_alive == 0:
            return
        reduce = np.max if self.sums is None else np.sum
        step = max(1, GEMM_BYTES // (8 * len(new)))
        for start in range(0, len(self.vectors), step):
            part = slice(start, start + step)
            folded = reduce(self.vectors[part] @ new.T, axis=1)
            if self.sums is None:
                np.maximum(self.scores[part], folded.astype(np.float32), out=self.scores[part])
            else:
                self.sums[part] += folded
        if self.sums is not None:
            self.scores = (self.sums / self.n_chosen).astype(np.float32)
            self.scores[~self.alive] = np.inf

    def compact(self) -> None:
        """Drop chosen rows once they are 1/16 of the arrays, so GEMMs skip them (positions change)."""
        if (len(self.alive) - self.n_alive) * 16 < len(self.alive):
            return
        keep = self.alive
        self.vectors, self.rows, self.scores = self.vectors[keep], self.rows[keep], self.scores[keep]
        if self.sums is not None:
            self.sums = self.sums[keep]
        self.alive = np.ones(self.n_alive, dtype=bool)


class _Builder:
    """Accumulates a ranking: seeds first, then picks with their round and score."""

    def __init__(self, seed_rows: np.ndarray):
        self.order = [seed_rows.astype(np.int64)]
        self.round = [np.zeros(len(seed_rows), dtype=np.int32)]
        self.score = [np.full(len(seed_rows), np.nan, dtype=np.float32)]

    def add(self, rows: np.ndarray, round_: int | np.ndarray, scores: np.ndarray) -> None:
        """Append picked rows with their round (one for all, or one each) and scores."""
        self.order.append(np.asarray(rows, dtype=np.int64))
        self.round.append(np.broadcast_to(np.asarray(round_, dtype=np.int32), len(self.order[-1])))
        self.score.append(np.asarray(scores, dtype=np.float32))

    def build(self) -> Ranking:
        """The ranking so far as flat arrays."""
        return Ranking(np.concatenate(self.order), np.concatenate(self.round), np.concatenate(self.score))


def _start(x: np.ndarray, seed_idx: np.ndarray, aggregate: str) -> tuple[_Candidates, _Builder]:
    """Validate inputs, take the seeds and score every other row against them."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows x dim), got shape {x.shape}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    seeds = np.asarray(seed_idx, dtype=np.int64).ravel()
    if len(seeds) == 0:
        raise ValueError("at least one seed row is needed")
    if seeds.min() < 0 or seeds.max() >= len(x) or len(np.unique(seeds)) != len(seeds):
        raise ValueError(f"seed rows must be distinct indices in [0, {len(x)})")
    cands = _Candidates(x, aggregate)
    cands.update(cands.take(seeds))
    cands.compact()
    return cands, _Builder(seeds)


def batch_greedy(x: np.ndarray, seed_idx: np.ndarray, batch_size: int, aggregate: str = "max") -> Ranking:
    """Rank all rows: seeds, then rounds of the ``batch_size`` lowest-scoring candidates (ties: lower row).

    Within a round rows are ordered by (score, row), so a budget ending mid-round keeps the least
    similar ones. Scores are those at the start of the round the row joined in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cands, ranking = _start(x, seed_idx, aggregate)
    round_ = 0
    while cands.n_alive:
        round_ += 1
        picked = cands.lowest(min(batch_size, cands.n_alive))
        ranking.add(cands.rows[picked], round_, cands.scores[picked])
        cands.update(cands.take(picked))
        cands.compact()
    return ranking.build()


def exact_greedy(
    x: np.ndarray, seed_idx: np.ndarray, aggregate: str = "max", pool: int = DEFAULT_POOL
) -> Ranking:
    """Rank all rows one at a time, always taking the lowest-scoring candidate (ties: lower row).

    ``max`` runs in pools: the ``pool`` lowest candidates are ranked exactly among themselves with
    pool x pool similarities while each pick still precedes the best candidate outside the pool
    (valid because max scores never decrease), then one GEMM updates the rest. ``mean`` scores can
    fall as the set grows, so it runs one pick at a time with an incremental sum per candidate.
    Round ``k`` is the k-th pick. The result equals the naive loop for every ``pool``.
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    cands, ranking = _start(x, seed_idx, aggregate)
    picks = 0
    while cands.n_alive:
        if aggregate == "mean":
            pos = np.array([int(np.argmin(cands.scores))])
            rows, scores = cands.rows[pos], cands.scores[pos]
            cands.update(cands.take(pos))
        else:
            rows, scores = _pool_round(cands, pool)
        ranking.add(rows, np.arange(picks + 1, picks + len(rows) + 1), scores)
        picks += len(rows)
        cands.compact()
    return ranking.build()


def _pool_round(cands: _Candidates, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """One pool of exact max-greedy picks, then one GEMM update; returns picked rows and scores."""
    members = np.sort(cands.lowest(min(pool, cands.n_alive)))
    bound_score, bound_pos = np.inf, len(cands.scores)
    if len(members) < cands.n_alive:
        outside = cands.scores.copy()
        outside[members] = np.inf
        bound_pos = int(np.argmin(outside))
        bound_score = outside[bound_pos]
    vectors = cands.vectors[members]
    sims = (vectors @ vectors.T).astype(np.float32)
    scores = cands.scores[members].copy()
    picked: list[int] = []
    picked_scores: list[float] = []
    while len(picked) < len(members):
        best = int(np.argmin(scores))
        score = scores[best]
        if score > bound_score or (score == bound_score and members[best] > bound_pos):
            break
        picked.append(best)
        picked_scores.append(score)
        scores[best] = np.inf
        np.maximum(scores, sims[best], out=scores)
    rest = np.setdiff1d(np.arange(len(members)), picked)
    rows = cands.rows[members[picked]]
    cands.update(cands.take(members[picked]))
    cands.scores[members[rest]] = scores[rest]
    return rows, np.array(picked_scores, dtype=np.float32)


def choose_seeds(n: int, seed_size: int, rng: np.random.Generator) -> np.ndarray:
    """``seed_size`` distinct row indices drawn uniformly from ``range(n)``, sorted."""
    if not 1 <= seed_size <= n:
        raise ValueError(f"seed_size must be in [1, {n}], got {seed_size}")
    return np.sort(rng.choice(n, size=seed_size, replace=False)).astype(np.int64)
