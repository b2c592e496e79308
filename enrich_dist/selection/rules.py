"""Medical constraints on a ranking: caps per clip and per patient, and label balance.

Caps: while a clip (or patient) holds ``limit`` chosen images, its other images are skipped. Once
every remaining image is skipped the caps are lifted and the rest follow in their own greedy order,
so the ranking stays a permutation and every prefix up to that point respects the caps. Seeds
count towards the caps (a seed set may already exceed them). Images without a clip or patient are
never capped.

Balance: each pick comes from the label with the fewest chosen images so far (seeds included; ties
go to the label that sorts first, unlabelled images last), i.e. round-robin over labels; within
that label the lowest-scoring image wins. Labels with no eligible image left are passed over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NONE, MAYBE, YES = 0, 1, 2
STOP, EXHAUSTED = -1, -2


@dataclass
class _Cap:
    """One cap: a code per row (-1: none), the limit, chosen counts per code and which codes are full."""

    codes: np.ndarray
    limit: int
    order: np.ndarray
    starts: np.ndarray

    def __post_init__(self) -> None:
        size = int(self.codes.max()) + 1 if len(self.codes) else 0
        self.count = np.zeros(size, dtype=np.int64)
        self.full = np.zeros(size, dtype=bool)

    def members(self, code: int) -> np.ndarray:
        """Rows carrying ``code``."""
        return self.order[self.starts[code] : self.starts[code + 1]]


class Rules:
    """Which candidates the next pick may be: caps (until lifted) and the label whose turn it is."""

    def __init__(
        self,
        n: int,
        groups: np.ndarray | None = None,
        caps: list[tuple[np.ndarray, int]] | tuple = (),
    ):
        self.balance = groups is not None
        self.groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        if len(self.groups) != n or (n and self.groups.min() < 0):
            raise ValueError(f"groups must hold one non-negative code per row ({n} rows)")
        self.n_groups = int(self.groups.max()) + 1 if n else 1
        self.counts = np.zeros(self.n_groups, dtype=np.int64)
        self.caps = []
        for codes, limit in caps:
            codes = np.asarray(codes, dtype=np.int64)
            if len(codes) != n:
                raise ValueError(f"cap codes must hold one code per row ({n} rows), got {len(codes)}")
            if limit < 1:
                raise ValueError(f"a cap must be >= 1, got {limit}")
            valid = np.flatnonzero(codes >= 0)
            order = valid[np.argsort(codes[valid], kind="stable")]
            size = int(codes.max()) + 1 if len(valid) else 0
            starts = np.searchsorted(codes[order], np.arange(size + 1))
            self.caps.append(_Cap(codes, int(limit), order, starts))
        self.capped = bool(self.caps)
        self._pending: list[np.ndarray] = []

    @property
    def constrained(self) -> bool:
        """Whether picks need the rules at all (balance on, or caps still in force)."""
        return self.balance or self.capped

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Count ``rows`` as chosen; returns the rows of clips or patients that became full."""
        rows = np.asarray(rows, dtype=np.int64)
        np.add.at(self.counts, self.groups[rows], 1)
        if not self.capped:
            return np.empty(0, dtype=np.int64)
        blocked = []
        for cap in self.caps:
            codes = cap.codes[rows]
            codes = codes[codes >= 0]
            np.add.at(cap.count, codes, 1)
            full = np.unique(codes[cap.count[codes] >= cap.limit])
            full = full[~cap.full[full]]
            cap.full[full] = True
            blocked += [cap.members(int(code)) for code in full]
        out = np.concatenate(blocked) if blocked else np.empty(0, dtype=np.int64)
        if len(out):
            self._pending.append(out)
        return out

    def allows(self, row: int) -> bool:
        """Whether ``row`` may be picked under the caps in force."""
        if not self.capped:
            return True
        return not any(cap.full[cap.codes[row]] for cap in self.caps if cap.codes[row] >= 0)

    def next_group(self, status: np.ndarray) -> int:
        """The group of the next pick given each group's ``NONE``/``MAYBE``/``YES`` status.

        Returns ``STOP`` when that group's status is ``MAYBE`` (the caller must look again) and
        ``EXHAUSTED`` when no group has an eligible candidate.
        """
        open_ = np.flatnonzero(status > NONE)
        if len(open_) == 0:
            return EXHAUSTED
        group = int(open_[np.argmin(self.counts[open_])]) if self.balance else int(open_[0])
        return group if status[group] == YES else STOP

    def take_blocked(self) -> np.ndarray:
        """Rows blocked since the last call (for the candidate store)."""
        out = np.concatenate(self._pending) if self._pending else np.empty(0, dtype=np.int64)
        self._pending = []
        return out

    def lift(self) -> None:
        """Lift the caps for the rest of the ranking."""
        self.capped = False
        self._pending = []
