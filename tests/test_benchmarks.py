"""The similarity benchmark stays runnable and writes the record the README quotes."""

from __future__ import annotations

import json
import subprocess

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
