"""Candidate state of a set of rows for one ranking: scores against the chosen set, kept current per pick.

A :class:`Shard` holds its rows' vectors (read-only, shareable) and, per ranking, which rows are
still candidates, their scores and which are blocked by caps. One shard holding every row is the
single-process store; shards in Ray actors make the distributed one (``actors.py``). Rows are global
indices into the id-sorted embeddings; ties between equal scores go to the lower row.

Max scores are folded in with float32 GEMMs whose few decisive entries are recomputed exactly
(``sims.py``). With the similarity stage's top-k lists, a candidate whose score has reached its k-th
neighbor similarity (plus the float32 error bound) can only be raised by its listed neighbors, so
it leaves the GEMM and its updates become O(k) (pruning). With cell bounds (``bounds.py``) a fold
skips the k-means cells that none of the new picks can reach. With ``device`` the fold's GEMM and the
search for each round's lowest candidates run there (``device.py``); the host keeps the
authoritative scores, mirrored on the device after every change, and does the exact rechecks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bounds import BOUNDED_SHARE, CellBounds, cell_minima, fold_pairs, pick_norm_range, reach, refine
from .device import DEVICES, DeviceFold
from .sims import error_scale, exact_sims, max_raises

GEMM_ELEMENTS = 1 << 22
DEVICE_GEMM_ELEMENTS = 1 << 28  # 1 GiB of float32 products per device GEMM
COMPACT_FRACTION = 16
PICK_CHUNK = 1024  # picks per bounded fold step
AGGREGATES = ("max", "mean")
CHECK_COLUMNS = (0, -1)


@dataclass
class Fetch:
    """The lowest eligible candidates of one group by (score, row), and how many are eligible in all."""

    scores: np.ndarray
    rows: np.ndarray
    vectors: np.ndarray | None
    n_eligible: int


@dataclass
class CandidateState:
    """Rows still to rank with their scores (and mean sums): what a checkpoint stores of the store."""

    rows: np.ndarray
    scores: np.ndarray
    sums: np.ndarray | None


def lowest_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` smallest ``keys`` ordered by (key, position)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(keys, k - 1)[k - 1]
    below = np.flatnonzero(keys < kth)
    tied = np.flatnonzero(keys == kth)[: k - len(below)]
    picked = np.concatenate([below, tied])
    return picked[np.lexsort((picked, keys[picked]))]


def merge_fetches(parts: list[list[Fetch]], m: int) -> list[Fetch]:
    """Per group, the ``m`` lowest of several shards' fetches."""
    out = []
    for group in zip(*parts, strict=True):
        scores = np.concatenate([f.scores for f in group])
        rows = np.concatenate([f.rows for f in group])
        order = np.lexsort((rows, scores))[:m]
        vectors = None
        if group[0].vectors is not None:
            vectors = np.concatenate([f.vectors for f in group])[order]
        out.append(Fetch(scores[order], rows[order], vectors, sum(f.n_eligible for f in group)))
    return out


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """Each row's norm in float64, a part at a time (a float64 copy of 10^7 rows would be 10 GB)."""
    out = np.empty(len(vectors), dtype=np.float64)
    step = max(1, GEMM_ELEMENTS // max(1, vectors.shape[1]))
    for start in range(0, len(vectors), step):
        out[start : start + step] = np.linalg.norm(vectors[start : start + step].astype(np.float64), axis=1)
    return out


def vectors_checksum(rows: np.ndarray, vectors: np.ndarray) -> int:
    """Order-free checksum of rows and their float32 bits (sums over shards combine modulo 2**64)."""
    total = np.uint64(0)
    dim = vectors.shape[1]
    cols = np.arange(1, dim + 1, dtype=np.uint64)
    step = max(1, GEMM_ELEMENTS // max(dim, 1))
    with np.errstate(over="ignore"):
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            weights = rows[part].astype(np.uint64)[:, None] * np.uint64(dim) + cols
            weights *= np.uint64(0x9E3779B97F4A7C15)
            total += np.sum(vectors[part].view(np.uint32).astype(np.uint64) * weights, dtype=np.uint64)
    return int(total)


class Shard:
    """Candidates among ``rows`` (sorted global rows) with their ``vectors``, for one ranking at a time."""

    def __init__(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        aggregate: str = "max",
        groups: np.ndarray | None = None,
        n_groups: int = 1,
        device: str | None = None,
    ):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if device is not None and (device not in DEVICES or aggregate != "max"):
            raise ValueError(f"the fold runs on a device ({DEVICES}) for max scores only, got {device!r}, {aggregate!r}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.rows):
            raise ValueError(f"need one vector per row, got {self.vectors.shape} for {len(self.rows)} rows")
        self.aggregate = aggregate
        self.norms = row_norms(self.vectors)
        self.err_scale = error_scale(self.vectors.shape[1])
        groups = np.zeros(len(self.rows), dtype=np.int64) if groups is None else np.asarray(groups)
        self.group_positions = [np.flatnonzero(groups == g) for g in range(n_groups)]
        self.tau = np.full(len(self.rows), np.inf, dtype=np.float32)
        self.reverse: tuple[np.ndarray, np.ndarray] | None = None
        self.dense_pairs = 0
        self.device = device
        self.fold: DeviceFold | None = None  # made where the ranking runs (a task or actor), never pickled
        self.bounds: CellBounds | None = None
        self.skipped_pairs = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "fold": None}

    @property
    def max_norm(self) -> float:
        """Largest row norm in this shard (0 when empty)."""
        return float(self.norms.max()) if len(self.norms) else 0.0

    def checksum(self) -> int:
        """Checksum of this shard's rows and vectors."""
        return vectors_checksum(self.rows, self.vectors)

    def enable_pruning(
        self, nn_rows: np.ndarray, nn_sims: np.ndarray, norm_bound: float, n_total: int
    ) -> bool:
        """Prune with top-k lists (global rows, best first; -1 pads); False if they disagree with the vectors.

        ``norm_bound`` is the largest row norm over all shards, ``n_total`` the number of rows.
        """
        nn_rows = np.asarray(nn_rows, dtype=np.int64).reshape(len(self.rows), -1)
        nn_sims = np.asarray(nn_sims, dtype=np.float32).reshape(nn_rows.shape)
        k = nn_rows.shape[1]
        if k == 0:
            return False
        cols = nn_rows[:, list(CHECK_COLUMNS)]
        local = self._find(cols.ravel()).reshape(cols.shape)
        c, j = np.nonzero(local >= 0)
        got = exact_sims(self.vectors[c], self.vectors[local[c, j]]).astype(np.float64)
        tolerance = self.err_scale * self.norms[c] * self.norms[local[c, j]] + 2.0**-22
        if np.any(np.abs(got - nn_sims[:, list(CHECK_COLUMNS)][c, j]) > tolerance):
            return False
        tau = nn_sims[:, -1].astype(np.float64) + self.err_scale * self.norms * norm_bound
        if k >= n_total - 1:
            tau[:] = -np.inf
        tau[(nn_rows < 0).any(axis=1)] = np.inf
        tau32 = tau.astype(np.float32)
        low = tau32 < tau
        tau32[low] = np.nextafter(tau32[low], np.float32(np.inf))
        pairs = nn_rows.ravel()
        owner = np.repeat(np.arange(len(self.rows), dtype=np.int64), k)
        keep = pairs >= 0
        order = np.argsort(pairs[keep], kind="stable")
        self.tau = tau32
        self.reverse = (pairs[keep][order], owner[keep][order])
        return True

    def enable_bounds(self, cell_size: int, seed: int, threads: int = 1) -> int:
        """Group the rows in k-means cells of about ``cell_size`` whose bounds let folds skip them; the cell count.

        Max scores on the host only (0 and no bounds otherwise, or with fewer than two cells).
        """
        from .cells import cell_count, make_cells

        n_cells = cell_count(len(self.rows), cell_size)
        if self.aggregate != "max" or self.device is not None or n_cells < 2:
            return 0
        cells = make_cells(self.vectors, n_cells, seed, threads)
        labels, _, self.bounds = refine(self.vectors, cells.assignment, cells.centroids)
        self.cell_order = np.argsort(labels, kind="stable")
        if hasattr(self, "alive"):
            self._reset_active()
        return len(self.bounds.centres)

    def products(self) -> tuple[int, int]:
        """Products the folds of the current ranking computed, and those the cell bounds skipped."""
        return self.dense_pairs, self.skipped_pairs

    def disable_pruning(self) -> None:
        """Update every candidate by GEMM again."""
        self.tau = np.full(len(self.rows), np.inf, dtype=np.float32)
        self.reverse = None

    def start(
        self,
        rows: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        sums: np.ndarray | None = None,
        n_chosen: int = 0,
    ) -> None:
        """Begin a ranking: every row a candidate, or the candidates ``rows`` with their saved state."""
        n = len(self.rows)
        if self.device is not None and self.fold is None:
            self.fold = DeviceFold(self.vectors, self.norms, self.group_positions, self.device)
        self.alive = np.ones(n, dtype=bool)
        self.scores = np.full(n, -np.inf, dtype=np.float32)
        self.sums = np.zeros(n, dtype=np.float64) if self.aggregate == "mean" else None
        if rows is not None:
            pos = self._positions(rows)
            self.alive[:] = False
            self.alive[pos] = True
            self.scores[:] = np.inf
            self.scores[pos] = scores
            if self.sums is not None and sums is not None:
                self.sums[pos] = sums
        self.blocked = np.zeros(n, dtype=bool)
        self.n_chosen = n_chosen
        self.pruned = self.alive & (self.scores >= self.tau) if self.aggregate == "max" else np.zeros(n, bool)
        self.dense_pairs = 0
        self.skipped_pairs = 0
        self._reset_active()
        if self.fold is not None:
            self.fold.load(self.scores, self.alive)

    def lowest(self, m: int, with_vectors: bool = False, block: np.ndarray | None = None) -> list[Fetch]:
        """Per group, the ``m`` lowest eligible candidates (after blocking the rows ``block``)."""
        if block is not None and len(block):
            newly = self._find(block, local_only=True)
            self.blocked[newly] = True
            if self.fold is not None:
                self.fold.drop(newly)
        keys = None if self.fold is not None else np.where(self.alive & ~self.blocked, self.scores, np.float32(np.inf))
        out = []
        for g, positions in enumerate(self.group_positions):
            if self.fold is not None:  # the device finds the few lowest; they are ordered here, as on the host
                local, n_eligible = self.fold.lowest(g, m)
                pos = positions[local[np.lexsort((local, self.scores[positions[local]]))]]
            else:
                sub = keys[positions]
                n_eligible = int(np.count_nonzero(sub < np.inf))
                pos = positions[lowest_positions(sub, min(m, n_eligible))]
            vectors = self.vectors[pos] if with_vectors else None
            out.append(Fetch(self.scores[pos], self.rows[pos], vectors, n_eligible))
        return out

    def lift(self) -> None:
        """Unblock every candidate (caps lifted)."""
        self.blocked[:] = False
        if self.fold is not None:
            self.fold.load(self.scores, self.alive)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Mark ``rows`` (all in this shard, still candidates) chosen; returns their vectors."""
        pos = self._positions(rows)
        if not self.alive[pos].all():
            raise ValueError("a row was chosen twice")
        self.alive[pos] = False
        self.scores[pos] = np.inf
        self._drop_active(pos)
        if self.fold is not None:
            self.fold.drop(pos)
            self.fold.set_scores(pos, self.scores[pos])
        return self.vectors[pos]

    def update(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Fold the similarities to newly chosen ``rows`` (with their ``vectors``) into every score."""
        rows = np.asarray(rows, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(rows), self.vectors.shape[1])
        self.n_chosen += len(rows)
        if len(rows) == 0:
            return
        if self.aggregate == "mean":
            self._fold_mean(vectors)
        else:
            # only a raised score can reach its row's pruning bound: the other rows stay as they were
            raised = self._fold_max(rows, vectors)
            newly = raised[self.in_active[raised] & (self.scores[raised] >= self.tau[raised])]
            self.pruned[newly] = True
            self._drop_active(newly)
        self._compact()

    def state(self) -> CandidateState:
        """The candidates still to rank and their scores (and sums)."""
        pos = np.flatnonzero(self.alive)
        sums = self.sums[pos] if self.sums is not None else None
        return CandidateState(self.rows[pos], self.scores[pos], sums)

    def _fold_max(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Raise max scores: pruned candidates from their listed neighbors, the others by GEMM; the positions raised."""
        raised = []
        if self.reverse is not None:
            pos, pick = self._listing(rows)
            keep = self.alive[pos] & self.pruned[pos]
            pos, pick = pos[keep], pick[keep]
            np.maximum.at(self.scores, pos, exact_sims(self.vectors[pos], vectors[pick]))
            raised.append(pos)
        err = self.err_scale * float(np.linalg.norm(vectors.astype(np.float64), axis=1).max())
        if self.bounds is not None:
            raised.append(self._fold_bounded(vectors, err))
            return np.unique(np.concatenate(raised))
        if self.fold is not None:
            picks = self.fold.picks(vectors)
            step = max(1, DEVICE_GEMM_ELEMENTS // len(vectors))
        else:
            step = max(1, GEMM_ELEMENTS // len(vectors))
        for start in range(0, len(self.active), step):
            pos = self.active[start : start + step]
            if self.fold is not None:
                hit, col = self.fold.raises(start, start + len(pos), picks, err)
                values = exact_sims(self.vectors[pos[hit]], vectors[col])
            else:
                a = self.active_vectors[start : start + step]
                hit, values = max_raises(self.scores[pos], a @ vectors.T, a, vectors, self.norms[pos], err)
            np.maximum.at(self.scores, pos[hit], values)
            raised.append(pos[hit])
        self.dense_pairs += len(self.active) * len(vectors)
        raised = np.unique(np.concatenate(raised)) if raised else np.empty(0, np.int64)
        if self.fold is not None:
            self.fold.set_scores(raised, self.scores[raised])
        return raised

    def _fold_bounded(self, vectors: np.ndarray, err: float) -> np.ndarray:
        """:meth:`_fold_max` over the cells some pick can reach; positions raised.

        Picks go in chunks, so that the scores the first ones raise already bound the rest (a seed set
        of thousands starts with every score at -inf). A chunk that reaches most cells is one GEMM.
        """
        raised = []
        for start in range(0, len(vectors), PICK_CHUNK):
            raised.append(self._fold_chunk(vectors[start : start + PICK_CHUNK], err))
        return np.concatenate(raised)

    def _fold_chunk(self, vectors: np.ndarray, err: float) -> np.ndarray:
        """One chunk of :meth:`_fold_bounded`."""
        b = self.bounds
        limits = b.thresholds(self.cell_min, *pick_norm_range(vectors), self.err_scale)
        cells, picks, work = reach(b.centres @ vectors.T, limits, self.cell_starts)
        full = len(self.active) * len(vectors)
        if work > BOUNDED_SHARE * full:
            raised = []
            step = max(1, GEMM_ELEMENTS // len(vectors))
            for start in range(0, len(self.active), step):
                pos = self.active[start : start + step]
                a = self.active_vectors[start : start + step]
                hit, values = max_raises(self.scores[pos], a @ vectors.T, a, vectors, self.norms[pos], err)
                np.maximum.at(self.scores, pos[hit], values)
                raised.append(pos[hit])
            cell_minima(np.arange(len(b.centres)), self.cell_starts, self.active, self.scores, self.cell_min)
            self.dense_pairs += full
            return np.concatenate(raised) if raised else np.empty(0, np.int64)
        raised, touched = fold_pairs(
            cells, picks, self.cell_starts, self.active, self.active_vectors, vectors, self.scores, self.norms, err
        )
        cell_minima(touched, self.cell_starts, self.active, self.scores, self.cell_min)
        self.dense_pairs += work
        self.skipped_pairs += full - work
        return raised

    def _fold_mean(self, vectors: np.ndarray) -> None:
        """Add the similarities to ``vectors`` to every candidate's sum (float64) and rescore."""
        new = vectors.astype(np.float64)
        step = max(1, GEMM_ELEMENTS // len(new))
        for start in range(0, len(self.active), step):
            pos = self.active[start : start + step]
            self.sums[pos] += (self.active_vectors[start : start + step] @ new.T).sum(axis=1)
        self.dense_pairs += len(self.active) * len(new)
        self.scores = np.where(self.alive, self.sums / max(self.n_chosen, 1), np.inf).astype(np.float32)

    def _reset_active(self) -> None:
        """Rebuild the GEMM operand from the candidates that are neither chosen nor pruned."""
        self.in_active = self.alive & ~self.pruned
        self.active = np.flatnonzero(self.in_active)
        dtype = np.float64 if self.aggregate == "mean" else np.float32
        whole = len(self.active) == len(self.rows) and dtype == np.float32
        if self.bounds is not None:  # candidates in cell order: each cell's are one slice of the operand
            labels = self.bounds.labels
            self.active = self.cell_order[self.in_active[self.cell_order]]
            self.active_vectors = self.vectors[self.active]
            self.cell_starts = np.searchsorted(labels[self.active], np.arange(len(self.bounds.centres) + 1))
            self.cell_min = np.full(len(self.bounds.centres), np.inf, dtype=np.float32)
            cell_minima(np.arange(len(self.cell_min)), self.cell_starts, self.active, self.scores, self.cell_min)
        elif self.fold is not None:  # the operand lives on the device only
            self.fold.reset(self.active, whole)
            self.active_vectors = None
        elif whole:
            self.active_vectors = self.vectors
        else:
            self.active_vectors = self.vectors[self.active].astype(dtype)
        self.dead = 0

    def _drop_active(self, pos: np.ndarray) -> None:
        """Take positions out of the GEMM operand (lazily: compaction happens later)."""
        self.dead += int(np.count_nonzero(self.in_active[pos]))
        self.in_active[pos] = False

    def _compact(self) -> None:
        """Rebuild the GEMM operand once a 1/16 of it is chosen or pruned."""
        if self.dead and self.dead * COMPACT_FRACTION >= len(self.active):
            self._reset_active()

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """Local positions of ``rows``, which must all be in this shard."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(self.rows, rows)
        if len(rows) and (pos.max() >= len(self.rows) or np.any(self.rows[pos] != rows)):
            raise ValueError("rows outside this shard")
        return pos

    def _find(self, rows: np.ndarray, local_only: bool = False) -> np.ndarray:
        """Local positions of ``rows`` (-1 where a row is elsewhere; dropped with ``local_only``)."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        found = (self.rows[pos] == rows) if len(self.rows) else np.zeros(len(rows), bool)
        return pos[found] if local_only else np.where(found, pos, -1)

    def _listing(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidate position, index into ``rows``) of every candidate listing one of ``rows``."""
        keys, owners = self.reverse
        lo = np.searchsorted(keys, rows, side="left")
        counts = np.searchsorted(keys, rows, side="right") - lo
        pick = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        offsets = np.arange(len(pick), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return owners[lo[pick] + offsets], pick
