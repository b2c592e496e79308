"""Selection: greedy rankings against dense brute-force loops, and the select stage end to end."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from enrich_dist.config import SelectConfig
from enrich_dist.schema import MANIFEST, RANKING, SUBSETS, embeddings_schema
from enrich_dist.selection import (
    Rules,
    Settings,
    Shard,
    batch_greedy,
    choose_seeds,
    exact_greedy,
    greedy,
    rank,
    run_select,
)

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
    cfg = SelectConfig(mode="batch", seed_size=4, batch_size=0.1, budgets=(0.1, 15, 0.5, 1.0), replicates=3, seed=11)
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
        ({"budgets": (1.5,)}, r"select.budgets \(--budgets\) is not a size: a fractional size must be in \(0, 1\]"),
        ({"budgets": (21,)}, r"budget 21: a count must be in \[1, 20\]"),
        ({"seed_size": 20}, "seed_size 20 gives 20 seeds"),
        ({"seed_size": 0}, "seed_size 0"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"mode": "greedy"}, r"select.mode \(--mode\) must be one of batch, exact, coverage, herding, cells, got 'greedy'"),
        ({"aggregate": "min"}, r"select.aggregate \(--aggregate\) must be one of max, mean, got 'min'"),
        ({"replicates": 0}, r"select.replicates \(--replicates\) must be >0, got 0"),
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


# ---------------------------------------------------------------- pruning, rules, resume


def brute_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows (float32 products, ties to the lower row) and similarities."""
    s = x.astype(np.float32) @ x.astype(np.float32).T
    np.fill_diagonal(s, -np.inf)
    order = np.array([np.argsort(-row, kind="stable")[:k] for row in s], dtype=np.int64).reshape(len(x), k)
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 17, 100, 257])
@pytest.mark.parametrize("k", [1, 4, "all"])
def test_pruning_leaves_rankings_unchanged(kind: str, n: int, k) -> None:
    x, seeds = make_data(kind, n)
    lists = brute_topk(x, n - 1 if k == "all" else min(k, n - 1))
    for pool in (1, 7, 1024):
        assert_matches(exact_greedy(x, seeds, pool=pool, neighbors=lists), reference(kind, n, 1, "max"), n)
    assert_matches(batch_greedy(x, seeds, 3, neighbors=lists), reference(kind, n, 3, "max"), n)


def test_pruning_rejects_stale_lists() -> None:
    x, seeds = make_data("gauss", 50)
    rows, sims = brute_topk(x, 3)
    with pytest.raises(ValueError, match="do not match"):
        exact_greedy(x, seeds, neighbors=(rows, sims - 0.01))


def test_pruning_skips_most_dense_updates() -> None:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 16))
    x = (centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seeds = choose_seeds(2000, 40, rng)
    work = {}
    for name, lists in (("plain", None), ("pruned", brute_topk(x, 10))):
        store = Shard(np.arange(2000), x)
        if lists is not None:
            assert store.enable_pruning(*lists, store.max_norm, 2000)
        ranking = rank(store, 2000, seeds, Settings("exact", pool=64))
        work[name] = (store.dense_pairs, ranking.order)
    np.testing.assert_array_equal(work["plain"][1], work["pruned"][1])
    assert work["pruned"][0] < 0.6 * work["plain"][0]


def rules_data(n: int, seed: int = 0) -> dict:
    """Labels (3 + unlabelled as a fourth group), clips and patients with gaps, for rule tests."""
    rng = np.random.default_rng([seed, n])
    labels = rng.integers(0, 3, n)
    labels[rng.random(n) < 0.1] = 3
    clips = rng.integers(-1, 12, n)
    patients = np.where(clips >= 0, clips // 3, rng.integers(-1, 4, n))
    return {"labels": labels, "clips": clips, "patients": patients}


def naive_rules(
    x: np.ndarray,
    seeds: np.ndarray,
    batch: int,
    aggregate: str,
    labels: np.ndarray | None,
    caps: list[tuple[np.ndarray, int]],
) -> tuple:
    """Rounds of up to ``batch`` picks by static scores: caps skip full clips/patients, balance takes labels in turn."""
    x64 = x.astype(np.float64)
    sims = x64 @ x64.T
    n = len(x)
    chosen = [int(s) for s in seeds]
    counts = [dict() for _ in caps]
    per_label: dict = {}

    def count(row: int) -> None:
        for (codes, _), tally in zip(caps, counts, strict=True):
            if codes[row] >= 0:
                tally[codes[row]] = tally.get(codes[row], 0) + 1
        if labels is not None:
            per_label[labels[row]] = per_label.get(labels[row], 0) + 1

    def allowed(row: int) -> bool:
        return not capped or all(
            codes[row] < 0 or tally.get(codes[row], 0) < limit
            for (codes, limit), tally in zip(caps, counts, strict=True)
        )

    for s in chosen:
        count(s)
    capped = bool(caps)
    order, rounds, scores = list(chosen), [0] * len(chosen), [np.nan] * len(chosen)
    round_ = 0
    while len(order) < n:
        taken = set(order)
        remaining = [r for r in range(n) if r not in taken]
        block = sims[np.ix_(remaining, order)]
        agg = (block.max(axis=1) if aggregate == "max" else block.mean(axis=1)).astype(np.float32)
        score = dict(zip(remaining, agg.tolist(), strict=True))
        picks: list[int] = []
        while len(picks) < batch:
            eligible = [r for r in remaining if r not in picks and allowed(r)]
            if not eligible:
                break
            if labels is not None:
                turn = min({labels[r] for r in eligible}, key=lambda g: (per_label.get(g, 0), g))
                eligible = [r for r in eligible if labels[r] == turn]
            pick = min(eligible, key=lambda r: (score[r], r))
            picks.append(pick)
            count(pick)
        if not picks:
            capped = False
            continue
        round_ += 1
        for pick in picks:
            order.append(pick)
            rounds.append(round_)
            scores.append(score[pick])
    return np.array(order), np.array(rounds), np.array(scores, dtype=np.float32)


RULE_CASES = {
    "caps": {"balance": False, "clip": 2, "patient": 7},
    "balance": {"balance": True, "clip": None, "patient": None},
    "both": {"balance": True, "clip": 3, "patient": None},
}


def caps_of(data: dict, case: dict) -> list[tuple[np.ndarray, int]]:
    """(codes, limit) of the caps of one ``RULE_CASES`` entry."""
    return [
        (data[name], case[key]) for name, key in (("clips", "clip"), ("patients", "patient")) if case[key]
    ]


def make_rules(data: dict, case: dict) -> Rules:
    """Rules of one ``RULE_CASES`` entry."""
    return Rules(
        len(data["labels"]), groups=data["labels"] if case["balance"] else None, caps=caps_of(data, case)
    )


@pytest.mark.parametrize("case", sorted(RULE_CASES))
@pytest.mark.parametrize("n", [17, 120])
@pytest.mark.parametrize(
    ("mode", "batch", "aggregate"), [("exact", 1, "max"), ("exact", 1, "mean"), ("batch", 9, "max")]
)
def test_rules_match_naive(monkeypatch, case: str, n: int, mode: str, batch: int, aggregate: str) -> None:
    x, seeds = make_data("duplicates", n)
    data = rules_data(n)
    monkeypatch.setattr(greedy, "MIN_GROUP_POOL", 2)  # small per-label pools: bounds per label matter
    spec = RULE_CASES[case]
    rules = make_rules(data, spec)
    expected = naive_rules(
        x, seeds, batch, aggregate, data["labels"] if spec["balance"] else None, caps_of(data, spec)
    )
    lists = brute_topk(x, 3) if aggregate == "max" else None
    if mode == "exact":
        got = exact_greedy(x, seeds, aggregate, pool=5, rules=rules, neighbors=lists)
    else:
        got = batch_greedy(x, seeds, batch, aggregate, rules=rules, neighbors=lists)
    assert_matches(got, expected, n)


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rules_hold_in_every_prefix(case: str) -> None:
    n = 300
    x, seeds = make_data("gauss", n, seed=3)
    data = rules_data(n, seed=3)
    spec = RULE_CASES[case]
    ranking = exact_greedy(x, seeds, pool=16, rules=make_rules(data, spec))
    order = ranking.order
    counts: dict[str, dict] = {"clips": {}, "patients": {}}
    limits = {"clips": spec["clip"], "patients": spec["patient"]}
    labels = dict.fromkeys(range(4), 0)

    def capped(row: int) -> bool:
        return any(
            limit and data[name][row] >= 0 and counts[name].get(data[name][row], 0) >= limit
            for name, limit in limits.items()
        )

    lifted = False
    for i, row in enumerate(order):
        if i >= len(seeds):
            rest = order[i:]
            if not lifted and capped(row):
                lifted = True
                assert all(capped(r) for r in rest), "caps broke while an uncapped image was left"
            if spec["balance"]:
                eligible = [r for r in rest if lifted or not capped(r)]
                assert labels[data["labels"][row]] == min(labels[data["labels"][r]] for r in eligible)
        for name in counts:
            code = data[name][row]
            if code >= 0:
                counts[name][code] = counts[name].get(code, 0) + 1
        labels[data["labels"][row]] += 1
    assert lifted == bool(spec["clip"] or spec["patient"])


class Interrupt(Exception):
    """Raised by a checkpoint to simulate a crash."""


def fresh_shard(x: np.ndarray, aggregate: str, lists: tuple | None, rules: Rules) -> Shard:
    """One in-process shard over ``x`` grouped like ``rules``, pruning with ``lists`` for max scores."""
    shard = Shard(np.arange(len(x)), x, aggregate, rules.groups if rules.balance else None, rules.n_groups)
    if aggregate == "max" and lists is not None:
        assert shard.enable_pruning(*lists, shard.max_norm, len(x))
    return shard


@pytest.mark.parametrize(
    ("mode", "aggregate", "case"),
    [("exact", "max", "both"), ("exact", "mean", "caps"), ("batch", "max", "caps")],
)
def test_resume_matches_uninterrupted(run_dir, monkeypatch, mode: str, aggregate: str, case: str) -> None:
    from enrich_dist.selection.checkpoint import Checkpoint

    monkeypatch.setattr(greedy, "MIN_GROUP_POOL", 2)  # small per-label pools: many rounds

    n = 150
    x, seeds = make_data("gauss", n)
    data = rules_data(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    lists = brute_topk(x, 5)
    settings = Settings(mode, aggregate, 11 if mode == "batch" else 1, pool=8)
    plain = rank(
        fresh_shard(x, aggregate, lists, make_rules(data, RULE_CASES[case])),
        n,
        seeds,
        settings,
        make_rules(data, RULE_CASES[case]),
    )

    class Crashing(Checkpoint):
        saves = 0

        def save(self, state) -> None:
            super().save(state)
            Crashing.saves += 1
            if Crashing.saves == 3:
                raise Interrupt

    key = {"mode": mode, "aggregate": aggregate}
    with pytest.raises(Interrupt):
        rank(
            fresh_shard(x, aggregate, lists, make_rules(data, RULE_CASES[case])),
            n,
            seeds,
            settings,
            make_rules(data, RULE_CASES[case]),
            Crashing(run_dir, 0, ids, key, 0),
        )
    partial = Checkpoint(run_dir, 0, ids, key, 0).load()
    assert partial is not None and len(seeds) < len(partial.ranking.order) < n
    resumed = rank(
        fresh_shard(x, aggregate, lists, make_rules(data, RULE_CASES[case])),
        n,
        seeds,
        settings,
        make_rules(data, RULE_CASES[case]),
        Checkpoint(run_dir, 0, ids, key, 0),
    )
    assert_matches(resumed, (plain.order, plain.round, plain.score), n)
    assert Checkpoint(run_dir, 0, ids, {**key, "other": 1}, 0).load() is None, "fingerprint is checked"


# ---------------------------------------------------------------- the stage: seeds, actors, resume


def write_neighbors(run, ids: np.ndarray, k: int) -> None:
    """A finished similarity stage: brute-force top-k lists of the embeddings in ``run``, in two shards."""
    from enrich_dist.schema import neighbors_schema

    table = run.read_table("embeddings").sort_by("image_id")
    x = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    rows, sims = brute_topk(x, k)
    for shard, part in enumerate(np.array_split(np.arange(len(ids)), 2)):
        columns = {
            "image_id": pa.array(ids[part]),
            "max_sim": pa.array(sims[part, 0]),
            "nn_ids": pa.array(ids[rows[part]].tolist(), pa.list_(pa.int64())),
            "nn_sims": pa.array(sims[part].tolist(), pa.list_(pa.float32())),
        }
        columns.update({f"n_above_{t:g}": pa.array(np.zeros(len(part), np.int64)) for t in (0.5, 0.7, 0.9)})
        run.write_table(
            f"similarity/neighbors/part-{shard:05d}.parquet",
            pa.Table.from_pydict(columns, schema=neighbors_schema((0.5, 0.7, 0.9))),
        )
    summary = {"n_images": len(ids), "exact": True, "top_k": k}
    run.write_json("similarity/summary.json", summary)
    run.mark_done("similarity", summary)


def rankings_of(run) -> tuple[pa.Table, pa.Table]:
    """The ENRICH and random ranking tables of a finished selection."""
    return run.read_table("selection/ranking.parquet"), run.read_table("selection/random_ranking.parquet")


def test_actor_shards_match_one_process(ray_local, run_dir) -> None:
    from enrich_dist.selection.actors import start_actors
    from enrich_dist.selection.inputs import embedding_ids, neighbor_parts, read_neighbors

    n = 101
    ids = write_inputs(run_dir, n, dim=5)
    write_neighbors(run_dir, ids, 4)
    parts, read_ids, _ = embedding_ids(run_dir)
    assert np.array_equal(read_ids, ids)
    lists = neighbor_parts(run_dir, n)
    x = np.array([r["embedding"] for r in run_dir.read_table("embeddings").sort_by("image_id").to_pylist()])
    x = x.astype(np.float32)
    data = rules_data(n, seed=1)
    seeds = np.array([40, 3, 77, 12, 98])
    cases = {
        "max": [
            (Settings("exact", pool=6), "both"),
            (Settings("batch", batch_size=7), "both"),
            (Settings("exact", pool=6), "balance"),
        ],
        "mean": [(Settings("exact", "mean"), "both")],
    }
    for aggregate, runs in cases.items():
        store, pruning, checksum = start_actors(
            run_dir, parts, ids, 3, aggregate, data["labels"], 4, lists if aggregate == "max" else None
        )
        try:
            assert pruning == (aggregate == "max")
            assert checksum == Shard(np.arange(n), x).checksum()
            for settings, case in runs:
                local = Shard(np.arange(n), x, aggregate, data["labels"], 4)
                if aggregate == "max":
                    assert local.enable_pruning(*read_neighbors(run_dir, lists, ids, ids), local.max_norm, n)
                expected = rank(local, n, seeds, settings, make_rules(data, RULE_CASES[case]))
                got = rank(store, n, seeds, settings, make_rules(data, RULE_CASES[case]))
                assert_matches(got, (expected.order, expected.round, expected.score), n)
        finally:
            store.close()


def test_stale_neighbors_turn_pruning_off(ray_local, run_dir, caplog) -> None:
    ids = write_inputs(run_dir, 40)
    write_neighbors(run_dir, ids, 3)
    table = run_dir.read_table("similarity/neighbors/part-00000.parquet")
    sims = pa.array([[v - 0.05 for v in row] for row in table["nn_sims"].to_pylist()], pa.list_(pa.float32()))
    run_dir.write_table("similarity/neighbors/part-00000.parquet", table.set_column(3, "nn_sims", sims))
    with caplog.at_level(logging.WARNING, logger="enrich_dist.selection"):
        stats = run_select(run_dir, SelectConfig(mode="exact", seed_size=3, replicates=1))
    assert not stats["pruning"] and "stale" in caplog.text
    x = np.array([r["embedding"] for r in run_dir.read_table("embeddings").sort_by("image_id").to_pylist()])
    ranking = run_dir.read_table("selection/ranking.parquet")
    seeds = np.searchsorted(ids, [r["image_id"] for r in ranking.to_pylist() if r["is_seed"]])
    assert ranking["image_id"].to_pylist() == ids[exact_greedy(x.astype(np.float32), seeds).order].tolist()


@pytest.mark.parametrize("form", ["csv", "txt-uris", "parquet"])
def test_seed_ids_file(ray_local, run_dir, tmp_path, form: str) -> None:
    ids = write_inputs(run_dir, 50)
    chosen = [int(ids[7]), int(ids[2]), int(ids[30]), int(ids[7])]
    path = tmp_path / f"seeds.{form.split('-')[0]}"
    if form == "csv":
        path.write_text("image_id\n" + "\n".join(map(str, chosen)) + "\n")
    elif form == "txt-uris":
        path.write_text("\n".join(f"img/{i}.png" for i in chosen) + "\n")
    else:
        pa.parquet.write_table(pa.table({"image_id": chosen}), str(path))
    stats = run_select(run_dir, SelectConfig(seed_ids=str(path), replicates=3, batch_size=4))
    assert stats["seed_size"] == 3 and stats["replicate_seconds"][1:] == [0.0, 0.0]
    ranking, randoms = rankings_of(run_dir)
    per_replicate = [
        ranking.filter(pc.equal(ranking["replicate"], r)).drop_columns(["replicate"]) for r in range(3)
    ]
    assert per_replicate[0].equals(per_replicate[1]) and per_replicate[0].equals(per_replicate[2])
    rows = per_replicate[0].to_pylist()
    assert [r["image_id"] for r in rows if r["is_seed"]] == chosen[:3], "seeds in file order, once each"
    random_orders = [
        randoms.filter(pc.equal(randoms["replicate"], r))["image_id"].to_pylist() for r in range(3)
    ]
    assert all(order[:3] == chosen[:3] for order in random_orders)
    assert random_orders[0] != random_orders[1], "random baselines still differ per replicate"


def test_seed_ids_unknown_are_named(ray_local, run_dir, tmp_path) -> None:
    ids = write_inputs(run_dir, 20)
    path = tmp_path / "labelled.txt"
    path.write_text(f"{ids[0]}\n999999\n-4\n")
    with pytest.raises(
        ValueError, match=r"labelled.txt: 2 image_ids are not in the archive's manifest: 999999, -4"
    ):
        run_select(run_dir, SelectConfig(seed_ids=str(path)))
    path.write_text("img/nowhere.png\n")
    with pytest.raises(ValueError, match="1 uris are not in the archive's manifest: img/nowhere.png"):
        run_select(run_dir, SelectConfig(seed_ids=str(path)))
    with pytest.raises(FileNotFoundError, match="missing.csv not found"):
        run_select(run_dir, SelectConfig(seed_ids=str(tmp_path / "missing.csv")))


def test_stage_resumes_after_a_crash(ray_local, tmp_path, monkeypatch, caplog) -> None:
    from enrich_dist.selection.checkpoint import Checkpoint
    from enrich_dist.storage import RunDir

    cfg = SelectConfig(
        mode="batch",
        batch_size=5,
        seed_size=4,
        replicates=2,
        workers=2,
        checkpoint_seconds=0.0,
        max_per_clip=3,
        budgets=(0.5,),
    )
    whole = RunDir(str(tmp_path / "whole"))
    ids = write_inputs(whole, 90)
    write_neighbors(whole, ids, 3)
    stats = run_select(whole, dataclasses.replace(cfg, workers=0))
    assert stats["pruning"] and stats["workers"] == 0
    assert not whole.exists("selection/checkpoints"), "checkpoints are removed once the stage is done"

    crashed = RunDir(str(tmp_path / "crashed"))
    write_inputs(crashed, 90)
    write_neighbors(crashed, ids, 3)
    save = Checkpoint.save
    calls = []

    def crash_later(self, state) -> None:
        save(self, state)
        calls.append(len(state.ranking.order))
        if len(calls) == 25:
            raise Interrupt

    monkeypatch.setattr(Checkpoint, "save", crash_later)
    with pytest.raises(Interrupt):
        run_select(crashed, cfg)
    assert calls.index(90) < 24, "replicate 0 finished before the crash"
    assert crashed.exists("selection/checkpoints/replicate-001.parquet") and not crashed.is_done("selection")
    monkeypatch.setattr(Checkpoint, "save", save)
    with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
        run_select(crashed, cfg)
    assert (
        "resuming a ranking at 90 of 90" in caplog.text
        and f"resuming a ranking at {calls[-1]} of 90" in caplog.text
    )
    assert "2 shard actors" in caplog.text
    assert rankings_of(crashed)[0].equals(rankings_of(whole)[0]), "actors after a crash == one process"
    assert rankings_of(crashed)[1].equals(rankings_of(whole)[1])


def test_scope_file_limits_the_ranked_images(ray_local, run_dir) -> None:
    """``select.scope`` (set by incremental runs, usable by anyone) names the image ids to rank; the read-back check
    holds the rankings to exactly those."""
    import pyarrow as pa

    from enrich_dist.pipeline import check_stage

    ids = write_inputs(run_dir, 40, dim=4)
    scope = sorted(ids[::3].tolist())
    run_dir.write_table("lists/scope.parquet", pa.table({"image_id": pa.array(scope, pa.int64())}))
    cfg = SelectConfig(seed_size=2, replicates=2, budgets=(0.5, 1.0), scope=run_dir.uri_of("lists/scope.parquet"))
    run_select(run_dir, cfg)
    ranking = run_dir.read_table("selection/ranking.parquet")
    for r in (0, 1):
        got = ranking.filter(pc.equal(ranking["replicate"], r))["image_id"].to_pylist()
        assert sorted(got) == scope
    assert check_stage(run_dir, "select")["rows"] == len(scope)
