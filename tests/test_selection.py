"""Selection: greedy rankings against dense brute-force loops, and the select stage end to end."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from enrich_dist.config import SelectConfig
from enrich_dist.schema import MANIFEST, RANKING, SUBSETS, embeddings_schema
from enrich_dist.selection import batch_greedy, choose_seeds, exact_greedy, run_select

SIZES = (1, 2, 3, 17, 100, 257)
KINDS = ("gauss", "ties", "duplicates")


def make_data(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one kind and a seed set of about a tenth of them."""
    rng = np.random.default_rng([seed, n, KINDS.index(kind)])
    if kind == "ties":
        x = rng.integers(-1, 2, size=(n, 3)).astype(np.float32)  # exact integer sims, zero rows, ties
    else:
        x = rng.standard_normal((n, 8)).astype(np.float32)
        if kind == "duplicates":
            x = x[rng.integers(0, max(1, n // 3), size=n)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, choose_seeds(n, max(1, n // 10), rng)


def naive_batch(x: np.ndarray, seeds: np.ndarray, batch: int, aggregate: str) -> tuple:
    """Each round: rescore every candidate from a dense matrix, take the lowest (score, row) pairs."""
    x64 = x.astype(np.float64)
    sims = x64 @ x64.T
    chosen = [int(s) for s in seeds]
    remaining = sorted(set(range(len(x))) - set(chosen))
    order, rounds, scores = list(chosen), [0] * len(chosen), [np.nan] * len(chosen)
    round_ = 0
    while remaining:
        round_ += 1
        block = sims[np.ix_(remaining, chosen)]
        agg = block.max(axis=1) if aggregate == "max" else block.mean(axis=1)
        picked = sorted(zip(agg.astype(np.float32).tolist(), remaining, strict=True))[:batch]
        for score, row in picked:
            order.append(row)
            rounds.append(round_)
            scores.append(score)
        chosen += [row for _, row in picked]
        taken = {row for _, row in picked}
        remaining = [row for row in remaining if row not in taken]
    return np.array(order), np.array(rounds), np.array(scores, dtype=np.float32)


@functools.cache
def reference(kind: str, n: int, batch: int, aggregate: str) -> tuple:
    x, seeds = make_data(kind, n)
    return naive_batch(x, seeds, batch, aggregate)


def assert_matches(ranking, expected: tuple, n: int) -> None:
    order, rounds, scores = expected
    assert np.array_equal(np.sort(ranking.order), np.arange(n)), "not a permutation"
    np.testing.assert_array_equal(ranking.order, order)
    np.testing.assert_array_equal(ranking.round, rounds)
    np.testing.assert_array_equal(ranking.score, scores)
    assert ranking.order.dtype == np.int64 and ranking.round.dtype == np.int32
    assert ranking.score.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 3, 50])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_batch_matches_naive_rounds(kind: str, n: int, batch: int, aggregate: str) -> None:
    x, seeds = make_data(kind, n)
    assert_matches(batch_greedy(x, seeds, batch, aggregate), reference(kind, n, batch, aggregate), n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pool", [1, 2, 7, 64, 1024])
def test_exact_max_matches_one_at_a_time(kind: str, n: int, pool: int) -> None:
    x, seeds = make_data(kind, n)
    assert_matches(exact_greedy(x, seeds, "max", pool=pool), reference(kind, n, 1, "max"), n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_exact_mean_matches_one_at_a_time(kind: str, n: int) -> None:
    x, seeds = make_data(kind, n)
    assert_matches(exact_greedy(x, seeds, "mean", pool=5), reference(kind, n, 1, "mean"), n)


def test_exact_max_with_many_ties_and_pools() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2, size=(300, 2)).astype(np.float32)  # four distinct vectors, mostly ties
    seeds = np.array([5])
    expected = naive_batch(x, seeds, 1, "max")
    for pool in (1, 3, 4, 5, 299, 300):
        assert_matches(exact_greedy(x, seeds, pool=pool), expected, 300)


def test_seeds_keep_given_order_and_max_scores_grow() -> None:
    x, _ = make_data("gauss", 100)
    seeds = np.array([40, 3, 77])
    ranking = exact_greedy(x, seeds)
    np.testing.assert_array_equal(ranking.order[:3], seeds)
    assert ranking.is_seed.sum() == 3 and np.isnan(ranking.score[:3]).all()
    assert np.all(np.diff(ranking.score[3:]) >= 0), "farthest-first max scores never decrease"


def test_deterministic_from_seed() -> None:
    x, _ = make_data("gauss", 100)
    a = choose_seeds(100, 9, np.random.default_rng([3, 1]))
    b = choose_seeds(100, 9, np.random.default_rng([3, 1]))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0) and a.dtype == np.int64
    assert not np.array_equal(a, choose_seeds(100, 9, np.random.default_rng([3, 2])))
    first, second = batch_greedy(x, a, 7), batch_greedy(x, b, 7)
    np.testing.assert_array_equal(first.order, second.order)
    np.testing.assert_array_equal(first.score, second.score)


def test_greedy_rejects_bad_input() -> None:
    x, _ = make_data("gauss", 10)
    with pytest.raises(ValueError, match="distinct"):
        batch_greedy(x, np.array([1, 1]), 2)
    with pytest.raises(ValueError, match="distinct"):
        exact_greedy(x, np.array([10]))
    with pytest.raises(ValueError, match="at least one seed"):
        exact_greedy(x, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        batch_greedy(x, np.array([0]), 0)
    with pytest.raises(ValueError, match="pool"):
        exact_greedy(x, np.array([0]), pool=0)
    with pytest.raises(ValueError, match="aggregate"):
        batch_greedy(x, np.array([0]), 2, "median")
    with pytest.raises(ValueError, match="seed_size"):
        choose_seeds(5, 6, np.random.default_rng(0))


# ---------------------------------------------------------------- the stage


def write_inputs(run, n: int, dim: int = 6, annotated: bool = True, seed: int = 0) -> np.ndarray:
    """Embeddings in two shards (ids with gaps, unsorted) and a manifest; returns ids sorted."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10 * n + 5, size=n, replace=False)).astype(np.int64)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    shuffled = rng.permutation(n)
    for shard, part in enumerate(np.array_split(shuffled, 2)):
        table = pa.table(
            {
                "image_id": pa.array(ids[part]),
                "embedding": pa.FixedSizeListArray.from_arrays(x[part].ravel(), dim),
            },
            schema=embeddings_schema(dim),
        )
        run.write_table(f"embeddings/part-{shard:05d}.parquet", table)

    def column(values):
        return values if annotated else [None] * n

    patients = [None if i % 7 == 3 else f"p{i % 5}" for i in range(n)]
    clips = [None if i % 11 == 4 else f"c{i % 9}" for i in range(n)]
    labels = [None if i % 6 == 1 else ("A4C" if i % 3 else "NT") for i in range(n)]
    manifest = pa.table(
        {
            "image_id": pa.array(ids[::-1]),
            "uri": [f"img/{i}.png" for i in ids[::-1]],
            "patient_id": column(patients[::-1]),
            "clip_id": column(clips[::-1]),
            "frame": [0] * n,
            "label": column(labels[::-1]),
            "split": ["train"] * n,
            "mask_uri": [None] * n,
            "status": ["ok"] * n,
            "error": [None] * n,
        },
        schema=MANIFEST,
    )
    run.write_table("manifest/part-00000.parquet", manifest)
    return ids


def test_run_select_end_to_end(ray_local, run_dir, caplog) -> None:
    n = 60
    ids = write_inputs(run_dir, n)
    cfg = SelectConfig(seed_size=4, batch_size=0.1, budgets=(0.1, 15, 0.5, 1.0), replicates=3, seed=11)
    with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
        stats = run_select(run_dir, cfg)
    assert "replicate 2 ranked 60 images" in caplog.text
    assert stats["n_images"] == n and stats["seed_size"] == 4 and stats["batch_size"] == 6
    assert len(stats["replicate_seconds"]) == 3 and run_dir.is_done("selection")
    assert run_dir.read_json("selection/selection.json") == stats

    ranking = run_dir.read_table("selection/ranking.parquet")
    randoms = run_dir.read_table("selection/random_ranking.parquet")
    assert ranking.schema == RANKING and randoms.schema == RANKING
    manifest = run_dir.read_table("manifest").to_pylist()
    info = {row["image_id"]: row for row in manifest}
    tables = run_dir.read_table("embeddings").to_pylist()
    x = np.array([r["embedding"] for r in sorted(tables, key=lambda r: r["image_id"])], dtype=np.float32)
    prefixes = {}
    for r in range(3):
        rows = ranking.filter(pc.equal(ranking["replicate"], r)).to_pylist()
        rand = randoms.filter(pc.equal(randoms["replicate"], r)).to_pylist()
        assert [row["rank"] for row in rows] == list(range(n))
        order = [row["image_id"] for row in rows]
        assert sorted(order) == ids.tolist() and sorted(row["image_id"] for row in rand) == ids.tolist()
        seeds = [row["image_id"] for row in rows if row["is_seed"]]
        assert (
            order[:4]
            == seeds
            == [row["image_id"] for row in rand if row["is_seed"]]
            == [row["image_id"] for row in rand[:4]]
        )
        expected_set = ids[choose_seeds(n, 4, np.random.default_rng([11, r]))]
        assert sorted(seeds) == expected_set.tolist()
        assert all((row["score"] is None) == row["is_seed"] for row in rows)
        assert all(row["score"] is None for row in rand)
        seed_rows = np.searchsorted(ids, seeds)
        expected = batch_greedy(x, seed_rows, 6)
        assert order == ids[expected.order].tolist()
        assert [row["round"] for row in rows] == expected.round.tolist()
        prefixes[("enrich", r)] = order
        prefixes[("random", r)] = [row["image_id"] for row in rand]

    subsets = run_dir.read_table("selection/subsets.parquet")
    assert subsets.schema == SUBSETS and subsets.num_rows == 2 * 3 * 4
    for row in subsets.to_pylist():
        count = {0.1: 6, 15 / 60: 15, 0.5: 30, 1.0: 60}[row["budget"]]
        members = [info[i] for i in prefixes[(row["method"], row["replicate"])][:count]]
        labels = {}
        for m in members:
            if m["label"] is not None:
                labels[m["label"]] = labels.get(m["label"], 0) + 1
        assert row["n_images"] == count
        assert row["n_patients"] == len({m["patient_id"] for m in members} - {None})
        assert row["n_clips"] == len({m["clip_id"] for m in members} - {None})
        assert dict(row["label_counts"]) == labels

    other = SelectConfig(mode="exact", replicates=1)
    assert run_select(run_dir, other) == stats, "a finished stage is skipped"


def test_run_select_is_deterministic_and_exact_mode(ray_local, tmp_path) -> None:
    from enrich_dist.storage import RunDir

    tables = []
    for name in ("a", "b"):
        run = RunDir(str(tmp_path / name))
        write_inputs(run, 40, annotated=False)
        run_select(
            run, SelectConfig(mode="exact", seed_size=3, replicates=2, budgets=(0.5,), aggregate="mean")
        )
        tables.append(run.read_table("selection/ranking.parquet"))
        subsets = run.read_table("selection/subsets.parquet").to_pylist()
        assert all(r["n_patients"] == 0 and r["n_clips"] == 0 and r["label_counts"] == [] for r in subsets)
    assert tables[0].equals(tables[1])
    assert tables[0]["round"].to_pylist()[:5] == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("n", [1, 2])
def test_run_select_tiny_archives(ray_local, run_dir, n: int) -> None:
    ids = write_inputs(run_dir, n)
    stats = run_select(run_dir, SelectConfig(replicates=2))
    ranking = run_dir.read_table("selection/ranking.parquet").to_pylist()
    assert stats["seed_size"] == 1 and len(ranking) == 2 * n
    assert sorted(row["image_id"] for row in ranking[:n]) == ids.tolist()
    subsets = run_dir.read_table("selection/subsets.parquet").to_pylist()
    assert {r["n_images"] for r in subsets} <= {1, 2} and subsets[-1]["n_images"] == n


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budgets": (0.5, 0)}, r"budget 0: a count must be in \[1, 20\]"),
        ({"budgets": (1.5,)}, r"budget 1.5: a fractional size must be in \(0, 1\]"),
        ({"budgets": (21,)}, r"budget 21: a count must be in \[1, 20\]"),
        ({"seed_size": 20}, "seed_size 20 gives 20 seeds"),
        ({"seed_size": 0}, "seed_size 0"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"mode": "greedy"}, "mode must be one of"),
        ({"aggregate": "min"}, "aggregate must be one of"),
        ({"replicates": 0}, "replicates must be >= 1"),
    ],
)
def test_run_select_rejects_bad_config(ray_local, run_dir, change: dict, message: str) -> None:
    write_inputs(run_dir, 20)
    with pytest.raises(ValueError, match=message):
        run_select(run_dir, SelectConfig(**change))
    assert not run_dir.is_done("selection")


def test_run_select_needs_embeddings(run_dir) -> None:
    with pytest.raises(FileNotFoundError, match="run `enrich embed") as info:
        run_select(run_dir, SelectConfig())
    assert run_dir.uri in str(info.value)
