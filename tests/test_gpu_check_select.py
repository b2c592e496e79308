"""The GPU selection check (benchmarks/gpu_check_select.py) stays runnable: a CPU dry run without Ray or pyarrow."""

from __future__ import annotations

import json

from gpu_script import ROOT, is_measure, run_blocked  # tests/ is on sys.path (rootdir conftest)

SCRIPT = ROOT / "benchmarks" / "gpu_check_select.py"
ABSENT = ("ray", "pyarrow", "fsspec", "s3fs", "faiss", "threadpoolctl", "pandas", "yaml", "kubernetes")


def test_dry_run_without_ray_or_pyarrow(tmp_path) -> None:
    """Every part runs with torch on the CPU: the device fold's rankings equal the numpy fold's."""
    out = tmp_path / "gpu"
    proc = run_blocked(SCRIPT, ABSENT, "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_select.json").read_text())
    assert result["dry_run"] and result["exactness"]["all_equal"] and result["exactness"]["cases"] == 36
    assert [s["n"] for s in result["sizes"]] == [1500, 3000]
    first = result["sizes"][0]
    assert first["fold"] == "cpu" and first["picks"] == 1500 - 33 and is_measure(first["speedup_over_numpy_fold"])
    assert result["numpy_fold"]["fold"] == "numpy" and result["numpy_fold"]["n"] == 1500
    # timings are checked for presence and type only: how fast a machine is is no test's business
    assert all(is_measure(s["seconds"]) and is_measure(s["products_per_second"]) for s in result["sizes"])
    assert is_measure(result["seconds_total"]) and not list(out.glob("*.tmp"))


def test_without_a_gpu_it_says_so(tmp_path) -> None:
    proc = run_blocked(SCRIPT, ABSENT, "--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "torch sees no CUDA device" in proc.stderr
    assert json.loads((tmp_path / "gpu_select.json").read_text())["error"] == "torch sees no CUDA device"
