"""The GPU check of the approximate mode (benchmarks/gpu_check_approx.py) stays runnable: a CPU dry run, a loud refusal."""

from __future__ import annotations

import json

import pytest
from gpu_script import ROOT, is_measure, run_blocked  # tests/ is on sys.path (rootdir conftest)

SCRIPT = ROOT / "benchmarks" / "gpu_check_approx.py"
# What the GPU machine lacks besides FAISS (which this check needs, as the gpu extra's faiss-gpu)
ABSENT = ("ray", "s3fs", "threadpoolctl", "pandas", "yaml", "kubernetes")


def test_dry_run_measures_partitions_tiles_and_recall_without_ray(tmp_path) -> None:
    out = tmp_path / "gpu"
    proc = run_blocked(SCRIPT, ABSENT, "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_approx.json").read_text())
    assert result["dry_run"] and [s["n"] for s in result["sizes"]] == [3000, 6000]
    for size in result["sizes"]:
        assert size["partition_device"] == "cpu" and size["sample_size"] == 300
        # the same quality measure the stage reports: recall against a brute force on the sample
        assert 0.9 <= size["recall_at_k"] <= 1.0 and 0 < size["pair_fraction_computed"] < 1
        assert all(0 <= e < 0.1 for e in size["threshold_count_rel_error"].values())
        assert is_measure(size["partition_seconds"]) and is_measure(size["tile_seconds"])
    assert is_measure(result["seconds_total"]) and not list(out.glob("*.tmp"))


def _gpu_faiss() -> bool:
    import torch

    from enrich_dist.similarity import approx

    return torch.cuda.is_available() and approx.faiss_gpus()[0] > 0


@pytest.mark.skipif(
    _gpu_faiss(), reason="this machine has CUDA and a GPU FAISS: the refusal path is not reachable"
)
def test_without_a_gpu_faiss_it_refuses_and_says_why(tmp_path) -> None:
    out = tmp_path / "gpu"
    proc = run_blocked(SCRIPT, ABSENT, "--out", str(out))
    assert proc.returncode == 1
    result = json.loads((out / "gpu_approx.json").read_text())
    assert result["sizes"] == [] and result["error"] in proc.stderr and result["error"]
