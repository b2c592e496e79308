"""The GPU similarity check (benchmarks/gpu_check_similarity.py) stays runnable: its import chain and a CPU dry run."""

from __future__ import annotations

import json
import subprocess

import pytest
from gpu_script import ROOT, is_measure, run_blocked  # tests/ is on sys.path (rootdir conftest)

from enrich_dist.schema import SIMILARITY_DIR
from enrich_dist.similarity import reduce

SCRIPT = ROOT / "benchmarks" / "gpu_check_similarity.py"
# What the GPU machine lacks: importing any of these (or anything under them) fails there.
ABSENT = ("ray", "pyarrow", "fsspec", "s3fs", "faiss", "threadpoolctl", "pandas", "yaml", "kubernetes")

def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_blocked(SCRIPT, ABSENT, *args)


def test_partials_dir_is_under_the_similarity_dir() -> None:
    assert reduce.PARTIALS_DIR.startswith(SIMILARITY_DIR + "/")


def test_dry_run_without_ray_pyarrow_fsspec_or_threadpoolctl(tmp_path) -> None:
    """Every part of the check runs with torch on the CPU, with only torch, numba and numpy importable."""
    out = tmp_path / "gpu"
    proc = run_script("--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_similarity.json").read_text())
    assert result["dry_run"] and result["small_awkward"]["all_exact"]
    # fp32 torch and the compiled kernel on the same CPU: the same GEMM inputs, so the same results
    fp32 = result["n1500_vs_cpu_fp32"]
    assert fp32["recall_at_k"] == 1.0 and fp32["histogram_l1_share"] < 1e-4
    for p in ("bf16", "fp16"):
        err = result["half_precision_error_vs_fp32"][p]
        assert 0.5 < err["recall_at_k"] <= 1.0 and 0 < err["max_sim_abs_error"] < 0.05
    timed = {(t["n"], t["variant"]) for t in result["timings"] if "stage_seconds" in t}
    assert timed == {(n, p) for n in (1500, 600, 1200) for p in ("fp32", "triton", "bf16", "fp16")}
    # the fused kernel (Triton's interpreter here) against torch on the same products: the same results
    fused = result["n1500_triton_vs_torch_fp32"]
    assert fused["recall_at_k"] == 1.0 and fused["histogram_l1_share"] < 1e-4
    # timings are checked for presence and type only: how fast a machine is is no test's business
    assert all(is_measure(t["stage_seconds"]) and is_measure(t["gemm_seconds"]) for t in result["timings"])
    assert is_measure(result["seconds_total"]) and not list(out.glob("*.tmp"))


def gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_similarity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_skips_timings_that_would_not_fit(tmp_path) -> None:
    """A timing projected past the budget is not run; its entry says why and gives the labelled extrapolation."""
    gpu_check = gpu_check_module()
    last = {"fp32": {"n": 100, "stage_seconds": 0.5, "gemm_seconds": 0.25}}
    result = {"timings": []}
    gpu_check.time_sizes(str(tmp_path), result, [400, 200], ("fp32", "bf16"), last, 64, "cpu", budget_seconds=0.0)
    timings = result["timings"]
    assert [(t["n"], t["precision"]) for t in timings] == [(200, "fp32"), (200, "bf16"), (400, "fp32"), (400, "bf16")]
    # fp32 has a measurement to project from, so it is skipped with the extrapolation (N^2 from N=100)
    assert "budget" in timings[0]["skipped"] and timings[0]["extrapolated_stage_seconds"] == 2.0
    assert timings[2]["skipped"] and timings[2]["extrapolated_gemm_seconds"] == 4.0
    # bf16 has nothing to project from: it runs at the smallest N, and N=400 is then projected from it
    assert is_measure(timings[1]["stage_seconds"]) and last["bf16"]["n"] == 200
    assert "from N=200" in timings[3]["skipped"]
    on_disk = json.loads((tmp_path / "gpu_similarity.json").read_text())
    assert on_disk["timings"] == timings


@pytest.mark.parametrize("sizes", ["45460,x", "1"])
def test_bad_sizes_are_named(tmp_path, monkeypatch, capsys, sizes: str) -> None:
    gpu_check = gpu_check_module()
    monkeypatch.setattr("sys.argv", ["gpu_check_similarity.py", "--out", str(tmp_path), "--sizes", sizes])
    with pytest.raises(SystemExit) as exc:
        gpu_check.main()
    assert exc.value.code == 2 and "--sizes" in capsys.readouterr().err


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has CUDA: the no-CUDA failure path is not reachable"
)
def test_without_cuda_it_fails_loudly_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    gpu_check = gpu_check_module()
    monkeypatch.setattr("sys.argv", ["gpu_check_similarity.py", "--out", str(tmp_path / "gpu")])
    assert gpu_check.main() == 1
    assert "FAILED: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()
