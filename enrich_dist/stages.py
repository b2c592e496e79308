"""Every stage, declared once: name (the command), folder, config section, operational settings, inputs,
and the entry points the executor calls (``executor.py``). Adding a stage is its own module plus one
record here. Nothing here imports a stage: entry points are strings, loaded on first use."""

from __future__ import annotations

from . import schema
from .executor import Stage

_M = "enrich_dist."
MANIFEST = Stage(
    "manifest", schema.MANIFEST_DIR, "manifest", compute=_M + "manifest:compute_manifest",
    check=_M + "manifest:check_manifest", when_done=_M + "manifest:manifest_matches",
    operational=frozenset({"shard_size"}), rebuild="manifest --input SRC",
)
TRAIN_ENCODER = Stage(
    "train-encoder", schema.ENCODER_DIR, "encoder", compute=_M + "encoder.train:compute_encoder",
    check=_M + "encoder.train:check_encoder", when_done=_M + "encoder.train:encoder_matches",
    cleanup=_M + "encoder.train:remove_train_state", operational=frozenset({"device"}), needs=("manifest",),
)
EMBED = Stage(
    "embed", schema.EMBEDDINGS_DIR, "embed", compute=_M + "embed:compute_embeddings", check=_M + "embed:check_embed",
    when_done=_M + "embed:embeddings_match",
    operational=frozenset({"batch_size", "num_actors", "decode_threads", "device"}), needs=("manifest",),
)
SIMILARITY = Stage(
    "similarity", schema.SIMILARITY_DIR, "similarity", compute=_M + "similarity.stage:compute_stage",
    check=_M + "similarity.stage:check_similarity", cleanup=_M + "similarity.stage:remove_partials",
    prepare=_M + "similarity.stage:prepare_stage",
    operational=frozenset({"block_size", "max_memory", "device", "kernel", "checkpoint_seconds"}), needs=("embed",),
)
SELECT = Stage(
    "select", schema.SELECTION_DIR, "select", compute=_M + "selection.stage:compute_selection",
    check=_M + "selection.stage:check_select", operational=frozenset({"workers", "device", "bound_cells", "checkpoint_seconds"}),
    needs=("embed",),
)
EVALUATE = Stage(
    "evaluate", schema.EVALUATION_DIR, None, compute=_M + "evaluation.stage:compute_evaluation",
    check=_M + "evaluation.stage:check_evaluate", marker=_M + "evaluation.stage:evaluation_marker",
    needs=("select",), always_compute=True,
)
REPORT = Stage("report", None, None, compute=_M + "report.stage:compute_report", check=_M + "report.stage:check_report")
# only in runs with --previous-run: after the manifest, it compares with the previous run (incremental.py)
INCREMENTAL = Stage(
    "incremental", schema.INCREMENTAL_DIR, None, compute=_M + "incremental:compute_incremental",
    check=_M + "incremental:check_incremental", when_done=_M + "incremental:incremental_matches",
    needs=("manifest",), rebuild="run --previous-run OLD",
)

# the pipeline's order
PIPELINE = (MANIFEST, TRAIN_ENCODER, EMBED, SIMILARITY, SELECT, EVALUATE, REPORT)
REGISTRY = {s.name: s for s in (*PIPELINE, INCREMENTAL)}


def stage(name: str) -> Stage:
    """The record of stage ``name``; an unknown name lists the stages."""
    if name not in REGISTRY:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in PIPELINE)}")
    return REGISTRY[name]
