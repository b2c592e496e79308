"""The similarity benchmark stays runnable and writes the record the README quotes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import similarity as bench


def test_similarity_benchmark_writes_a_comparable_record(ray_local, tmp_path, monkeypatch) -> None:
    out = tmp_path / "bench.jsonl"
    monkeypatch.setattr("sys.argv", ["similarity.py", "--n", "3001", "--repeats", "2", "--out", str(out)])
    bench.main()
    bench.main()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["n"] == 3001 and r["mode"] == "exact" and len(r["stage_runs"]) == len(r["gemm_runs"]) == 2
        # seconds are rounded to the millisecond in the record, the ratio (to 0.001) is not
        # no assertion on how fast anything ran: only that the numbers are there, and consistent
        s, g = min(r["stage_runs"]), min(r["gemm_runs"])
        assert r["stage_seconds"] == s and r["gemm_seconds"] == g and s >= 0 and g >= 0
        assert all(isinstance(r[key], float) and r[key] >= 0 for key in ("ratio", "cpu_ratio"))
        if g >= 0.002:  # the interval below needs a rounded GEMM time well above its rounding step
            assert (s - 0.0005) / (g + 0.0005) - 0.0005 <= r["ratio"] <= (s + 0.0005) / (g - 0.0005) + 0.0005
        assert r["peak_mib"] > 0
        assert r["commit"] != "unknown" and r["commit"].split("+")[0].isalnum()


def test_source_version_outside_git(monkeypatch) -> None:
    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(subprocess, "run", no_git)
    assert bench.source_version() == "unknown"


def test_cold_similarity_benchmark_records_stage_seconds_from_run_json(ray_local, tmp_path, monkeypatch) -> None:
    from benchmarks import similarity_cold

    out = tmp_path / "cold.jsonl"
    monkeypatch.setattr("sys.argv", ["similarity_cold.py", "--n", "2003", "--repeats", "1", "--out", str(out)])
    similarity_cold.main()
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["n"] == 2003 and len(record["stage_runs"]) == 1 and len(record["gemm_runs"]) == 2
    assert record["stage_seconds"] > 0 and record["command_seconds"] >= record["stage_seconds"]
    # 2 % exact copies: at least that many pairs above 0.9, all in the edge list
    assert record["edges"] == record["pairs_above_0.9"] >= int(0.02 * 2003)


def test_selection_quality_scores_with_the_evaluation_stages_networks() -> None:
    import numpy as np

    from benchmarks import selection_quality

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    images = rng.random((80, 64, 64)).astype(np.float32) * 0.2
    images[labels == 1, 16:48, 16:48] += 0.7  # a bright square: class 1
    small = selection_quality.stage_images(images)
    assert small.shape == (80, 32, 32) and small.dtype == np.uint8
    train, test = np.arange(0, 80, 2), np.arange(1, 80, 2)
    assert selection_quality.stage_auc("cnn", small, labels, train, test, seed=0) > 0.95
    assert selection_quality.stage_auc("linear", small, labels, train, test, seed=0) > 0.95


def test_embed_benchmark_runs_the_default_embedder(tmp_path) -> None:
    """The embedding benchmark runs end to end with the default (contrastive) encoder and writes its record."""
    import sys

    out = tmp_path / "embed.jsonl"
    proc = subprocess.run(
        [sys.executable, "-P", "benchmarks/embed.py", "--images", "300", "--work", str(tmp_path / "w"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["images"] == 300 and record["embedder"] == "contrastive"
    assert record["ratio_stage_to_decode"] > 0 and record["stage_images_per_s"] > 0


def test_selection_quality_paired_test_counts_wins_and_drops_missing_replicates() -> None:
    from benchmarks import selection_quality

    base = [0.80, 0.85, 0.90, 0.70, 0.75, 0.60, 0.95, 0.82, 0.88, 0.66]
    ahead = [b + 0.01 * (i + 1) for i, b in enumerate(base)]
    p, wins = selection_quality.paired_test(ahead, base)
    assert wins == 10 and p == pytest.approx(2 / 2**10)  # exact two-sided signed-rank p, all ten ahead
    assert selection_quality.paired_test(base, base) == (1.0, 0)
    p, wins = selection_quality.paired_test([*ahead[:9], float("nan")], base)
    assert wins == 9 and p == pytest.approx(2 / 2**9)


def test_scale_benchmark_imports_bring_your_own_embeddings_then_runs_the_stages(tmp_path, monkeypatch) -> None:
    """Cold commands (their own local Ray each): the byo import, approximate similarity, selection (cells), export."""
    from benchmarks import scale

    out, run = tmp_path / "scale.jsonl", tmp_path / "run"
    monkeypatch.setattr("sys.argv", [
        "scale.py", "--images", "2500", "--per-cluster", "50", "--shard-rows", "700", "--export-n", "100",
        "--stages", "embed,similarity,select,export", "--select-mode", "cells", "--cell-size", "500",
        "--run", str(run), "--out", str(out),
    ])
    scale.main()
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["stage"] for s in record["stages"]] == ["embed", "similarity", "select", "export"]
    assert all(s["returncode"] == 0 and s["peak_gib"] >= 0 for s in record["stages"]), record["stages"]
    assert any("imported 2500 embeddings of dim 128" in line for line in record["stages"][0]["log"])
    assert record["similarity"]["mode"] == "approx" and record["similarity"]["approx"]["recall_at_k"] > 0.9
    assert record["selection"]["cells"]["n_cells"] == 5 and record["selection"]["replicate_seconds"][0] > 0
    assert len((run / "next.csv").read_text().splitlines()) == 101  # header + the first 100 ranked images
