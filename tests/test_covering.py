"""The select stage's coverage modes and duplicate guard: constraints on finished orders, end to end on Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from enrich_dist.config import SelectConfig
from enrich_dist.selection import choose_seeds, exact_greedy, run_select
from enrich_dist.selection.coverage import (
    coverage_ranking,
    duplicate_groups,
    duplicate_guard,
    herding_ranking,
    neighbor_graph,
)
from enrich_dist.selection.covering import constrained_positions
from enrich_dist.selection.rules import Rules


def naive_constrained(order: np.ndarray, n_seeds: int, labels: np.ndarray | None, caps: list[tuple[np.ndarray, int]]) -> list[int]:
    """Brute force: each step, the allowed rows (all once none is allowed: caps lifted for good); with labels, the
    label with the fewest chosen among those with an allowed row (ties: lower label); the earliest such row in order."""
    n = len(order)
    chosen = list(order[:n_seeds])
    rest = list(order[n_seeds:])
    lifted = False

    def allowed(row: int) -> bool:
        return lifted or all(codes[row] < 0 or sum(codes[c] == codes[row] for c in chosen) < limit for codes, limit in caps)

    while len(chosen) < n:
        ok = [r for r in rest if allowed(r)]
        if not ok:
            lifted = True
            continue
        if labels is not None:
            counts = {g: sum(labels[c] == g for c in chosen) for g in set(labels[r] for r in ok)}
            best = min(counts, key=lambda g: (counts[g], g))
            ok = [r for r in ok if labels[r] == best]
        chosen.append(ok[0])
        rest.remove(ok[0])
    return chosen


@pytest.mark.parametrize("n", [1, 2, 9, 40])
@pytest.mark.parametrize("case", ["none", "clip", "balance", "both"])
def test_constraints_on_a_finished_order_match_brute_force(n: int, case: str) -> None:
    rng = np.random.default_rng(n)
    order = rng.permutation(n)
    n_seeds = min(n, 3)
    clips = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 4, n))
    labels = rng.integers(0, 3, n)
    caps = [(clips, 2)] if case in ("clip", "both") else []
    balance = labels if case in ("balance", "both") else None
    rules = Rules(n, groups=balance, caps=caps)
    positions = constrained_positions(order, n_seeds, rules)
    assert sorted(positions.tolist()) == list(range(n))
    assert order[positions].tolist() == naive_constrained(order, n_seeds, balance, caps)


def unit_rows(n: int, dim: int, seed: int, duplicates: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x[n - duplicates :] = x[:duplicates] + 0.01 * rng.standard_normal((duplicates, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("mode", ["coverage", "herding"])
def test_stage_coverage_modes_equal_the_rules(ray_local, run_dir, mode: str) -> None:
    from test_selection import write_inputs  # tests/ is on sys.path (rootdir conftest)

    n = 57
    ids = write_inputs(run_dir, n, dim=4)
    cfg = SelectConfig(mode=mode, seed_size=3, budgets=(0.1, 0.5, 1.0), replicates=2, seed=5, delta=0.6)
    stats = run_select(run_dir, cfg)
    assert stats["coverage"]["delta"] == 0.6 and stats["coverage"]["how"] == "given (--delta)"
    assert stats["coverage"]["parallel_replicates"] == 2  # the replicates ranked in parallel Ray tasks
    x = np.array(
        [r["embedding"] for r in sorted(run_dir.read_table("embeddings").to_pylist(), key=lambda r: r["image_id"])],
        np.float32,
    )
    graph = neighbor_graph(x, 0.6)
    rule = coverage_ranking if mode == "coverage" else herding_ranking
    ranking = run_dir.read_table("selection/ranking.parquet")
    for r in range(2):
        rng = np.random.default_rng([5, r])
        seeds = rng.permutation(choose_seeds(n, 3, rng))
        rows = ranking.filter(pc.equal(ranking["replicate"], r)).to_pylist()
        assert [row["image_id"] for row in rows] == ids[rule(graph, n, seeds).order].tolist()
        assert [row["is_seed"] for row in rows] == [True] * 3 + [False] * (n - 3)


def test_stage_chooses_delta_without_labels_and_honours_caps(ray_local, run_dir) -> None:
    from test_selection import write_inputs

    n = 80
    write_inputs(run_dir, n, dim=3)
    stats = run_select(run_dir, SelectConfig(mode="coverage", seed_size=2, replicates=1, max_per_clip=3, budgets=(0.2, 1.0)))
    record = stats["coverage"]
    assert record["how"] == "purity rule" and 0.5 <= record["delta"] <= 0.99 and record["edges"] >= 0
    manifest = {r["image_id"]: r["clip_id"] for r in run_dir.read_table("manifest").to_pylist()}
    order = [r["image_id"] for r in run_dir.read_table("selection/ranking.parquet").to_pylist()]
    counts: dict[str, int] = {}
    clips_present = {c for c in manifest.values() if c is not None}
    for image in order[: 3 * len(clips_present)]:  # while no clip is exhausted, no clip exceeds the cap
        clip = manifest[image]
        if clip is not None:
            counts[clip] = counts.get(clip, 0) + 1
            assert counts[clip] <= 3


@pytest.mark.parametrize("mapped", [False, True])
def test_duplicate_guard_in_exact_mode(ray_local, tmp_path, monkeypatch, caplog, mapped: bool) -> None:
    """With the guard on, no second near-duplicate comes before every group has one; off, the ranking is the rule's.

    ``mapped``: the guard reads the embeddings from a mapped file, as it does above 1 GiB.
    """
    import logging
    import tempfile

    from test_selection import write_inputs

    from enrich_dist.selection import cells
    from enrich_dist.storage import RunDir

    if mapped:
        monkeypatch.setattr(cells, "IN_MEMORY_BYTES", 0)
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
        (tmp_path / "tmp").mkdir()
    caplog.set_level(logging.INFO, logger="enrich_dist.selection")
    run = RunDir(str(tmp_path / "run"))
    ids = write_inputs(run, 50, dim=5)
    table = run.read_table("embeddings")
    stats = run_select(run, SelectConfig(mode="exact", seed_size=2, replicates=1, duplicate_threshold=0.5, budgets=(1.0,)))
    assert stats["n_images"] == 50
    x = np.array([r["embedding"] for r in sorted(table.to_pylist(), key=lambda r: r["image_id"])], np.float32)
    groups = duplicate_groups(x, 0.5)
    rng = np.random.default_rng([0, 0])
    seeds = rng.permutation(choose_seeds(50, 2, rng))
    expected = duplicate_guard(exact_greedy(x, seeds).order, groups, 2)
    order = [r["image_id"] for r in run.read_table("selection/ranking.parquet").to_pylist()]
    assert order == ids[expected].tolist()
    n_groups = len(np.unique(groups))
    assert n_groups < 50  # the threshold makes real groups here, so the guard has work to do
    ranked = groups[np.searchsorted(ids, order)]
    seen = set(ranked[:2].tolist())
    for g in ranked[2:].tolist():
        assert g not in seen or len(seen) == n_groups, "a second member came before every group had one"
        seen.add(g)
    assert (f"embeddings mapped from {tmp_path / 'tmp'}" in caplog.text) == mapped
    if mapped:
        assert not list((tmp_path / "tmp").iterdir()), "the mapped file is removed"


def test_bad_coverage_settings_are_named(ray_local, run_dir) -> None:
    from test_selection import write_inputs

    write_inputs(run_dir, 20)
    with pytest.raises(ValueError, match=r"select.delta \(--delta\) must be in \[-1,1\), got 1.5"):
        run_select(run_dir, SelectConfig(mode="coverage", delta=1.5))
    with pytest.raises(ValueError, match=r"select --mode coverage: .*edges.*--delta, --max-edges"):
        run_select(run_dir, SelectConfig(mode="coverage", delta=-1.0, max_edges=5, seed_size=2, replicates=1))


@pytest.mark.parametrize("n, delta", [(1, 0.9), (2, 0.7), (60, 0.6), (90, 0.8)])
def test_graph_from_the_edge_list_equals_the_blocked_pass(n: int, delta: float) -> None:
    """The similarity stage's pairs above 0.5 (GEMM products) give the exact graph at any delta well above 0.5."""
    from enrich_dist.selection.coverage import graph_from_pairs

    x = unit_rows(n, 6, seed=n, duplicates=n // 3)
    g = x @ x.T
    a, b = np.nonzero(np.triu(g > np.float32(0.5), 1))
    got = graph_from_pairs(x, a, b, 0.5, delta)
    want = neighbor_graph(x, delta)
    assert (got != want).nnz == 0 and got.nnz == want.nnz
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert graph_from_pairs(x, a, b, 0.5, 0.5) is None, "delta at the list's own threshold cannot be trusted"
    if want.nnz:
        with pytest.raises(ValueError, match="max_edges"):
            graph_from_pairs(x, a, b, 0.5, delta, max_edges=want.nnz - 1)


def test_stage_builds_the_graph_from_similarity_edges(ray_local, tmp_path) -> None:
    """With the similarity stage done, coverage and the guard read its edges and rank exactly as without them."""
    from test_selection import write_inputs

    from enrich_dist.config import SimilarityConfig
    from enrich_dist.similarity import run_similarity
    from enrich_dist.storage import RunDir

    cfg = SelectConfig(mode="coverage", seed_size=2, replicates=2, delta=0.95, duplicate_threshold=0.97,
                       budgets=(0.2, 1.0))
    plain = RunDir(str(tmp_path / "plain"))
    write_inputs(plain, 70, dim=4)
    with_edges = RunDir(str(tmp_path / "edges"))
    write_inputs(with_edges, 70, dim=4)
    run_similarity(with_edges, SimilarityConfig(top_k=3, edge_threshold=0.9))
    assert run_similarity(with_edges, SimilarityConfig(top_k=3, edge_threshold=0.9))["edges"]["pairs"] > 0
    a = run_select(plain, cfg)
    b = run_select(with_edges, cfg)
    assert a["coverage"]["graph_from"] == "a pass over the embeddings"
    assert b["coverage"]["graph_from"] == "similarity/edges"
    assert a["coverage"]["edges"] == b["coverage"]["edges"] > 0
    assert plain.read_table("selection/ranking.parquet").equals(with_edges.read_table("selection/ranking.parquet"))
