"""Invariants read back at the end of every stage: recorded in run.json, and broken artifacts caught."""

from __future__ import annotations

import copy
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from enrich_dist import schema
from enrich_dist.config import EncoderConfig, RunConfig
from enrich_dist.encoder import BetaVAE, encoder_bytes
from enrich_dist.invariants import InvariantError
from enrich_dist.pipeline import check_stage, run_stages
from enrich_dist.storage import RunDir

N_GOOD = 12
STAGES = ("manifest", "train-encoder", "embed", "similarity", "select", "report")


def tiny_archive(root, n=N_GOOD, seed=0):
    """``n`` distinct random-texture PNGs plus one corrupt file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(buf, format="PNG")
        (root / f"img{i:02d}.png").write_bytes(buf.getvalue())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def tiny_config(archive, output) -> RunConfig:
    cfg = RunConfig(input=str(archive), output=str(output))
    cfg.embed.embedder, cfg.embed.pixel_size = "pixels", 8
    cfg.similarity.top_k = 3
    cfg.select.replicates, cfg.select.budgets, cfg.select.seed_size, cfg.select.batch_size = 2, (0.5, 1.0), 2, 3
    return cfg


@pytest.fixture(scope="module")
def good_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("invariants")
    cfg = tiny_config(tiny_archive(root / "archive"), root / "run")
    run_stages(cfg, STAGES)
    return root / "run", cfg


@pytest.fixture
def copy_run(good_run, tmp_path):
    """A private copy of the good run dir to break."""
    src, _ = good_run
    shutil.copytree(src, tmp_path / "run")
    return RunDir(str(tmp_path / "run"))


def _rewrite(run: RunDir, rel: str, change) -> None:
    table = pq.read_table(run.path(rel))
    pq.write_table(change(table), run.path(rel))


def test_every_stage_records_its_invariants(good_run):
    path, _ = good_run
    stages = json.loads((path / "run.json").read_text())["stages"]
    assert all(stages[s]["invariants"]["ok"] for s in STAGES)
    assert stages["manifest"]["invariants"] == {"rows": N_GOOD + 1, "ok_rows": N_GOOD, "duplicate_ids": 0, "nan": 0,
                                               "ok": True}
    assert stages["embed"]["invariants"]["rows"] == N_GOOD and stages["embed"]["invariants"]["dim"] == 64
    assert stages["similarity"]["invariants"]["rows"] == N_GOOD and stages["similarity"]["invariants"]["nan"] == 0
    assert stages["select"]["invariants"]["replicates"] == 2 and stages["select"]["invariants"]["duplicate_ids"] == 0


def _duplicate_first_id(table: pa.Table) -> pa.Table:
    ids = table["image_id"].to_numpy().copy()
    ids[1] = ids[0]
    return table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.int64()))


def _nan_embedding(table: pa.Table) -> pa.Table:
    x = np.asarray(table["embedding"].combine_chunks().flatten().to_numpy(), np.float32).copy()
    x[3] = np.nan
    dim = table.schema.field("embedding").type.list_size
    return table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x), dim))


@pytest.mark.parametrize(
    "stage, rel, change, message",
    [
        ("manifest", "manifest/part-00000.parquet", _duplicate_first_id, "1 duplicate image_ids"),
        ("embed", "embeddings/part-00000.parquet", _duplicate_first_id, "1 duplicate image_ids"),
        ("embed", "embeddings/part-00000.parquet", _nan_embedding, "1 embeddings with NaN"),
        ("embed", "embeddings/part-00000.parquet", lambda t: t.slice(1), "do not cover the manifest's 12 ok rows"),
        ("similarity", "similarity/neighbors/part-00000.parquet", lambda t: t.slice(1), "11 neighbor rows for 12"),
        ("select", "selection/ranking.parquet", _duplicate_first_id, "replicate 0 is not a permutation"),
        ("select", "selection/random_ranking.parquet", lambda t: t.slice(2), "random_ranking.parquet replicate 0"),
    ],
)
def test_broken_artifact_fails_its_check(copy_run, stage, rel, change, message):
    assert check_stage(copy_run, stage)["ok"]
    _rewrite(copy_run, rel, change)
    with pytest.raises(InvariantError, match=message) as err:
        check_stage(copy_run, stage)
    assert copy_run.uri in str(err.value) and f"enrich {stage.split('-')[0]}" in str(err.value)
    assert err.value.record["ok"] is False


def test_embeddings_of_another_dimension_are_caught(copy_run):
    other = pa.table({"image_id": pa.array([], pa.int64()),
                      "embedding": pa.array([], pa.list_(pa.float32(), 5))})
    pq.write_table(other, copy_run.path("embeddings/part-00001.parquet"))
    with pytest.raises(InvariantError, match=r"different embedding dimensions \[5, 64\]"):
        check_stage(copy_run, "embed")


def test_truncated_report_is_caught(copy_run):
    page = copy_run.path("report/index.html")
    data = open(page, "rb").read()
    open(page, "wb").write(data[: len(data) // 2])
    with pytest.raises(InvariantError, match="not a complete HTML page"):
        check_stage(copy_run, "report")


def test_nan_encoder_weights_are_caught(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    torch.manual_seed(0)
    model = BetaVAE(8, 64)
    run.write_bytes("encoder/vae.pt", encoder_bytes(model, EncoderConfig(latent_dim=8)))
    assert check_stage(run, "train-encoder")["nan"] == 0
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    run.write_bytes("encoder/vae.pt", encoder_bytes(model, EncoderConfig(latent_dim=8)))
    with pytest.raises(InvariantError, match="NaN or infinite weights"):
        check_stage(run, "train-encoder")


def test_repeated_evaluation_results_are_caught(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    row = {"task": "classification", "method": "enrich", "budget": 0.5, "replicate": 0, "n_train": 5, "n_test": 2,
           "metric": float("nan"), "metric_name": "auc", "model": "cnn", "seconds": 1.0, "device": "cpu",
           "config_hash": "x"}
    run.write_table(schema.EVALUATION_RESULTS, pa.Table.from_pylist([row], schema=schema.RESULT))
    assert check_stage(run, "evaluate") == {"rows": 1, "duplicate_ids": 0, "undefined_metric": 1, "nan": 0, "ok": True}
    run.write_table(schema.EVALUATION_RESULTS, pa.Table.from_pylist([row, row], schema=schema.RESULT))
    with pytest.raises(InvariantError, match=r"1 repeated \(task, method, budget, replicate\)"):
        check_stage(run, "evaluate")


def test_violation_in_a_run_leaves_the_stage_not_done(good_run, tmp_path, monkeypatch):
    """A select stage that commits a ranking missing an image fails and is not marked done."""
    src, cfg = good_run
    cfg = copy.deepcopy(cfg)
    shutil.copytree(src, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    run.remove(schema.SELECTION_DIR)
    state = json.loads(open(run.path("run.json")).read())
    del state["stages"]["select"]
    run.write_json("run.json", state)
    from enrich_dist.selection import stage as select_stage

    honest = select_stage._ranking_table
    monkeypatch.setattr(select_stage, "_ranking_table", lambda rankings, ids: honest(rankings, ids).slice(1))
    cfg.output = run.uri
    with pytest.raises(InvariantError, match="ranking.parquet replicate 0 is not a permutation"):
        run_stages(cfg, ("select",))
    assert not run.is_done(schema.SELECTION_DIR)
    assert "select" not in run.read_json("run.json")["stages"]


def test_rerun_over_a_broken_stage_fails_and_unmarks_it(good_run, tmp_path):
    src, cfg = good_run
    cfg = copy.deepcopy(cfg)
    shutil.copytree(src, tmp_path / "run")
    run = RunDir(str(tmp_path / "run"))
    _rewrite(run, "similarity/neighbors/part-00000.parquet", lambda t: t.slice(2))
    cfg.output = run.uri
    with pytest.raises(InvariantError, match=r"Delete .*similarity and rerun `enrich similarity"):
        run_stages(cfg, ("similarity",))
    assert not run.is_done(schema.SIMILARITY_DIR) and run.is_done(schema.EMBEDDINGS_DIR)
