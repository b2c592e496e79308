"""Arrow schemas of the artifacts every stage exchanges (the contract in DESIGN.md)."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_DIR = "manifest"
ENCODER_DIR = "encoder"
EMBEDDINGS_DIR = "embeddings"
SIMILARITY_DIR = "similarity"
NEIGHBORS_DIR = "similarity/neighbors"
EDGES_DIR = "similarity/edges"
# side files live beside their stage folder, so that a stage folder holds only its Parquet shards
# (and _SUCCESS): pandas.read_parquet, pyarrow.dataset and ray.data.read_parquet read it whole
MANIFEST_FILES = "manifest_files/files.parquet"
EMBEDDER_IDENTITY = "embeddings_meta/embedder.json"
EMBED_ERRORS_DIR = "embeddings_errors"
EMBED_REUSED_DIR = "embeddings_meta/reused"
# where run dirs of format 1 (before 2026-12-03) kept them
FORMAT_1_PATHS = {
    MANIFEST_FILES: "manifest/files.parquet",
    EMBEDDER_IDENTITY: "embeddings/embedder.json",
    EMBED_ERRORS_DIR: "embeddings/errors",
    EMBED_REUSED_DIR: "embeddings/reused",
}


def located(run, rel: str) -> str:
    """``rel`` in ``run``, or where a format-1 run dir kept it when only that exists (reading old runs)."""
    old = FORMAT_1_PATHS.get(rel)
    if old is not None and not run.exists(rel) and run.exists(old):
        return old
    return rel
SELECTION_DIR = "selection"
EVALUATION_DIR = "evaluation"
REPORT_DIR = "report"
INCREMENTAL_DIR = "incremental"
RUN_JSON = "run.json"  # the run record: config, versions, each stage's timings, stats and invariants
# files inside the stage folders, spelled here only
ENCODER_TRAIN_STATS = "encoder/train.json"  # the training record, with the encoder model
ENCODER_RECONSTRUCTIONS = "encoder/reconstructions.png"  # beta-VAE: held-out images over their reconstructions
ENCODER_VIEWS = "encoder/views.png"  # contrastive: held-out images over one training view each
REPORT_INDEX = "report/index.html"
SIMILARITY_SUMMARY = "similarity/summary.json"
DUPLICATES_DIR = "duplicates"  # t=0.90/groups.parquet, t=0.90/remove.parquet (the similarity stage's)
LEAKAGE_PATH = "duplicates/leakage.parquet"
RANKING_PATH = "selection/ranking.parquet"
RANDOM_RANKING_PATH = "selection/random_ranking.parquet"
SUBSETS_PATH = "selection/subsets.parquet"
SELECTION_STATS = "selection/selection.json"
RANKED_REMOVAL_DIR = "selection/remove"  # t=0.90.parquet: near-duplicates to drop, keeping the ranking's first
SCOPE_PATH = "incremental/scope.parquet"


def threshold_folder(t: float) -> str:
    """``duplicates/t=0.90``: the folder of one threshold's groups and removal list (the similarity stage's)."""
    return f"duplicates/t={t:.2f}" if round(t, 2) == t else f"duplicates/t={t:g}"

MANIFEST = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("patient_id", pa.string()),
        ("clip_id", pa.string()),
        ("frame", pa.int32()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("mask_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

OPTIONAL_MANIFEST_COLUMNS = ("patient_id", "clip_id", "frame", "label", "split", "mask_uri")


def embeddings_schema(dim: int) -> pa.Schema:
    """``image_id`` and an L2-normalised float32 vector of length ``dim``."""
    return pa.schema([("image_id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])


EMBED_ERRORS = pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("error", pa.string())])


def neighbors_schema(thresholds: tuple[float, ...] | list[float]) -> pa.Schema:
    """Per-image nearest neighbors and threshold counts."""
    fields = [
        ("image_id", pa.int64()),
        ("max_sim", pa.float32()),
        ("nn_ids", pa.list_(pa.int64())),
        ("nn_sims", pa.list_(pa.float32())),
    ]
    fields += [(threshold_column(t), pa.int64()) for t in thresholds]
    return pa.schema(fields)


def threshold_column(t: float) -> str:
    """Column name of the count of neighbors strictly above ``t`` (``n_above_0.7``)."""
    return f"n_above_{t:g}"


RANKING = pa.schema(
    [
        ("replicate", pa.int32()),
        ("rank", pa.int64()),
        ("image_id", pa.int64()),
        ("is_seed", pa.bool_()),
        ("round", pa.int32()),
        ("score", pa.float32()),
    ]
)

SUBSETS = pa.schema(
    [
        ("method", pa.string()),
        ("replicate", pa.int32()),
        ("budget", pa.float64()),
        ("n_images", pa.int64()),
        ("n_patients", pa.int64()),
        ("n_clips", pa.int64()),
        ("label_counts", pa.map_(pa.string(), pa.int64())),
        ("n_repeats", pa.int64()),  # images repeating an earlier one (same clip, else a near-duplicate); null: unmeasured
    ]
)

EVALUATION_RESULTS = "evaluation/results.parquet"
EVALUATION_STATS = "evaluation/stats.json"

REMOVE_SCHEMA = pa.schema([("image_id", pa.int64()), ("kept_image_id", pa.int64()), ("sim", pa.float32())])  # a removal list: image dropped, the kept image above t, their similarity

RESULT = pa.schema(
    [
        ("task", pa.string()),
        ("method", pa.string()),
        ("budget", pa.float64()),
        ("replicate", pa.int32()),
        ("n_train", pa.int64()),
        ("n_test", pa.int64()),
        ("metric", pa.float64()),
        ("metric_name", pa.string()),
        ("model", pa.string()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("config_hash", pa.string()),
    ]
)
