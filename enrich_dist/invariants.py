"""Invariants checked at the end of every stage, read back from the stage's committed artifacts.

Each check streams over the stage's shards (a few columns at a time, never N x N) and returns a
small record for ``run.json``: row counts, duplicate ids, NaN values and ``ok``. A violated invariant
raises :class:`InvariantError`, whose message names the artifact, what is wrong and the command that
rebuilds it; the pipeline then clears the stage's done marker, so the stage is not taken as complete.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import schema
from .schema import (
    EMBEDDINGS_DIR,
    ENCODER_DIR,
    EVALUATION_DIR,
    EVALUATION_RESULTS,
    MANIFEST_DIR,
    NEIGHBORS_DIR,
    RANDOM_RANKING_PATH,
    RANKING_PATH,
    REPORT_DIR,
    SELECTION_DIR,
    SIMILARITY_DIR,
    SIMILARITY_SUMMARY,
)
from .storage import DONE_NAME, RunDir

EMBED_ERRORS_DIR = schema.EMBED_ERRORS_DIR
RANKINGS = (RANKING_PATH, RANDOM_RANKING_PATH)
NORM_TOLERANCE = 1e-3  # |norm - 1| above this is a non-normalised embedding
# the command that rebuilds each stage's artifacts, and the folder to delete first
COMMANDS = {
    "manifest": ("manifest --input SRC", MANIFEST_DIR),
    "train-encoder": ("train-encoder", ENCODER_DIR),
    "embed": ("embed", EMBEDDINGS_DIR),
    "similarity": ("similarity", SIMILARITY_DIR),
    "select": ("select", SELECTION_DIR),
    "evaluate": ("evaluate", EVALUATION_DIR),
    "report": ("report", REPORT_DIR),
}


class InvariantError(ValueError):
    """A stage's committed artifacts break an invariant; the message names them and the fix."""

    def __init__(self, run: RunDir, stage: str, problems: list[str], record: dict):
        command, folder = COMMANDS[stage]
        self.record = record
        super().__init__(
            f"stage {stage}: invariant violated in {run.uri_of(folder)}: {'; '.join(problems)}. "
            f"Delete {run.uri_of(folder)} and rerun `enrich {command} --output {run.uri}` "
            "(or start fresh with a new --output folder)"
        )


def _ids_of(run: RunDir, folder: str, column: str = "image_id") -> np.ndarray:
    """Every value of ``column`` in the committed shards of ``folder``, in shard order (int64)."""
    parts = [run.read_table(p, columns=[column])[column].to_numpy() for p in run.shards(folder).values()]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _duplicates(sorted_ids: np.ndarray) -> int:
    return int(np.count_nonzero(sorted_ids[1:] == sorted_ids[:-1])) if len(sorted_ids) else 0


def _float_values(column) -> np.ndarray:
    """The non-null values of a number or list-of-number column, flattened, as float64 (null: no neighbor)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(
        column.type
    ):
        column = column.flatten()
    return column.cast(pa.float64()).drop_null().to_numpy(zero_copy_only=False)


def _manifest_ok_ids(run: RunDir) -> np.ndarray:
    ok = []
    for path in run.shards(MANIFEST_DIR).values():
        table = run.read_table(path, columns=["image_id", "status"])
        ok.append(table.filter(pc.equal(table["status"], "ok"))["image_id"].to_numpy())
    return np.sort(np.concatenate(ok)).astype(np.int64) if ok else np.empty(0, np.int64)


def check_manifest(run: RunDir) -> tuple[dict, list[str]]:
    """Dense ids 0..N-1 in shard order, statuses ok/error with a reason for every error, counts as recorded."""
    rows = dup = bad_status = missing_reason = n_ok = 0
    problems: list[str] = []
    out_of_order = 0
    for path in run.shards(MANIFEST_DIR).values():
        table = run.read_table(path, columns=["image_id", "status", "error"])
        ids = table["image_id"].to_numpy()
        out_of_order += int(np.count_nonzero(ids != np.arange(rows, rows + len(ids))))
        rows += len(ids)
        status = table["status"]
        is_ok, is_error = pc.equal(status, "ok").fill_null(False), pc.equal(status, "error").fill_null(False)
        n_ok += int(pc.sum(is_ok).as_py() or 0)
        bad_status += int(pc.sum(pc.invert(pc.or_(is_ok, is_error))).as_py() or 0)
        missing_reason += int(pc.sum(pc.and_(is_error, pc.is_null(table["error"]))).as_py() or 0)
    all_ids = np.sort(_ids_of(run, MANIFEST_DIR))
    dup = _duplicates(all_ids)
    if rows == 0:
        problems.append("no rows")
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if out_of_order and not dup:
        problems.append(f"{out_of_order} image_ids are not the dense sequence 0..{rows - 1} in shard order")
    if bad_status:
        problems.append(f"{bad_status} rows with a status other than 'ok' or 'error'")
    if missing_reason:
        problems.append(f"{missing_reason} error rows without an error message")
    done = _done_stats(run, MANIFEST_DIR)
    if done and (done.get("n_images"), done.get("n_ok")) != (rows, n_ok):
        problems.append(
            f"{rows} rows ({n_ok} ok) but _SUCCESS records {done.get('n_images')} ({done.get('n_ok')} ok)"
        )
    return {"rows": rows, "ok_rows": n_ok, "duplicate_ids": dup, "nan": 0}, problems


def check_encoder(run: RunDir) -> tuple[dict, list[str]]:
    """The checkpoint loads (``weights_only``) and holds no NaN or infinite weight."""
    from .encoder import CHECKPOINTS, load_encoder

    present = [path for path in CHECKPOINTS.values() if run.exists(path)]
    if not present:
        return {"skipped": "no encoder (embedder needs none)"}, []
    checkpoint = present[0]
    model = load_encoder(run.read_bytes(checkpoint), name=checkpoint)
    n_params = nan = 0
    for tensor in model.state_dict().values():
        values = tensor.detach().float().numpy()
        n_params += values.size
        nan += int(np.count_nonzero(~np.isfinite(values)))
    problems = [f"{nan} NaN or infinite weights in {run.uri_of(checkpoint)}"] if nan else []
    return {"parameters": n_params, "nan": nan}, problems


def check_embed(run: RunDir) -> tuple[dict, list[str]]:
    """Embedded + failed = manifest ok rows, no id twice, every vector finite, unit-norm, one dimension."""
    rows = nan = not_unit = 0
    dims: set[int] = set()
    for path in run.shards(EMBEDDINGS_DIR).values():
        column = run.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        dims.add(column.type.list_size if hasattr(column.type, "list_size") else -1)
        if len(column) == 0:
            continue
        width = column.type.list_size
        x = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width).astype(np.float64)
        finite = np.isfinite(x).all(axis=1)
        nan += int(np.count_nonzero(~finite))
        not_unit += int(np.count_nonzero(np.abs(np.linalg.norm(x[finite], axis=1) - 1.0) > NORM_TOLERANCE))
        rows += len(column)
    ids = np.sort(_ids_of(run, EMBEDDINGS_DIR))
    failed = np.sort(_ids_of(run, schema.located(run, EMBED_ERRORS_DIR)))
    ok_ids = _manifest_ok_ids(run)
    problems = []
    dup = _duplicates(ids)
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if nan:
        problems.append(f"{nan} embeddings with NaN or infinite values")
    if not_unit:
        problems.append(f"{not_unit} embeddings are not L2-normalised")
    if len(dims) > 1:
        problems.append(f"shards of different embedding dimensions {sorted(dims)}")
    unknown = int(np.count_nonzero(~np.isin(ids, ok_ids)))
    if unknown:
        problems.append(f"{unknown} embedded image_ids are not ok rows of the manifest")
    both = int(np.count_nonzero(np.isin(ids, failed)))
    if both:
        problems.append(f"{both} image_ids are both embedded and listed as embed errors")
    accounted = len(np.union1d(ids, failed[np.isin(failed, ok_ids)]))
    if accounted != len(ok_ids):
        problems.append(
            f"{rows} embeddings + {len(failed)} embed errors do not cover the manifest's {len(ok_ids)} ok rows"
        )
    record = {
        "rows": rows,
        "manifest_ok_rows": int(len(ok_ids)),
        "errors": int(len(failed)),
        "dim": next(iter(dims)) if len(dims) == 1 else sorted(dims),
        "duplicate_ids": dup,
        "nan": nan,
    }
    return record, problems


def check_similarity(run: RunDir) -> tuple[dict, list[str]]:
    """One neighbor row per embedding, no id twice, finite similarities, neighbors among the embedded ids."""
    embedded = np.sort(_ids_of(run, EMBEDDINGS_DIR))
    rows = nan = stray = 0
    for path in run.shards(NEIGHBORS_DIR).values():
        table = run.read_table(path, columns=["max_sim", "nn_ids", "nn_sims"])
        rows += table.num_rows
        for name in ("max_sim", "nn_sims"):
            values = _float_values(table[name])
            nan += int(np.count_nonzero(np.isnan(values)))
        nn = table["nn_ids"].combine_chunks().flatten().fill_null(-1).to_numpy(zero_copy_only=False)
        nn = nn[nn >= 0]
        stray += int(np.count_nonzero(~np.isin(nn, embedded)))
    ids = np.sort(_ids_of(run, NEIGHBORS_DIR))
    dup = _duplicates(ids)
    problems = []
    if rows != len(embedded) or not np.array_equal(np.unique(ids), embedded):
        problems.append(f"{rows} neighbor rows for {len(embedded)} embeddings (or other image_ids)")
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if nan:
        problems.append(f"{nan} NaN similarities")
    if stray:
        problems.append(f"{stray} neighbor ids that are not embedded images")
    summary_path = SIMILARITY_SUMMARY
    summary = run.read_json(summary_path) if run.exists(summary_path) else {}
    if summary.get("n_images") != rows:
        problems.append(f"summary.json counts {summary.get('n_images')} images, the neighbor shards {rows}")
    return {"rows": rows, "embeddings": int(len(embedded)), "duplicate_ids": dup, "nan": nan}, problems


def check_select(run: RunDir) -> tuple[dict, list[str]]:
    """Every replicate of each ranking is a permutation of the ranked ids, ranked 0..N-1; no NaN score.

    The ranked ids are the embedded ones, within ``incremental/scope.parquet`` in an incremental run.
    """
    from .selection.inputs import scope_ids

    embedded = np.sort(_ids_of(run, EMBEDDINGS_DIR))
    scope = scope_ids(run)
    if scope is not None:
        embedded = embedded[np.isin(embedded, scope)]
    from .selection.inputs import scope_ids

    scope = scope_ids(run)  # an incremental run ranks its labelled and new images only
    if scope is not None:
        embedded = embedded[np.isin(embedded, scope)]
    problems, record = [], {"rows": int(len(embedded)), "duplicate_ids": 0, "nan": 0, "replicates": 0}
    for rel in RANKINGS:
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
            dup = _duplicates(got)
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


def check_evaluate(run: RunDir) -> tuple[dict, list[str]]:
    """One result per (task, method, budget, replicate); NaN metrics (e.g. AUC of a one-class test set) counted."""
    if not run.exists(EVALUATION_RESULTS):
        return {"rows": 0}, [f"{EVALUATION_RESULTS} is missing"]
    table = run.read_table(EVALUATION_RESULTS, columns=["task", "method", "budget", "replicate", "metric"])
    keys = table.group_by(["task", "method", "budget", "replicate"]).aggregate([([], "count_all")])
    dup = table.num_rows - keys.num_rows
    undefined = int(np.count_nonzero(np.isnan(table["metric"].fill_null(math.nan).to_numpy(zero_copy_only=False))))
    problems = [f"{dup} repeated (task, method, budget, replicate) results"] if dup else []
    if table.num_rows == 0:
        problems.append("no results")
    return {"rows": table.num_rows, "duplicate_ids": dup, "undefined_metric": undefined, "nan": 0}, problems


def check_report(run: RunDir) -> tuple[dict, list[str]]:
    """The page exists and is a complete HTML document."""
    index = posixpath.join(REPORT_DIR, "index.html")
    if not run.exists(index):
        return {"bytes": 0}, [f"{index} is missing"]
    data = run.read_bytes(index)
    problems = [] if data.rstrip().endswith(b"</html>") else [f"{index} is not a complete HTML page"]
    return {"bytes": len(data)}, problems


CHECKS: dict[str, Callable[[RunDir], tuple[dict, list[str]]]] = {
    "manifest": check_manifest,
    "train-encoder": check_encoder,
    "embed": check_embed,
    "similarity": check_similarity,
    "select": check_select,
    "evaluate": check_evaluate,
    "report": check_report,
}


def _done_stats(run: RunDir, folder: str) -> dict:
    marker = posixpath.join(folder, DONE_NAME)
    return run.read_json(marker) if run.exists(marker) else {}


def check_stage(run: RunDir, stage: str) -> dict:
    """The invariants record of ``stage`` (``ok`` true); raises :class:`InvariantError` when one is violated."""
    if stage not in CHECKS:
        raise ValueError(f"no invariants for stage {stage!r}; stages: {', '.join(CHECKS)}")
    record, problems = CHECKS[stage](run)
    record["ok"] = not problems
    if problems:
        raise InvariantError(run, stage, problems, record)
    return record
