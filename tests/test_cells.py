"""Cells mode: farthest-first within k-means cells, against a dense one-pick-at-a-time loop on the masked similarity."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import pytest
from test_selection import make_data, write_inputs  # tests/ is on sys.path

from enrich_dist.config import SelectConfig
from enrich_dist.errors import ConfigError
from enrich_dist.selection import cells as cells_mod
from enrich_dist.selection.cells import Cells, make_cells, merge, rank_by_cells, seed_reach
from enrich_dist.selection.greedy import exact_greedy
from enrich_dist.selection.sims import exact_sims
from enrich_dist.selection.stage import run_select


def dense_masked(x: np.ndarray, assignment: np.ndarray, reach: list[np.ndarray], seeds: np.ndarray) -> tuple:
    """Farthest-first one pick at a time over every row, a pair counting only within a cell or from a seed it uses."""
    n = len(x)
    i, j = np.divmod(np.arange(n * n), n)
    sims = exact_sims(x[i], x[j]).reshape(n, n)
    scores = np.full(n, -np.inf, dtype=np.float32)
    chosen = np.zeros(n, dtype=bool)
    for s in seeds:
        uses = np.array([s in set(reach[c].tolist()) for c in assignment])
        scores[uses] = np.maximum(scores[uses], sims[uses, s])
        chosen[s] = True
    order, picked_scores = list(seeds), [np.nan] * len(seeds)
    while not chosen.all():
        left = np.flatnonzero(~chosen)
        best = min(zip(scores[left].tolist(), left.tolist(), strict=True))[1]
        order.append(best)
        picked_scores.append(scores[best])
        chosen[best] = True
        same = assignment == assignment[best]
        scores[same] = np.maximum(scores[same], sims[same, best])
    return np.array(order), np.array(picked_scores, dtype=np.float32)


def random_cells(n: int, count: int, seed: int) -> Cells:
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((count, 8)).astype(np.float32)
    return Cells.of(rng.integers(0, count, n), centroids)


@pytest.mark.parametrize("kind", ["gauss", "ties", "duplicates"])
@pytest.mark.parametrize("n,count", [(1, 1), (2, 2), (3, 1), (17, 4), (100, 7), (257, 13)])
def test_cells_match_the_dense_masked_loop(ray_local, monkeypatch, kind: str, n: int, count: int) -> None:
    x, seeds = make_data(kind, n)
    seeds = np.random.default_rng(n).permutation(seeds)  # seeds keep the given order, not row order
    cells = random_cells(n, count, seed=n)  # empty cells and seedless cells included
    monkeypatch.setattr(cells_mod, "GROUP_ROWS", 9)  # many groups, one in flight at a time
    ranking, cost = rank_by_cells(x, cells, seeds, pool=5, in_flight=1)
    reach = seed_reach(cells, seeds)
    order, scores = dense_masked(x, cells.assignment, reach, seeds)
    np.testing.assert_array_equal(ranking.order, order)
    np.testing.assert_array_equal(ranking.score, scores)
    assert ranking.round.tolist() == [0] * len(seeds) + list(range(1, n - len(seeds) + 1))
    assert cost["products"] == pytest.approx(np.sum(np.diff(cells.bounds).astype(float) ** 2) / 2)


def test_one_cell_is_the_exact_ranking(ray_local) -> None:
    x, seeds = make_data("duplicates", 257)
    cells = make_cells(x, 1, seed=0)
    ranking, _ = rank_by_cells(x, cells, seeds, pool=512, in_flight=2)
    exact = exact_greedy(x, seeds)
    np.testing.assert_array_equal(ranking.order, exact.order)
    np.testing.assert_array_equal(ranking.score, exact.score)


def test_seedless_cells_borrow_the_nearest_seeded_cell() -> None:
    centroids = np.array([[1, 0], [0, 1], [0.9, 0.1], [-1, 0]], dtype=np.float32)
    cells = Cells.of(np.array([0, 0, 1, 1, 2, 2, 3]), centroids)
    reach = seed_reach(cells, np.array([1, 3]))
    assert [r.tolist() for r in reach] == [[1], [3], [1], [3]]  # cell 3 is opposite cell 0: nearest seeded is 1
    with pytest.raises(ValueError, match="seed"):
        seed_reach(cells, np.array([], dtype=np.int64))


@pytest.mark.parametrize("flat", [256, 2])
def test_kmeans_cells_group_clusters_and_cover_every_image(monkeypatch, flat: int) -> None:
    monkeypatch.setattr(cells_mod, "FLAT_CELLS", flat)  # 2: coarse cells first, then each split
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((16, 16)).astype(np.float32)
    labels = rng.integers(0, 16, 6000)
    x = centres[labels] + 0.05 * rng.standard_normal((6000, 16)).astype(np.float32)
    cells = make_cells(x, 16, seed=0)
    assert sorted(cells.perm.tolist()) == list(range(6000)) and cells.bounds[-1] == 6000
    assert 12 <= cells.count <= 20 and len(cells.centroids) == cells.count
    assert np.array_equal(cells.assignment[cells.perm], np.repeat(np.arange(cells.count), np.diff(cells.bounds)))
    # k-means on well-separated clusters keeps most clusters whole (a local optimum may split one or two)
    whole = sum(len(np.unique(cells.assignment[labels == c])) == 1 for c in range(16))
    assert whole >= 12, whole


def test_merge_orders_picks_by_score_then_row() -> None:
    ranking = merge(np.array([5, 2]), np.array([4, 0, 3, 1]), np.array([0.5, 0.2, 0.2, 0.9], np.float32))
    assert ranking.order.tolist() == [5, 2, 0, 3, 4, 1]
    assert ranking.round.tolist() == [0, 0, 1, 2, 3, 4]


def test_stage_cells_mode_memory_mapped_equals_in_memory(ray_local, tmp_path, monkeypatch, caplog) -> None:
    import logging

    from enrich_dist.storage import RunDir

    cfg = SelectConfig(mode="cells", cell_size=20, seed_size=5, budgets=(0.25, 1.0), replicates=2, seed=4)
    tables = {}
    for spill in (False, True):
        run = RunDir(str(tmp_path / f"run-{spill}"))
        write_inputs(run, 90)
        if spill:
            monkeypatch.setattr(cells_mod, "IN_MEMORY_BYTES", 0)
            monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
            monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
            os.makedirs(tmp_path / "tmp")
        with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
            stats = run_select(run, cfg)
        tables[spill] = run.read_table("selection/ranking.parquet")
        assert stats["cells"]["n_cells"] == 4 and stats["cells"]["products_complete"] == 90 * 89 / 2
        assert stats["cells"]["products_per_replicate"] < stats["cells"]["products_complete"]
    assert tables[False].equals(tables[True])
    assert f"embeddings mapped from {tmp_path / 'tmp'}" in caplog.text
    assert os.listdir(tmp_path / "tmp") == [], "the mapped file is removed"


def test_stage_one_cell_equals_exact_mode(ray_local, tmp_path) -> None:
    from enrich_dist.storage import RunDir

    out = {}
    for mode in ("exact", "cells"):
        run = RunDir(str(tmp_path / mode))
        write_inputs(run, 70)
        run_select(run, SelectConfig(mode=mode, cell_size=100, seed_size=4, replicates=2, seed=1))
        out[mode] = run.read_table("selection/ranking.parquet")
    assert out["exact"].equals(out["cells"])


@pytest.mark.parametrize(
    "change", [{"max_per_clip": 2}, {"balance_labels": True}, {"aggregate": "mean"}, {"max_per_patient": 1}]
)
def test_cells_mode_refuses_what_it_cannot_honour(run_dir, change: dict) -> None:
    write_inputs(run_dir, 20)
    with pytest.raises(ConfigError, match="cells.*use --mode exact"):
        run_select(run_dir, dataclasses.replace(SelectConfig(mode="cells"), **change))
    with pytest.raises(ConfigError, match="cell_size"):
        run_select(run_dir, SelectConfig(mode="cells", cell_size=0))



def test_in_process_equals_tasks(ray_local) -> None:
    from enrich_dist.selection.cells import rank_in_process

    x, seeds = make_data("gauss", 257)
    cells = make_cells(x, 5, seed=2)
    ranking, _ = rank_by_cells(x, cells, seeds, pool=64, in_flight=3)
    local = rank_in_process(x, cells, seeds, pool=64)
    np.testing.assert_array_equal(ranking.order, local.order)
    np.testing.assert_array_equal(ranking.score, local.score)


def test_stage_cells_mode_resumes_finished_rankings(ray_local, tmp_path, monkeypatch, caplog) -> None:
    import logging

    from enrich_dist.selection import stage as stage_mod
    from enrich_dist.storage import RunDir

    cfg = SelectConfig(mode="cells", cell_size=15, seed_size=3, replicates=3, seed=2)
    whole = RunDir(str(tmp_path / "whole"))
    write_inputs(whole, 50)
    run_select(whole, cfg)

    run = RunDir(str(tmp_path / "crash"))
    write_inputs(run, 50)
    real, calls = stage_mod.rank_by_cells, []

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_mod, "rank_by_cells", failing_third)
    with pytest.raises(RuntimeError, match="node lost"):
        run_select(run, cfg)
    assert not run.is_done("selection") and len(run.listdir("selection/checkpoints")) == 2
    calls.clear()
    with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
        run_select(run, cfg)
    assert len(calls) == 1 and caplog.text.count("ranking resumed whole from its checkpoint") == 2
    assert run.read_table("selection/ranking.parquet").equals(whole.read_table("selection/ranking.parquet"))
    assert not run.exists("selection/checkpoints")


def test_a_full_temp_disk_is_named_with_the_fix(ray_local, run_dir, monkeypatch, tmp_path) -> None:
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    write_inputs(run_dir, 40)
    monkeypatch.setattr(cells_mod, "IN_MEMORY_BYTES", 0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    monkeypatch.setattr(np.lib.format, "open_memmap", no_space)
    with pytest.raises(OSError, match=f"from a file in {scratch}.*could not write it .*No space left.*point TMPDIR"):
        run_select(run_dir, SelectConfig(mode="cells", cell_size=10, replicates=1))
    assert not run_dir.is_done("selection") and os.listdir(scratch) == []


def test_the_log_says_once_why_the_ranking_is_not_pruned(ray_local, run_dir, caplog) -> None:
    import logging

    write_inputs(run_dir, 30, annotated=False)  # no clip ids: the repeat measures look for neighbor lists
    with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
        run_select(run_dir, SelectConfig(mode="exact", seed_size=3, replicates=1))
    assert caplog.text.count("without neighbor pruning") == 1  # the repeat measures ask too, at DEBUG


def test_large_complete_ranking_warns_and_names_the_alternatives(ray_local, run_dir, monkeypatch, caplog) -> None:
    import logging

    from enrich_dist.selection import stage

    write_inputs(run_dir, 40)
    monkeypatch.setattr(stage, "LARGE_RANKING", 30)
    with caplog.at_level(logging.WARNING, logger="enrich_dist.selection"):
        run_select(run_dir, SelectConfig(mode="exact", replicates=1))
    assert "a complete exact ranking of 40 images" in caplog.text and "--mode cells" in caplog.text
    assert "--select-device cuda" not in caplog.text, "the test cluster has no GPU to suggest"
