"""Cell bounds in the max fold (``selection/bounds.py``): exact skips, identical rankings, real savings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_selection import (
    KINDS,
    RULE_CASES,
    assert_matches,
    brute_topk,
    make_data,
    make_rules,
    reference,
    rules_data,
    write_inputs,
    write_neighbors,
)

from enrich_dist.config import SelectConfig, check_section
from enrich_dist.selection import Settings, Shard, choose_seeds, rank, run_select
from enrich_dist.selection.bounds import CellBounds, _bisect, refine
from enrich_dist.selection.checkpoint import Checkpoint
from enrich_dist.selection.sims import error_scale


def clustered(n: int, per: int, spread: float, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Unit rows around ``n // per`` random centres, ``spread`` of noise per component."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per), dim))
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bounded_shard(x: np.ndarray, cell_size: int, **kwargs) -> Shard:
    shard = Shard(np.arange(len(x)), x, **kwargs)
    shard.enable_bounds(cell_size, seed=0)
    return shard


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 17, 257])
@pytest.mark.parametrize("cell_size", [1, 4, 32])
@pytest.mark.parametrize("settings", [Settings("exact", pool=1), Settings("exact", pool=7), Settings("batch", batch_size=5)])
def test_bounded_fold_matches_the_oracle(kind: str, n: int, cell_size: int, settings: Settings) -> None:
    """Dense one-pick-at-a-time (or batch) oracle: ties, duplicates, zero rows, cells of one image."""
    x, seeds = make_data(kind, n)
    shard = bounded_shard(x, cell_size)
    assert (shard.bounds is not None) == (round(n / cell_size) >= 2)
    got = rank(shard, n, seeds, settings)
    assert_matches(got, reference(kind, n, settings.batch_size, "max"), n)


@pytest.mark.parametrize("spread", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("pool", [1, 64])
def test_bounded_fold_equals_the_full_fold_bit_for_bit(spread: float, pool: int, monkeypatch) -> None:
    """Tight, loose and diffuse clusters in awkward sizes: the same rows, rounds and scores.

    Picks are folded in chunks of 5 (the seeds in three), as a large seed set is.
    """
    from enrich_dist.selection import shard as shard_module

    monkeypatch.setattr(shard_module, "PICK_CHUNK", 5)
    x = clustered(1013, 37, spread)
    seeds = choose_seeds(len(x), 11, np.random.default_rng(3))
    expected = rank(Shard(np.arange(len(x)), x), len(x), seeds, Settings("exact", pool=pool))
    shard = bounded_shard(x, 16)
    got = rank(shard, len(x), seeds, Settings("exact", pool=pool))
    assert_matches(got, (expected.order, expected.round, expected.score), len(x))
    computed, skipped = shard.products()
    assert computed + skipped > 0
    if spread == 0.05:  # tight clusters: a pick reaches its own cluster's cells only
        assert skipped > 4 * computed


def test_bounded_fold_with_pruning_rules_and_norms() -> None:
    """With top-k pruning, caps and balance, and rows of unequal norms."""
    n = 300
    rng = np.random.default_rng(5)
    x = clustered(n, 20, 0.2) * rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
    seeds = choose_seeds(n, 7, rng)
    lists = brute_topk(x, 5)
    plain = Shard(np.arange(n), x)
    assert plain.enable_pruning(*lists, plain.max_norm, n)
    expected = rank(plain, n, seeds, Settings("exact", pool=16))
    shard = bounded_shard(x, 8)
    assert shard.enable_pruning(*lists, shard.max_norm, n)
    got = rank(shard, n, seeds, Settings("exact", pool=16))
    assert_matches(got, (expected.order, expected.round, expected.score), n)
    data = rules_data(n, seed=2)
    for case in ("caps", "both"):
        rules = make_rules(data, RULE_CASES[case])
        groups = rules.groups if rules.balance else None
        a, b = (
            rank(shard_of(x, groups, rules.n_groups, bounded), n, seeds, Settings("exact", pool=8),
                 make_rules(data, RULE_CASES[case]))
            for bounded in (True, False)
        )
        assert_matches(a, (b.order, b.round, b.score), n)


def shard_of(x: np.ndarray, groups, n_groups: int, bounded: bool) -> Shard:
    shard = Shard(np.arange(len(x)), x, "max", groups, n_groups)
    if bounded:
        shard.enable_bounds(8, seed=0)
    return shard


def test_bounded_ranking_resumes_from_a_checkpoint(tmp_path) -> None:
    """A checkpoint taken mid-ranking resumes into the same ranking (the cells' minima are rebuilt)."""
    x = clustered(700, 25, 0.1)
    seeds = choose_seeds(len(x), 5, np.random.default_rng(0))
    expected = rank(Shard(np.arange(len(x)), x), len(x), seeds, Settings("exact", pool=8))

    class Stop(Exception):
        pass

    class Once(Checkpoint):
        def save(self, state) -> None:
            super().save(state)
            raise Stop

    from enrich_dist.storage import RunDir

    run, ids = RunDir(str(tmp_path)), np.arange(len(x))
    with pytest.raises(Stop):
        rank(bounded_shard(x, 16), len(x), seeds, Settings("exact", pool=8), checkpoint=Once(run, 0, ids, {"t": 1}, 0.0))
    resumed = Checkpoint(run, 0, ids, {"t": 1}, 0.0)
    assert resumed.load() is not None
    got = rank(bounded_shard(x, 16), len(x), seeds, Settings("exact", pool=8), checkpoint=resumed)
    assert_matches(got, (expected.order, expected.round, expected.score), len(x))


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_never_skip_a_pick_that_can_raise(seed: int) -> None:
    """Against float64 products: a cell whose lowest score is just below a member's product is folded.

    Cells are random (not k-means), centres random or zero, norms unequal: the bound must hold for
    any grouping, only its tightness depends on the cells.
    """
    rng = np.random.default_rng(seed)
    n, dim, k = 400, 24, 9
    x = (rng.standard_normal((n, dim)) * rng.uniform(0.3, 2.0, (n, 1))).astype(np.float32)
    x[rng.integers(0, n, 3)] = 0.0
    labels = rng.integers(0, k, n)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres[0] = 0.0
    bounds = CellBounds(x, labels, centres)
    err = error_scale(dim)
    for _ in range(30):
        pick = (rng.standard_normal(dim) * rng.uniform(0.3, 2.0)).astype(np.float32)
        if rng.random() < 0.3:  # a pick close to a member
            pick = (x[rng.integers(n)] + 0.01 * rng.standard_normal(dim)).astype(np.float32)
        q = float(np.linalg.norm(pick.astype(np.float64)))
        exact = x.astype(np.float64) @ pick.astype(np.float64)
        best = np.full(k, -np.inf)
        np.maximum.at(best, labels, exact)
        below = np.nextafter(best.astype(np.float32), np.float32(-np.inf))  # a member exceeds this score
        limits = bounds.thresholds(below, q, q, err)
        product = centres @ pick
        reached = product >= limits
        assert reached[np.isfinite(best)].all()
        # and a cell whose lowest score is above every product of these norms is skipped
        above = np.full(k, bounds.top * q * 1.01 + 1.0, dtype=np.float32)
        assert not (centres @ pick >= bounds.thresholds(above, q, q, err)).any()


def test_refine_splits_a_cell_over_two_clusters() -> None:
    """One cell over two far clusters, and an outlier: split until no cell is much wider than the rest."""
    rng = np.random.default_rng(0)
    a = clustered(60, 60, 0.05, seed=1)
    b = clustered(60, 60, 0.05, seed=2)
    c = clustered(120, 120, 0.05, seed=3)  # one cluster, two cells
    x = np.concatenate([a, b, c])
    labels = np.array([0] * 120 + [1] * 60 + [2] * 60)
    centres = np.stack([(a.mean(0) + b.mean(0)), c[:60].mean(0), c[60:].mean(0)]).astype(np.float32)
    before = CellBounds(x, labels, centres)
    new_labels, new_centres, after = refine(x, labels, centres)
    assert len(new_centres) > 3
    assert after.radius.max() < before.radius[0] / 2
    assert set(np.unique(new_labels[:60])).isdisjoint(np.unique(new_labels[60:120]))
    same = np.repeat(rng.standard_normal((1, 16)).astype(np.float32), 5, axis=0)
    first, second, _ = _bisect(same)  # identical rows still split in two non-empty parts
    assert first.any() and second.any()


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_rankings_equal_with_cell_bounds(ray_local, tmp_path, caplog, workers: int) -> None:
    """Through the stage (Ray tasks, or shard actors): bounds on or off change no byte; the log says what they skipped."""
    from enrich_dist.storage import RunDir

    tables = {}
    for cells in (0, 2):
        run = RunDir(str(tmp_path / f"cells{cells}"))
        ids = write_inputs(run, 150)
        write_neighbors(run, ids, 4)
        with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
            run_select(run, SelectConfig(seed_size=3, replicates=2, budgets=(0.5,), workers=workers, bound_cells=cells))
        tables[cells] = run.read_table("selection/ranking.parquet")
    assert "cell bounds: " in caplog.text
    assert tables[0].equals(tables[2])


def test_bound_cells_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=r"select.bound_cells \(--bound-cells\)"):
        check_section("select", SelectConfig(bound_cells=-1))


def test_fold_pairs_recomputes_products_within_the_float32_error(monkeypatch) -> None:
    """Scores one float32 step below the exact product: every one is raised, whatever the float32 sum said.

    The flag buffer is made small, so the second pass with room for every entry runs too.
    """
    from enrich_dist.selection import bounds
    from enrich_dist.selection.bounds import fold_pairs
    from enrich_dist.selection.sims import exact_sims

    monkeypatch.setattr(bounds, "FLAG_BUFFER", 7)

    rng = np.random.default_rng(0)
    n, dim = 2000, 128
    members = rng.standard_normal((n, dim)).astype(np.float32)
    pick = rng.standard_normal((1, dim)).astype(np.float32)
    exact = exact_sims(members, np.repeat(pick, n, axis=0))
    scores = np.nextafter(exact, np.float32(-np.inf))
    norms = np.linalg.norm(members.astype(np.float64), axis=1)
    err = error_scale(dim) * float(np.linalg.norm(pick.astype(np.float64)))
    starts = np.array([0, n])
    fold_pairs(np.array([0]), np.array([0]), starts, np.arange(n), members, pick, scores, norms, err)
    assert np.array_equal(scores, exact)


def test_a_long_ranking_logs_its_progress(monkeypatch, caplog) -> None:
    from enrich_dist.selection import greedy

    monkeypatch.setattr(greedy, "PROGRESS_SECONDS", 0.0)
    x = clustered(60, 10, 0.1)
    with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
        rank(bounded_shard(x, 4), len(x), np.array([0, 1]), Settings("exact", pool=4))
    assert "ranked 60 of 60 images (100.0 %)" in caplog.text
