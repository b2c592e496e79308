"""The whole pipeline end to end through the command line, on the shared local Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from enrich_dist import schema
from enrich_dist.cli import main
from enrich_dist.storage import RunDir


def _mtimes(run: RunDir, rel: str) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(run.path(rel)):
        for name in files:
            out[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return out


@pytest.mark.slow
def test_demo_end_to_end_then_resume(ray_local, tmp_path, caplog):
    out = str(tmp_path / "demo")
    args = ["demo", "--output", out, "--images", "150", "--epochs", "2", "--sample", "100", "--replicates", "2",
            "--block-size", "37", "--budgets", "0.1,0.5,1.0"]
    assert main(args) == 0
    run = RunDir(out)
    for stage in ("manifest", "encoder", "embeddings", "similarity", "selection"):
        assert run.is_done(stage), stage
    manifest = run.read_table(schema.MANIFEST_DIR)
    assert manifest.num_rows == 150 and pc.all(pc.equal(manifest["status"], "ok")).as_py()
    assert manifest["patient_id"].null_count == 0 and set(manifest["label"].to_pylist()) == {"A4C", "NT"}
    assert run.read_table(schema.EMBEDDINGS_DIR).num_rows == 150
    summary = run.read_json("similarity/summary.json")
    assert summary["n_images"] == 150 and summary["n_pairs"] == 150 * 149 // 2
    assert sum(summary["histogram"]["counts"]) == summary["n_pairs"]
    ranking = run.read_table("selection/ranking.parquet")
    for r in (0, 1):
        ids = ranking.filter(pc.equal(ranking["replicate"], r))["image_id"].to_pylist()
        assert sorted(ids) == list(range(150))
    state = run.read_json("run.json")
    assert list(state["stages"]) == ["manifest", "train-encoder", "embed", "similarity", "select", "evaluate", "report"]
    stats = run.read_json("evaluation/stats.json")
    assert stats
    assert state["config"]["select"]["replicates"] == 2 and "ray" in state["versions"]
    html = open(run.path("report/index.html"), encoding="utf-8").read()
    assert "Redundancy" in html or "redundancy" in html

    # a rerun recomputes nothing: every committed artifact keeps its bytes and mtime
    before = {rel: _mtimes(run, rel) for rel in ("manifest", "encoder", "embeddings", "similarity", "selection", "evaluation")}
    caplog.clear()
    assert main(args) == 0
    after = {rel: _mtimes(run, rel) for rel in before}
    assert after == before
    # skipped stages keep the timings of the run that computed them
    rerun_state = run.read_json("run.json")
    for stage in ("manifest", "train-encoder", "embed", "similarity", "select", "evaluate"):
        assert rerun_state["stages"][stage] == state["stages"][stage]


def test_demo_profile_reaches_the_archive(tmp_path, monkeypatch):
    """`enrich demo --profile uneven` makes the uneven synthetic archive (default: uniform) and runs every stage."""
    import enrich_dist.cli as cli
    import enrich_dist.datasets as datasets

    made, ran = [], []
    monkeypatch.setattr(datasets, "make_echo_archive", lambda out, n, seed, **kw: made.append((n, seed, kw["profile"])))
    monkeypatch.setattr(cli, "run_stages", lambda cfg, stages, options: ran.append((cfg, stages)) or {})
    assert main(["demo", "--output", str(tmp_path / "a"), "--images", "40", "--profile", "uneven"]) == 0
    assert main(["demo", "--output", str(tmp_path / "b"), "--images", "40"]) == 0
    assert made == [(40, 0, "uneven"), (40, 0, "uniform")]
    assert ran[0][1] == cli.STAGES and ran[0][0].input.endswith("archive/manifest.csv")
    assert ran[0][0].embed.embedder == "contrastive" and ran[0][0].select.mode == "exact"
    # the demo's evaluation model: the small CNN at 16 pixels, 2 channels (neither saturated nor weak there)
    evaluate = ran[0][0].evaluate
    assert (evaluate.model, evaluate.image_size, evaluate.width) == ("cnn", 16, 2)


def test_stage_without_inputs_names_the_command(ray_local, tmp_path, caplog):
    assert main(["similarity", "--output", str(tmp_path / "empty")]) == 3  # run-dir data
    assert "enrich embed" in caplog.text


def test_bad_option_value_is_named(tmp_path, caplog):
    assert main(["select", "--output", str(tmp_path), "--budgets", "0.2,-4"]) == 2
    assert "--budgets" in caplog.text


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "enrich_dist", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "run", "manifest", "train-encoder", "embed", "similarity", "select", "report"):
        assert command in out.stdout


PREPARED: list[str] = []


def record_prepare(ctx) -> None:
    PREPARED.append(ctx.config.similarity.mode)


def test_prepare_starts_only_stages_that_will_compute(run_dir) -> None:
    """Stages that will compute get their set-up started up front; a done stage is left alone."""
    from enrich_dist.config import RunConfig
    from enrich_dist.executor import Context, Stage, prepare

    hook = "test_pipeline:record_prepare"
    todo = Stage("a", "a", None, compute="x:y", prepare=hook)
    done = Stage("b", "b", None, compute="x:y", prepare=hook)
    always = Stage("c", "b", None, compute="x:y", prepare=hook, always_compute=True)
    run_dir.mark_done("b", {})
    PREPARED.clear()
    prepare([todo, done, always, Stage("d", "d", None, compute="x:y")], run_dir, Context(RunConfig()))
    assert PREPARED == ["exact", "exact"]


def test_similarity_prepares_numba_workers(ray_local) -> None:
    from enrich_dist import stages
    from enrich_dist.config import RunConfig, SimilarityConfig
    from enrich_dist.executor import Context, resolve

    assert stages.SIMILARITY.prepare
    resolve(stages.SIMILARITY.prepare)(Context(RunConfig(similarity=SimilarityConfig(device="cpu"))))
    # a setting the stage refuses is left for the stage to report
    resolve(stages.SIMILARITY.prepare)(Context(RunConfig(similarity=SimilarityConfig(device="cuda"))))
