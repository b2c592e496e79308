"""`enrich plan`: the computed plan equals the stage's own planning, projections say what they rest on."""

from __future__ import annotations

import json

import pytest

from enrich_dist import sizing
from enrich_dist.config import SimilarityConfig
from enrich_dist.similarity.plan import tile_pairs, tile_plan


@pytest.mark.parametrize("n", [1, 300, 4097, 1_000_000])
def test_exact_plan_counts_what_the_stage_would_run(n):
    cluster = sizing.Cluster(nodes=2, cpus=3)
    plan = sizing.exact_plan(n, 64, cluster, SimilarityConfig(max_memory="64G"))
    assert plan["pairs"] == n * (n - 1) // 2
    if n <= 5000:  # the stage's tile list at this block: same number of tiles, every pair once
        tiles = tile_plan(n, plan["block"])
        assert len(tiles) == plan["tiles"] and sum(tile_pairs(t) for t in tiles) == plan["pairs"]
    assert plan["object_store_per_node"] == n * 64 * 4 and plan["tasks_in_flight"] == 12
    assert plan["bytes_read_by_tiles"] == plan["tiles"] * 2 * plan["block"] * 64 * 4


def test_exact_plan_on_gpus_uses_the_stages_gpu_tiles():
    from enrich_dist.similarity.plan import GPU_BLOCK

    plan = sizing.exact_plan(10**8, 128, sizing.Cluster(nodes=64, cpus=8, gpus=1), SimilarityConfig())
    assert plan["block"] == GPU_BLOCK and plan["tasks_in_flight"] == 2 * 64
    cpu_only = sizing.exact_plan(10**6, 128, sizing.Cluster(nodes=1, cpus=8, gpus=1), SimilarityConfig(device="cpu"))
    assert cpu_only["block"] < GPU_BLOCK


def test_approx_plan_compares_a_small_share():
    plan = sizing.approx_plan(1_000_000, 128, SimilarityConfig(mode="approx"))
    assert plan["partitions"] == 1000 and plan["nprobe"] == 8
    assert 0.005 < plan["share_compared"] < 0.03  # measured: 0.96 % of the pairs at 10^6 (docs/performance.md)
    # the rows stream: the driver holds ids, assignment, the reduction and the k-means sample, not N x d
    big = sizing.approx_plan(10_000_000, 128, SimilarityConfig(mode="approx"))
    assert big["driver_memory"] < 10_000_000 * 128 * 4 and big["scratch_bytes"] == 2 * 10_000_000 * 128 * 4
    tiny = sizing.approx_plan(50, 8, SimilarityConfig(mode="approx", n_partitions=2))
    assert tiny["pairs_compared"] <= tiny["pairs"]


def test_projection_scales_with_cpus_and_labels_its_basis():
    cal = sizing.Calibration("exact", fixed=1.0, per_unit_cpu=6e-9, cpus=2, runs=((30_000, 2.0), (60_000, 6.0)))
    plan = sizing.exact_plan(1_000_000, 128, sizing.Cluster(cpus=2), SimilarityConfig())
    two = sizing.project(plan, sizing.Cluster(cpus=2), cal)["cpu_seconds"]
    many = sizing.project(plan, sizing.Cluster(nodes=4, cpus=16, gpus=1), cal)
    assert two == pytest.approx(1.0 + plan["pairs"] * 6e-9 / 2)
    assert many["cpu_seconds"] == pytest.approx(1.0 + plan["pairs"] * 6e-9 / 64)
    assert "H200" in many["gpu_basis"] and many["gpu_seconds"] == pytest.approx(plan["pairs"] / (4 * sizing.H200_PAIRS_PER_SECOND))
    text = sizing.describe(plan, many, sizing.Cluster(nodes=4, cpus=16, gpus=1))
    assert "(computed)" in text and "(projected; exact stage measured now on 2 CPUs" in text and "H200" in text


def test_calibration_measures_the_real_stage(ray_local):
    cal = sizing.calibrate(2, "exact", sizes=(1_500, 3_000))
    assert [n for n, _ in cal.runs] == [1_500, 3_000] and all(t > 0 for _, t in cal.runs)
    assert cal.per_unit_cpu > 0 and cal.seconds(10_000, 2) > 0


def test_plan_command_without_calibration_starts_no_ray(capsys, monkeypatch):
    from enrich_dist import runtime
    from enrich_dist.cli import main

    monkeypatch.setattr(runtime, "ray_session", lambda *a, **k: pytest.fail("no Ray without calibration"))
    assert main(["plan", "--images", "10000000", "--nodes", "8", "--cpus", "32", "--gpus", "1", "--memory", "256G",
                 "--no-calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["pairs"] == 10_000_000 * 9_999_999 // 2 and "gpu_seconds" in out["projection"]
    assert "cpu_seconds" not in out["projection"]  # nothing measured, nothing projected for the CPUs
    assert main(["plan", "--images", "0", "--no-calibrate"]) == 2


def test_approx_projection_grows_with_the_pairs_compared_not_the_images():
    cal = sizing.Calibration("approx", fixed=1.0, per_unit_cpu=2e-9, cpus=2, runs=())
    one, four = cal.seconds(1_000_000, 2) - 1.0, cal.seconds(4_000_000, 2) - 1.0
    assert four == pytest.approx(8 * one)  # sqrt(N) partitions: (4N)^1.5 / N^1.5
    plan = sizing.approx_plan(1_000_000, 128, SimilarityConfig(mode="approx", nprobe=4))
    out = sizing.project(plan, sizing.Cluster(nodes=1, cpus=2), cal)
    assert out["cpu_seconds"] == pytest.approx(1.0 + plan["pairs_compared"] * 2e-9 / 2)
    assert "per compared pair" in out["cpu_basis"]


def test_approx_projection_is_a_range_from_the_same_two_runs():
    cal = sizing.Calibration("approx", fixed=0.5, per_unit_cpu=1e-9, cpus=2, runs=((100_000, 3.0), (200_000, 5.0)))
    plan = sizing.approx_plan(1_000_000, 128, SimilarityConfig(mode="approx"))
    out = sizing.project(plan, sizing.Cluster(nodes=1, cpus=2), cal)
    # per image: 2 s per 100,000 images on these 2 CPUs, 1 s fixed -> 21 s at 10^6
    assert out["cpu_seconds_low"] == pytest.approx(1.0 + 1_000_000 * 2e-5)
    assert out["cpu_seconds"] == pytest.approx(0.5 + plan["pairs_compared"] * 1e-9 / 2)
    assert "if it grew with the images only" in out["cpu_basis"]


def test_select_plan_counts_products_and_where_vectors_sit():
    exact = sizing.select_plan(10_000_000, 128, "exact", 1024, 10)
    cells = sizing.select_plan(10_000_000, 128, "cells", 1024, 10)
    assert exact["products_per_replicate"] == 10_000_000 * 9_999_999 / 2 and exact["share_of_complete"] == 1
    assert cells["products_per_replicate"] == 10_000_000 * 1024 / 2 and cells["cells"] == 9766
    assert "memory-mapped file in TMPDIR" in cells["vectors_held_in"] and cells["vectors_bytes"] == 10_000_000 * 512
    assert "driver's memory" in sizing.select_plan(10_000, 128, "cells", 1024, 1)["vectors_held_in"]
    text = sizing.describe_select(exact, {})
    assert "a complete farthest-first ranking" in text and "grows as N^2" in text
    assert "an upper bound: cell bounds (--bound-cells" in text
    assert "0.01 % of a complete ranking" in sizing.describe_select(cells, {})
    timed = sizing.describe_select(cells, {"cpu_seconds_per_replicate": 60, "cpu_seconds": 600, "cpu_basis": "b"})
    assert "projected wall time on the CPUs: 1.0 min per replicate, 10.0 min for 10 (projected; b)" in timed


@pytest.mark.parametrize("mode", ["exact", "batch", "cells"])
def test_select_calibration_times_the_ranking(mode):
    cal = sizing.calibrate_select(2, mode, sizes=(1_200, 2_400))
    assert [n for n, _ in cal.runs] == [1_200, 2_400] and all(t > 0 for _, t in cal.runs)
    plan = sizing.select_plan(100_000, 128, mode, 1024, 3)
    projection = sizing.project_select(plan, sizing.Cluster(cpus=2), cal)
    assert projection["cpu_seconds"] == pytest.approx(3 * projection["cpu_seconds_per_replicate"])
    per = "image" if mode == "cells" else "product"
    assert f"CPU-s per {per}" in projection["cpu_basis"] and "1,200 images" in projection["cpu_basis"]
    more = sizing.project_select(plan, sizing.Cluster(cpus=8), cal)
    assert more["cpu_seconds"] <= projection["cpu_seconds"]  # more CPUs, less time


def test_plan_command_prints_the_selection(capsys):
    from enrich_dist.cli import main

    assert main(["plan", "--images", "2000000", "--select-mode", "cells", "--cell-size", "2048", "--replicates", "2",
                 "--no-calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["select"]["cells"] == 977 and out["select"]["replicates"] == 2 and out["select_projection"] == {}
    assert main(["plan", "--images", "2000000", "--no-calibrate"]) == 0
    assert "select, exact mode (a complete farthest-first ranking): 2,000,000 images, 10 replicate(s)" in (
        capsys.readouterr().out
    )
    assert main(["plan", "--images", "100", "--replicates", "0", "--no-calibrate"]) == 2
