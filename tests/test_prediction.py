"""Label-free prediction: repeats in ranking prefixes, redundancy concentration, the report's section."""

from __future__ import annotations

import numpy as np
import pytest
from test_selection import write_inputs, write_neighbors

from enrich_dist.config import SelectConfig
from enrich_dist.report.prediction import observed, recommended_budget, repeat_shares
from enrich_dist.report.stage import run_report
from enrich_dist.selection import run_select
from enrich_dist.selection.repeats import concentration, repeats_by_group, repeats_by_neighbors
from enrich_dist.storage import RunDir


def test_repeats_by_group_equal_brute_force():
    rng = np.random.default_rng(1)
    for n in (1, 2, 17, 60):
        group = rng.integers(-1, 5, n)
        order = rng.permutation(n)
        got = repeats_by_group(order, group)
        want = [group[i] >= 0 and any(group[j] == group[i] for j in order[:pos]) for pos, i in enumerate(order)]
        assert got.tolist() == want


def test_repeats_by_neighbors_equal_brute_force():
    rng = np.random.default_rng(2)
    for n, k in ((1, 1), (5, 3), (40, 6)):
        rows = rng.integers(-1, n, (n, k))
        sims = rng.choice([0.5, 0.9, 0.9000001, 0.99], (n, k)).astype(np.float32)
        order = rng.permutation(n)
        got = repeats_by_neighbors(order, rows, sims, 0.9)
        position = {int(i): p for p, i in enumerate(order)}
        want = [
            any(rows[i, j] >= 0 and sims[i, j] > 0.9 and position[int(rows[i, j])] < position[int(i)] for j in range(k))
            for i in order
        ]
        assert got.tolist() == want


def test_concentration_of_equal_and_uneven_groups():
    equal = concentration(np.full(50, 5))  # 10 groups of 5
    assert equal["groups"] == pytest.approx(10) and equal["largest_fifth_share"] == pytest.approx(0.2)
    # 2 groups of 40 and 8 singletons: the largest fifth (2 of 10 groups) holds 80 of 88 images
    uneven = concentration(np.array([40] * 80 + [1] * 8))
    assert uneven["groups"] == pytest.approx(10) and uneven["largest_fifth_share"] == pytest.approx(80 / 88)
    assert concentration(np.array([]))["largest_fifth_share"] is None


def test_recommended_budget_and_observed():
    # (images, repeats): the images added from 0.1 to 0.2 are 30 % repeats, from 0.2 to 0.4 60 %
    shares = {0.1: (100.0, 0.0), 0.2: (200.0, 30.0), 0.4: (400.0, 150.0)}
    assert recommended_budget(shares) == 0.2
    assert recommended_budget({0.1: (100.0, 0.0), 0.2: (200.0, 10.0)}) is None
    entry = {"p_enrich_vs_random": 0.01, "enrich": {"mean": 0.9}, "random": {"mean": 0.8}}
    assert observed(entry, 0.05) == "ahead"
    assert observed({**entry, "enrich": {"mean": 0.7}}, 0.05) == "behind"
    assert observed({**entry, "p_enrich_vs_random": 0.2}, 0.05) == "no difference"
    rows = [{"method": "enrich", "budget": 0.1, "n_images": 10, "n_repeats": r} for r in (1, 3)]
    assert repeat_shares(rows) == {"enrich": {0.1: (10.0, 2.0)}}
    assert repeat_shares([{**rows[0], "n_repeats": None}]) == {}


def test_select_counts_repeats_and_the_report_predicts(ray_local, tmp_path):
    """n_repeats in subsets.parquet equals a brute-force count by clip; the report shows the prediction."""
    run = RunDir(str(tmp_path / "run"))
    write_inputs(run, 80)
    stats = run_select(run, SelectConfig(seed_size=3, budgets=(0.1, 0.3, 1.0), replicates=2))
    assert stats["repeats_measured_by"] == "clip"
    conc = stats["redundancy_concentration"]
    assert conc["measure"] == "clip" and 0.0 < conc["largest_fifth_share"] <= 1.0
    manifest = {r["image_id"]: r["clip_id"] for r in run.read_table("manifest").to_pylist()}
    subsets = run.read_table("selection/subsets.parquet").to_pylist()
    for table_name, method in (("selection/ranking.parquet", "enrich"), ("selection/random_ranking.parquet", "random")):
        ranking = run.read_table(table_name).to_pylist()
        for r in (0, 1):
            order = [row["image_id"] for row in sorted(ranking, key=lambda row: row["rank"]) if row["replicate"] == r]
            for s in (s for s in subsets if s["method"] == method and s["replicate"] == r):
                seen, repeats = set(), 0
                for image in order[: s["n_images"]]:
                    clip = manifest[image]
                    repeats += clip is not None and clip in seen
                    seen.add(clip)
                assert s["n_repeats"] == repeats
    run_report(run)
    html = open(run.path("report/index.html"), encoding="utf-8").read()
    assert "Before labelling" in html and "largest fifth" in html and "repeats, random" in html
    assert "observed (evaluation)" not in html  # no evaluation yet
    # with an evaluation, each budget says whether the prediction held
    budgets = [{"budget": b, "p_enrich_vs_random": 0.01, "enrich": {"mean": 0.9, "std": 0.0},
                "random": {"mean": 0.8, "std": 0.0}} for b in (0.1, 0.3)]
    run.write_json("evaluation/stats.json", {"classification": {"alpha": 0.05, "budgets": budgets}})
    run_report(run)
    html = open(run.path("report/index.html"), encoding="utf-8").read()
    assert "observed (evaluation)" in html and ">ahead<" in html


def test_without_clips_repeats_come_from_the_neighbor_lists(ray_local, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    ids = write_inputs(run, 30, annotated=False)
    write_neighbors(run, ids, 3)
    stats = run_select(run, SelectConfig(seed_size=2, budgets=(0.5, 1.0), replicates=1))
    assert stats["repeats_measured_by"] == "similarity > 0.9"
    assert stats["redundancy_concentration"]["measure"] == "similarity > 0.9"
    assert all(s["n_repeats"] is not None for s in run.read_table("selection/subsets.parquet").to_pylist())
    bare = RunDir(str(tmp_path / "bare"))
    write_inputs(bare, 30, annotated=False)
    stats = run_select(bare, SelectConfig(seed_size=2, budgets=(0.5, 1.0), replicates=1))
    assert stats["repeats_measured_by"] is None and stats["redundancy_concentration"] is None
    assert all(s["n_repeats"] is None for s in bare.read_table("selection/subsets.parquet").to_pylist())
    run_report(bare)
    assert "Not measured" in open(bare.path("report/index.html"), encoding="utf-8").read()
