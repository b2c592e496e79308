"""Read-back invariants: the shared error and helpers of every stage's ``check`` (each stage keeps its own).

Each check streams over the stage's shards (a few columns at a time, never N x N) and returns a
small record for ``run.json`` (row counts, duplicate ids, NaN values) and the problems it found. A
problem raises :class:`InvariantError` in the executor, whose message names the artifact, what is
wrong and the command that rebuilds it; the executor then clears the stage's done marker, so the
stage is not taken as complete.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import MANIFEST_DIR
from .storage import RunDir

NORM_TOLERANCE = 1e-3  # |norm - 1| above this is a non-normalised embedding


class InvariantError(ValueError):
    """A stage's committed artifacts break an invariant; the message names them and the fix."""

    def __init__(
        self, run: RunDir, stage: str, problems: list[str], record: dict, folder: str | None = None,
        command: str | None = None,
    ):
        folder, command = folder or stage, command or stage
        self.record = record
        super().__init__(
            f"stage {stage}: invariant violated in {run.uri_of(folder)}: {'; '.join(problems)}. "
            f"Delete {run.uri_of(folder)} and rerun `enrich {command} --output {run.uri}` "
            "(or start fresh with a new --output folder)"
        )


def ids_of(run: RunDir, folder: str, column: str = "image_id") -> np.ndarray:
    """Every value of ``column`` in the committed shards of ``folder``, in shard order (int64)."""
    parts = [run.read_table(p, columns=[column])[column].to_numpy() for p in run.shards(folder).values()]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def count_duplicates(sorted_ids: np.ndarray) -> int:
    return int(np.count_nonzero(sorted_ids[1:] == sorted_ids[:-1])) if len(sorted_ids) else 0


def float_values(column) -> np.ndarray:
    """The non-null values of a number or list-of-number column, flattened, as float64 (null: no neighbor)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(
        column.type
    ):
        column = column.flatten()
    return column.cast(pa.float64()).drop_null().to_numpy(zero_copy_only=False)


def manifest_ok_ids(run: RunDir) -> np.ndarray:
    ok = []
    for path in run.shards(MANIFEST_DIR).values():
        table = run.read_table(path, columns=["image_id", "status"])
        ok.append(table.filter(pc.equal(table["status"], "ok"))["image_id"].to_numpy())
    return np.sort(np.concatenate(ok)).astype(np.int64) if ok else np.empty(0, np.int64)
