"""The max fold's float32 GEMM on a torch device (a GPU), with the same exact recheck as on the CPU.

A complete farthest-first ranking computes about N^2 / 2 products (10^7 images: 5 x 10^13 at d = 128),
so its time is the fold's GEMM. Here the candidates' vectors live on the device; each fold multiplies
them with the new picks there and brings back only the few entries that can raise a score
(:func:`raises`, the rule of :func:`~.sims.max_raises`), which the host recomputes in the shared
exact arithmetic. A float32 product on the device is within the same ``gamma_d |x| |y|`` of the exact
one whatever its summation order, provided TF32 is off, so the rankings equal the CPU's bit for bit.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "cuda")


def torch_device(device: str):
    """The torch module, after checking ``device`` can run (TF32 off: the error bound needs full float32)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("select device cuda asked for, but torch sees no GPU here: use --select-device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


class DeviceFold:
    """A shard's candidates on ``device``: vectors, norms, and mirrors of the scores and of which rows are eligible.

    The host keeps the authoritative scores; every change to them (picks, raises, blocks) is pushed here,
    so a round's lowest candidates (:meth:`lowest`) and the fold's floors are found without a pass over
    N on the host.
    """

    def __init__(self, vectors: np.ndarray, norms: np.ndarray, groups: list[np.ndarray], device: str):
        self.torch = torch_device(device)
        self.device = device
        self.all = self._put(np.ascontiguousarray(vectors, np.float32))
        self.all_norms = self._put(np.asarray(norms, np.float64))
        self.groups = [self._put(np.asarray(g, np.int64)) for g in groups]
        self.active, self.norms, self.at = self.all, self.all_norms, None
        self.scores = self._put(np.zeros(len(vectors), np.float32))
        self.eligible = self._put(np.zeros(len(vectors), bool))

    def _put(self, array: np.ndarray):
        """A device copy of ``array`` (a copy on the CPU too: the mirrors must never alias the host's arrays)."""
        return self.torch.from_numpy(array).to(self.device, copy=True)

    def load(self, scores: np.ndarray, eligible: np.ndarray) -> None:
        """Every row's score and eligibility (a ranking starts, or caps are lifted)."""
        self.scores = self._put(np.ascontiguousarray(scores, np.float32))
        self.eligible = self._put(np.ascontiguousarray(eligible, bool))

    def set_scores(self, positions: np.ndarray, scores: np.ndarray) -> None:
        """The host's new scores of the rows at ``positions`` (distinct)."""
        if len(positions):
            self.scores[self._put(np.asarray(positions, np.int64))] = self._put(np.asarray(scores, np.float32))

    def drop(self, positions: np.ndarray) -> None:
        """The rows at ``positions`` are no longer eligible (chosen or blocked)."""
        if len(positions):
            self.eligible[self._put(np.asarray(positions, np.int64))] = False

    def lowest(self, group: int, m: int) -> tuple[np.ndarray, int]:
        """Positions (in the group's order) of its ``m`` lowest eligible rows by (score, position), and how many are eligible.

        The same rows as :func:`~.shard.lowest_positions` on the host: everything below the m-th
        smallest key, then the ties at it in position order; the host sorts these few.
        """
        torch = self.torch
        positions = self.groups[group]
        keys = torch.where(self.eligible[positions], self.scores[positions], float("inf"))
        n_eligible = int(torch.count_nonzero(keys < float("inf")))
        m = min(m, n_eligible)
        if m <= 0:
            return np.empty(0, np.int64), n_eligible
        kth = torch.topk(keys, m, largest=False, sorted=False).values.max()
        below = torch.nonzero(keys < kth).flatten()
        tied = torch.nonzero(keys == kth).flatten()[: m - len(below)]
        return torch.cat([below, tied]).cpu().numpy(), n_eligible

    def reset(self, positions: np.ndarray, whole: bool) -> None:
        """The GEMM operand becomes the rows at ``positions`` (``whole``: every row, in order)."""
        if whole:
            self.active, self.norms, self.at = self.all, self.all_norms, None
        else:
            self.at = self._put(np.asarray(positions, np.int64))
            self.active, self.norms = self.all[self.at], self.all_norms[self.at]

    def picks(self, vectors: np.ndarray):
        """The new picks' vectors on the device (once per fold)."""
        return self._put(np.ascontiguousarray(vectors, np.float32))

    def raises(self, start: int, stop: int, picks, err: float) -> tuple[np.ndarray, np.ndarray]:
        """Entries of ``active[start:stop] @ picks.T`` that can raise a row's max: (rows from ``start``, pick columns).

        The rule of :func:`~.sims.max_raises`: a row whose float32 best can exceed its score less the
        error bound, its best column, and every runner-up within twice the bound of that best.
        """
        torch = self.torch
        g = self.active[start:stop] @ picks.T
        bound = self.norms[start:stop] * err
        scores = self.scores[start:stop] if self.at is None else self.scores[self.at[start:stop]]
        floor = scores.double() - bound
        top, best = g.max(dim=1)
        flagged = torch.nonzero(top.double() > floor).flatten()
        if len(flagged) == 0:
            empty = np.empty(0, np.int64)
            return empty, empty
        sub = g[flagged]
        cols = best[flagged]
        at = torch.arange(len(flagged), device=self.device)
        lower = torch.maximum(floor[flagged], top[flagged].double() - 2.0 * bound[flagged])
        sub[at, cols] = -float("inf")
        close = torch.nonzero(sub.max(dim=1).values.double() >= lower).flatten()
        hit, col = torch.nonzero(sub[close].double() >= lower[close, None], as_tuple=True)
        rows = torch.cat([flagged, flagged[close[hit]]])
        return rows.cpu().numpy(), torch.cat([cols, col]).cpu().numpy()
