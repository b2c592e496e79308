"""Coverage rules against dense brute-force loops: neighbor graph, delta rule, coverage, herding, duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from enrich_dist.selection import exact_greedy
from enrich_dist.selection.coverage import (
    FIXED_ONE,
    ball_purity,
    choose_delta,
    coverage_ranking,
    default_k,
    duplicate_groups,
    duplicate_guard,
    herding_ranking,
    neighbor_graph,
    pseudo_labels,
)
from enrich_dist.selection.sims import exact_sims

SIZES = (1, 2, 7, 50, 123)
KINDS = ("gauss", "duplicates", "clusters", "ties")


def make_points(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Unit rows of one awkward kind: spread out, repeated, tight clusters with outliers, or few directions."""
    rng = np.random.default_rng([seed, n, KINDS.index(kind)])
    if kind == "ties":
        x = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
        x[~x.any(axis=1), 0] = 1.0  # exact repeats of a few directions: tied sims and degrees
    elif kind == "clusters":
        centres = rng.standard_normal((max(1, n // 10), 6))
        x = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.standard_normal((n, 6))
        x[: max(1, n // 8)] = rng.standard_normal((max(1, n // 8), 6))  # outliers, often without neighbors
    else:
        x = rng.standard_normal((n, 6))
        if kind == "duplicates":
            x = x[rng.integers(0, max(1, n // 3), size=n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_sims(x: np.ndarray) -> np.ndarray:
    """Every pair's similarity in the shared exact arithmetic (diagonal included)."""
    i, j = np.meshgrid(np.arange(len(x)), np.arange(len(x)), indexing="ij")
    return exact_sims(x[i.ravel()], x[j.ravel()]).reshape(len(x), len(x))


def check_ranking(ranking, n: int, seeds: np.ndarray) -> None:
    """A complete ranking: a permutation, the seeds first in order, one pick per round, scores after the seeds."""
    s = len(seeds)
    assert np.array_equal(np.sort(ranking.order), np.arange(n))
    assert np.array_equal(ranking.order[:s], seeds)
    assert np.array_equal(ranking.round, np.concatenate([np.zeros(s), np.arange(1, n - s + 1)]))
    assert np.isnan(ranking.score[:s]).all() and (ranking.score[s:] > 0).all()


def seed_sets(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """No seeds, one, about a tenth in random order, and all rows."""
    return [
        np.empty(0, np.int64),
        rng.choice(n, 1),
        rng.permutation(rng.choice(n, max(1, n // 10), replace=False)),
        rng.permutation(n),
    ]


# ---------------------------------------------------------------- brute-force references


def brute_graph(x: np.ndarray, delta: float) -> np.ndarray:
    """Dense weights: the similarity of every pair i != j above ``delta``, else 0."""
    sims = dense_sims(x)
    keep = (sims > delta) & ~np.eye(len(x), dtype=bool)
    return np.where(keep, sims, 0).astype(np.float32)


def brute_coverage(adjacent: np.ndarray, seeds: np.ndarray) -> tuple[list[int], list[int]]:
    """Greedy max coverage of balls (self included) by rescoring every row each step; restart when all covered."""
    n = len(adjacent)
    ball = adjacent | np.eye(n, dtype=bool)
    chosen = [int(s) for s in seeds]
    covered = ball[chosen].any(axis=0) if chosen else np.zeros(n, dtype=bool)
    gains = []
    while len(chosen) < n:
        if covered.all():
            covered = np.isin(np.arange(n), chosen)
        gain = np.array([(ball[c] & ~covered).sum() if c not in chosen else -1 for c in range(n)])
        pick = int(np.argmax(gain))  # first maximum: ties go to the lower row
        chosen.append(pick)
        gains.append(int(gain[pick]))
        covered |= ball[pick]
    return chosen, gains


def fixed_point(weights: np.ndarray) -> np.ndarray:
    """Dense fixed-point weights of the balls: similarities clipped to [0, 1] in units of 2^-40, diagonal one."""
    w = np.floor(np.clip(weights.astype(np.float64), 0, 1) * 2.0**40).astype(np.int64)
    np.fill_diagonal(w, FIXED_ONE)
    return w


def brute_herding(w: np.ndarray, seeds: np.ndarray) -> tuple[list[int], list[int]]:
    """Greedy facility location by rescoring every row each step; restart when nothing gains."""
    n = len(w)
    chosen = [int(s) for s in seeds]
    best = w[chosen].max(axis=0) if chosen else np.zeros(n, dtype=np.int64)
    gains = []
    while len(chosen) < n:
        gain = np.maximum(w - best[None, :], 0).sum(axis=1)
        gain[chosen] = -1
        if gain.max() == 0:
            best = np.where(np.isin(np.arange(n), chosen), FIXED_ONE, 0)
            continue
        pick = int(np.argmax(gain))
        chosen.append(pick)
        gains.append(int(gain[pick]))
        best = np.maximum(best, w[pick])
    return chosen, gains


def brute_groups(x: np.ndarray, t: float) -> np.ndarray:
    """Components of the pairs above ``t`` by repeated label spreading, numbered by lowest row."""
    linked = dense_sims(x) > t
    label = np.arange(len(x))
    while True:
        spread = np.array([label[linked[i] | (np.arange(len(x)) == i)].min() for i in range(len(x))])
        if np.array_equal(spread, label):
            break
        label = spread
    return np.unique(label, return_inverse=True)[1]


def brute_guard(order: np.ndarray, groups: np.ndarray, n_seeds: int) -> np.ndarray:
    """Seeds, then each row whose group is new, then the rest, all in their given order."""
    seen = {int(groups[r]) for r in order[:n_seeds]}
    first, later = [], []
    for r in order[n_seeds:]:
        (later if groups[r] in seen else first).append(int(r))
        seen.add(int(groups[r]))
    return np.array(list(order[:n_seeds]) + first + later, dtype=np.int64)


# ---------------------------------------------------------------- test graphs


def point_graphs() -> list[tuple[str, np.ndarray, float]]:
    """Points of every kind and size with a threshold giving few to many neighbors."""
    return [
        (f"{kind}-{n}-{delta}", make_points(kind, n), delta)
        for kind in KINDS
        for n in SIZES
        for delta in (0.3, 0.8)
    ]


def hand_graphs() -> list[tuple[str, sp.csr_matrix]]:
    """Small graphs with tied weights, rows without neighbors, cliques, a star and stored diagonals."""
    rng = np.random.default_rng(7)
    graphs = []
    for n in (1, 2, 7, 50, 123):
        upper = np.triu(rng.random((n, n)) < 0.08, 1)
        values = rng.choice([0.5, 0.75, 1.0, 1.25, -0.5], size=(n, n))
        dense = np.where(upper, values, 0)
        graphs.append((f"random-{n}", sp.csr_matrix(dense + dense.T)))
    cliques = np.zeros((12, 12))
    for block in (range(0, 4), range(4, 9)):
        cliques[np.ix_(block, block)] = 0.9
    np.fill_diagonal(cliques, 0)
    graphs.append(("cliques+isolated", sp.csr_matrix(cliques)))
    star = np.zeros((6, 6))
    star[0, 1:] = star[1:, 0] = 0.6
    graphs.append(("star", sp.csr_matrix(star)))
    diagonal = sp.csr_matrix(np.ones((5, 5)) * 0.7)  # diagonal entries stored: ignored
    graphs.append(("stored-diagonal", diagonal))
    graphs.append(("empty-0", sp.csr_matrix((0, 0))))
    return graphs


def all_graphs() -> list[tuple[str, sp.csr_matrix]]:
    """Graphs built by :func:`neighbor_graph` and by hand."""
    return [(name, neighbor_graph(x, delta)) for name, x, delta in point_graphs()] + hand_graphs()


GRAPHS = all_graphs()


# ---------------------------------------------------------------- neighbor graph


@pytest.mark.parametrize("name,x,delta", [pytest.param(*p, id=p[0]) for p in point_graphs()])
def test_neighbor_graph_matches_dense_pairs(name, x, delta):
    want = brute_graph(x, delta)
    for block in (1, 3, 16, 4096):
        graph = neighbor_graph(x, delta, block=block)
        assert graph.dtype == np.float32 and graph.has_sorted_indices
        assert np.array_equal(graph.toarray(), want), (name, block)
        assert graph.nnz == np.count_nonzero(want)


def test_neighbor_graph_edge_cases():
    assert neighbor_graph(np.zeros((0, 4), np.float32), 0.5).shape == (0, 0)
    assert neighbor_graph(make_points("gauss", 1), -2.0).nnz == 0
    x = make_points("gauss", 9)
    assert neighbor_graph(x, -2.0).nnz == 9 * 8  # every pair, never the diagonal
    with pytest.raises(ValueError, match="2-D"):
        neighbor_graph(np.zeros(4), 0.5)


def test_neighbor_graph_edge_limit_names_the_count_and_the_fix():
    x = np.repeat(make_points("gauss", 1), 40, axis=0)
    with pytest.raises(
        ValueError, match=r"max_edges=100 edges \(\d+ found in 1 of 4 row blocks\).*higher delta"
    ):
        neighbor_graph(x, 0.5, block=10, max_edges=100)
    assert neighbor_graph(x, 0.5, block=10, max_edges=40 * 39).nnz == 40 * 39


# ---------------------------------------------------------------- delta rule


def test_ball_purity_matches_dense_balls():
    x = make_points("clusters", 123)
    labels = np.random.default_rng(1).integers(0, 4, len(x))
    rows = np.array([0, 5, 17, 64, 122, 99])
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    thresholds = np.array([-0.2, 0.31, 0.57, 0.83, 0.97])
    assert np.abs(sims[:, :, None] - thresholds).min() > 1e-5  # no similarity near a threshold
    want = [np.mean([(labels[sims[i] > s] == labels[i]).all() for i in rows]) for s in thresholds]
    assert np.array_equal(ball_purity(x, labels, thresholds, rows, block=7), want)
    assert ball_purity(x, np.zeros(len(x)), thresholds, rows).tolist() == [1.0] * len(thresholds)


def test_choose_delta_takes_the_lowest_threshold_that_is_pure_enough():
    x = make_points("gauss", 400)
    grid = np.round(np.arange(0.0, 0.96, 0.05), 2)
    delta, info = choose_delta(x, grid=grid, k=8, sample=150, seed=3)
    purity = np.array(info["purity"])
    assert info["how"] == "purity rule" and info["k"] == 8 and info["alpha"] == 0.95 and info["sample"] == 150
    assert np.all(np.diff(purity) >= 0)  # higher threshold, smaller balls, purer
    first = int(np.argmax(purity >= 0.95))
    assert info["passed"] and delta == grid[first] == info["delta"] and first > 0
    assert purity[first - 1] < 0.95 <= purity[first]
    assert choose_delta(x, grid=grid, k=8, sample=150, seed=3) == (delta, info)


def test_choose_delta_on_separate_blobs_and_when_nothing_passes():
    rng = np.random.default_rng(0)
    blobs = np.repeat(np.eye(3, 8), 30, axis=0) + 0.05 * rng.standard_normal((90, 8))
    blobs = (blobs / np.linalg.norm(blobs, axis=1, keepdims=True)).astype(np.float32)
    labels = pseudo_labels(blobs, 3, seed=1)
    assert len(np.unique(labels)) == 3 and all(len(np.unique(labels[i : i + 30])) == 1 for i in (0, 30, 60))
    delta, info = choose_delta(blobs, k=3)
    assert delta == 0.5 and info["purity"][0] == 1.0  # every ball pure: the largest balls on the grid
    delta, info = choose_delta(make_points("gauss", 200), grid=(0.1, 0.2), alpha=1.0, k=20)
    assert delta == 0.2 and not info["passed"]
    assert choose_delta(make_points("gauss", 1))[0] == 0.5


def test_default_k():
    assert [default_k(n) for n in (1, 2, 3, 8, 200, 45_460)] == [1, 2, 2, 2, 10, 151]


# ---------------------------------------------------------------- coverage and herding


@pytest.mark.parametrize("name,graph", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_coverage_matches_dense_greedy(name, graph):
    n = graph.shape[0]
    adjacent = graph.toarray() != 0
    np.fill_diagonal(adjacent, False)
    for seeds in seed_sets(n, np.random.default_rng(n)) if n else [np.empty(0, np.int64)]:
        ranking = coverage_ranking(graph, n, seeds)
        order, gains = brute_coverage(adjacent, seeds)
        assert ranking.order.tolist() == order, (name, seeds)
        assert ranking.score[len(seeds) :].tolist() == gains
        check_ranking(ranking, n, seeds)


@pytest.mark.parametrize("name,graph", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_herding_matches_dense_greedy(name, graph):
    n = graph.shape[0]
    weights = fixed_point(graph.toarray())
    for seeds in seed_sets(n, np.random.default_rng(n + 1)) if n else [np.empty(0, np.int64)]:
        ranking = herding_ranking(graph, n, seeds)
        order, gains = brute_herding(weights, seeds)
        assert ranking.order.tolist() == order, (name, seeds)
        assert np.array_equal(ranking.score[len(seeds) :], (np.array(gains) / 2.0**40).astype(np.float32))
        check_ranking(ranking, n, seeds)


def test_coverage_restarts_over_the_rest_when_everything_is_covered():
    clique = np.zeros((5, 5))
    clique[:4, :4] = 0.9
    np.fill_diagonal(clique, 0)
    ranking = coverage_ranking(sp.csr_matrix(clique), 5, [])
    # pass 1: row 0 covers the clique, row 4 itself; then each pass takes one clique row
    assert ranking.order.tolist() == [0, 4, 1, 2, 3]
    assert ranking.score.tolist() == [4, 1, 3, 2, 1]
    star = np.zeros((6, 6))
    star[0, 1:] = star[1:, 0] = 0.6
    ranking = coverage_ranking(sp.csr_matrix(star), 6, [0])  # the seed covers everything
    assert ranking.order.tolist() == [0, 1, 2, 3, 4, 5]


def test_herding_prefers_the_centre_and_restarts_only_when_saturated():
    star = np.zeros((6, 6))
    star[0, 1:] = star[1:, 0] = 0.6
    ranking = herding_ranking(sp.csr_matrix(star), 6, [])
    assert ranking.order[0] == 0 and ranking.score[0] == pytest.approx(1 + 5 * 0.6)
    twins = sp.csr_matrix(np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]]))  # exact duplicates 0 and 1
    ranking = herding_ranking(twins, 3, [])
    assert ranking.order.tolist() == [0, 2, 1] and ranking.score.tolist() == [2, 1, 1]


def test_rankings_reject_bad_inputs():
    graph = neighbor_graph(make_points("duplicates", 20), 0.5)
    for rank in (coverage_ranking, herding_ranking):
        with pytest.raises(ValueError, match="distinct"):
            rank(graph, 20, [1, 1])
        with pytest.raises(ValueError, match="distinct"):
            rank(graph, 20, [20])
        with pytest.raises(ValueError, match="20 x 20"):
            rank(graph, 21, [])
        with pytest.raises(ValueError, match="symmetric"):
            rank(sp.triu(graph, format="csr"), 20, [])
    skewed = graph.copy()
    skewed.data[0] *= 0.5
    coverage_ranking(skewed, 20, [])  # only the pattern counts for coverage
    with pytest.raises(ValueError, match="symmetric"):
        herding_ranking(skewed, 20, [])


def covered_share(graph: sp.csr_matrix, rows: np.ndarray) -> float:
    """Share of all rows within a ball of ``rows``."""
    balls = graph[rows].toarray() != 0
    return float((balls.any(axis=0) | np.isin(np.arange(graph.shape[0]), rows)).mean())


def test_prefixes_cover_more_than_random_and_farthest_first_on_a_skewed_archive():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((11, 16))
    sizes = [900] + [10] * 10  # one huge cluster and ten small ones
    labels = np.repeat(np.arange(11), sizes)
    x = centres[labels] + np.where(labels == 0, 0.6, 0.25)[:, None] * rng.standard_normal((1000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    graph = neighbor_graph(x, 0.8)
    seeds, budget = np.array([int(rng.integers(1000))]), 20
    randoms = [covered_share(graph, rng.choice(1000, budget, replace=False)) for _ in range(200)]
    farthest = covered_share(graph, exact_greedy(x, seeds).order[:budget])
    for rank in (coverage_ranking, herding_ranking):
        prefix = rank(graph, 1000, seeds).order[:budget]
        share = covered_share(graph, prefix)
        assert share > np.mean(randoms) + 0.05 and share > farthest, (
            rank.__name__,
            share,
            np.mean(randoms),
            farthest,
        )
        assert len(np.unique(labels[prefix])) == 11  # every cluster, and the huge one more than once


# ---------------------------------------------------------------- duplicates


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_groups_match_dense_components(kind):
    x = make_points(kind, 123)
    for t in (0.9, 0.999):
        want = brute_groups(x, t)
        assert np.array_equal(duplicate_groups(x, t), want)
        assert np.array_equal(duplicate_groups(neighbor_graph(x, 0.5), t), want)


def test_duplicate_guard_matches_the_loop():
    rng = np.random.default_rng(11)
    for n in (0, 1, 2, 7, 50, 123):
        groups = rng.integers(0, max(1, n // 3), n) * 7 - 5  # any integer ids
        order = rng.permutation(n)
        for n_seeds in sorted({0, min(1, n), n // 4, n}):
            guarded = duplicate_guard(order, groups, n_seeds)
            assert np.array_equal(guarded, brute_guard(order, groups, n_seeds))
            rest = groups[guarded[n_seeds:]]
            first = np.zeros(len(rest), dtype=bool)
            first[np.unique(rest, return_index=True)[1]] = True
            first &= ~np.isin(rest, groups[guarded[:n_seeds]])
            assert not (first[1:] & ~first[:-1]).any()  # every first member ahead of every later one
    with pytest.raises(ValueError, match="n_seeds"):
        duplicate_guard(np.arange(3), np.zeros(3), 4)


def test_duplicate_guard_on_a_coverage_ranking_keeps_seeds_and_spreads_duplicates():
    x = make_points("duplicates", 50)
    groups = duplicate_groups(x, 0.999)
    seeds = np.array([3, 40])
    ranking = coverage_ranking(neighbor_graph(x, 0.3), 50, seeds)
    guarded = duplicate_guard(ranking.order, groups, len(seeds))
    assert np.array_equal(guarded[:2], seeds)
    new = len(np.setdiff1d(groups, groups[seeds]))
    firsts = groups[guarded[2 : 2 + new]]
    assert len(np.unique(firsts)) == new and not np.isin(firsts, groups[seeds]).any()
    assert new < 50 - 2  # the data has duplicates, so some rows were moved back
