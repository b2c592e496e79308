"""Checkpoints of a ranking in progress: ``selection/checkpoints/replicate-NNN.parquet``, written atomically.

One row per image: the ranked ones in order (``chosen``, their round and score) and then the
candidates with their current score (and mean sum). The file's metadata holds a fingerprint of
everything the ranking depends on (settings, seeds, rules, a checksum of the embeddings); a
checkpoint whose fingerprint differs is ignored, so a changed config or rerun embedding starts over.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa

from ..schema import SELECTION_DIR
from ..storage import RunDir
from .greedy import Ranking, State
from .shard import CandidateState

log = logging.getLogger("enrich_dist.selection")

CHECKPOINT_DIR = posixpath.join(SELECTION_DIR, "checkpoints")
FINGERPRINT_KEY = b"enrich.fingerprint"
CAPPED_KEY = b"enrich.capped"
SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("chosen", pa.bool_()),
        ("round", pa.int32()),
        ("score", pa.float32()),
        ("sum", pa.float64()),
    ]
)


def checkpoint_path(replicate: int) -> str:
    """Run-dir path of replicate ``replicate``'s checkpoint."""
    return posixpath.join(CHECKPOINT_DIR, f"replicate-{replicate:03d}.parquet")


class Checkpoint:
    """Saves and resumes one replicate's ranking, at most every ``every_s`` seconds (0: every round)."""

    def __init__(self, run: RunDir, replicate: int, ids: np.ndarray, fingerprint: dict, every_s: float):
        self.run = run
        self.path = checkpoint_path(replicate)
        self.ids = ids
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.every_s = every_s
        self.last = time.monotonic()

    def load(self) -> State | None:
        """The saved state, or None when there is none or it belongs to another ranking."""
        if not self.run.exists(self.path):
            return None
        table = self.run.read_table(self.path)
        meta = table.schema.metadata or {}
        if meta.get(FINGERPRINT_KEY, b"").decode() != self.fingerprint:
            log.warning(
                "ignoring %s: it was written for other inputs or settings", self.run.uri_of(self.path)
            )
            return None
        rows = np.searchsorted(self.ids, table["image_id"].to_numpy())
        chosen = table["chosen"].to_numpy(zero_copy_only=False)
        scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float32)
        sums = table["sum"].to_numpy(zero_copy_only=False)
        ranking = Ranking(
            rows[chosen],
            table["round"].to_numpy(zero_copy_only=False)[chosen].astype(np.int32),
            scores[chosen],
        )
        rest = ~chosen
        candidates = CandidateState(rows[rest], scores[rest], None if np.isnan(sums).all() else sums[rest])
        return State(ranking, candidates, meta.get(CAPPED_KEY) == b"1")

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last save."""
        return time.monotonic() - self.last >= self.every_s

    def save(self, state: State) -> None:
        """Write ``state`` atomically."""
        ranked, cands = state.ranking, state.candidates
        n_ranked, n_cands = len(ranked.order), len(cands.rows)
        sums = cands.sums if cands.sums is not None else np.full(n_cands, np.nan)
        table = pa.table(
            {
                "image_id": pa.array(self.ids[np.concatenate([ranked.order, cands.rows])]),
                "chosen": pa.array(np.arange(n_ranked + n_cands) < n_ranked),
                "round": pa.array(np.concatenate([ranked.round, np.full(n_cands, -1, np.int32)])),
                "score": pa.array(np.concatenate([ranked.score, cands.scores]).astype(np.float32)),
                "sum": pa.array(np.concatenate([np.full(n_ranked, np.nan), sums])),
            },
            schema=SCHEMA.with_metadata(
                {FINGERPRINT_KEY: self.fingerprint.encode(), CAPPED_KEY: b"1" if state.capped else b"0"}
            ),
        )
        self.run.write_table(self.path, table)
        self.last = time.monotonic()
        log.debug("checkpoint %s: %d ranked", self.run.uri_of(self.path), n_ranked)
