"""The selection's fold on a torch device: torch on the CPU here (the same code runs on a GPU).

Every ranking must equal the numpy fold's bit for bit, because only the choice of which entries to
recompute moves to the device; the recomputation stays in the shared exact arithmetic.
"""

from __future__ import annotations

import logging
import pickle

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

from enrich_dist.config import SelectConfig
from enrich_dist.selection import Settings, Shard, choose_seeds, rank, run_select
from enrich_dist.selection.device import DeviceFold
from enrich_dist.selection.sims import error_scale, exact_sims, max_raises


def device_rank(x, seeds, settings, lists=None) -> tuple:
    """The ranking by a torch-CPU shard and by a numpy shard over the same rows."""
    out = []
    for device in ("cpu", None):
        shard = Shard(np.arange(len(x)), x, device=device)
        if lists is not None:
            assert shard.enable_pruning(*lists, shard.max_norm, len(x))
        out.append(rank(shard, len(x), seeds, settings))
    return out[0], out[1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 17, 257])
@pytest.mark.parametrize("settings", [Settings("exact", pool=1), Settings("exact", pool=7), Settings("batch", batch_size=5)])
def test_device_fold_matches_the_oracle(kind: str, n: int, settings: Settings) -> None:
    x, seeds = make_data(kind, n)
    got, _ = device_rank(x, seeds, settings)
    assert_matches(got, reference(kind, n, settings.batch_size, "max"), n)


@pytest.mark.parametrize("kind", KINDS)
def test_device_fold_with_pruning_and_rules(kind: str) -> None:
    n = 300
    x, seeds = make_data(kind, n)
    lists = brute_topk(x, 5)
    got, expected = device_rank(x, seeds, Settings("exact", pool=16), lists=lists)
    assert_matches(got, (expected.order, expected.round, expected.score), n)
    data = rules_data(n, seed=2)
    for case in ("caps", "both"):
        rules = make_rules(data, RULE_CASES[case])
        groups = rules.groups if rules.balance else None
        a, b = (
            rank(Shard(np.arange(n), x, "max", groups, rules.n_groups, device=d), n, seeds,
                 Settings("exact", pool=8), make_rules(data, RULE_CASES[case]))
            for d in ("cpu", None)
        )
        assert_matches(a, (b.order, b.round, b.score), n)


def test_raises_keeps_every_entry_that_can_be_the_max() -> None:
    """Near-ties within the float32 error: the device's candidates give the same exact maxima."""
    rng = np.random.default_rng(3)
    dim = 64
    base = rng.standard_normal((40, dim)).astype(np.float32)
    picks = np.concatenate([base[:10], base[:10] + 1e-7 * rng.standard_normal((10, dim)).astype(np.float32)])
    rows = np.concatenate([base, base[:5]])  # exact copies of picks: scores on the picks' own values
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    err = error_scale(dim) * float(np.linalg.norm(picks.astype(np.float64), axis=1).max())
    scores = np.full(len(rows), -np.inf, np.float32)
    scores[::3] = exact_sims(rows[::3], rows[::3]) * np.float32(0.5)
    fold = DeviceFold(rows, norms, [np.arange(len(rows))], "cpu")
    fold.load(scores, np.ones(len(rows), bool))
    r_dev, c_dev = fold.raises(0, len(rows), fold.picks(picks), err)
    r_np, v_np = max_raises(scores, rows @ picks.T, rows, picks, norms, err)
    by_device, by_numpy = scores.copy(), scores.copy()
    np.maximum.at(by_device, r_dev, exact_sims(rows[r_dev], picks[c_dev]))
    np.maximum.at(by_numpy, r_np, v_np)
    np.testing.assert_array_equal(by_device, by_numpy)
    full = np.maximum(scores, np.array([exact_sims(np.repeat(r[None], len(picks), 0), picks).max() for r in rows]))
    np.testing.assert_array_equal(by_device, full)


def test_device_shard_pickles_without_its_tensors() -> None:
    x, seeds = make_data("gauss", 60)
    shard = Shard(np.arange(60), x, device="cpu")
    rank(shard, 60, seeds, Settings("exact", pool=4))
    assert shard.fold is not None
    copy = pickle.loads(pickle.dumps(shard))
    assert copy.fold is None and copy.device == "cpu"
    a = rank(copy, 60, seeds, Settings("exact", pool=4))
    b = rank(Shard(np.arange(60), x), 60, seeds, Settings("exact", pool=4))
    assert_matches(a, (b.order, b.round, b.score), 60)


def test_device_fold_refuses_what_it_cannot_run() -> None:
    x, _ = make_data("gauss", 10)
    with pytest.raises(ValueError, match="max scores only"):
        Shard(np.arange(10), x, "mean", device="cpu")
    with pytest.raises(ValueError, match="max scores only"):
        Shard(np.arange(10), x, device="tpu")
    import torch

    if not torch.cuda.is_available():
        shard = Shard(np.arange(10), x, device="cuda")
        with pytest.raises(ValueError, match="--select-device cpu"):
            rank(shard, 10, choose_seeds(10, 2, np.random.default_rng(0)), Settings("exact"))


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_rankings_equal_with_the_device_fold(ray_local, tmp_path, monkeypatch, caplog, workers: int) -> None:
    """Through the stage (Ray tasks, or shard actors): the device fold (torch on the CPU here) changes no byte."""
    from enrich_dist.selection import stage
    from enrich_dist.storage import RunDir

    tables = {}
    for name, device in (("numpy", None), ("torch", "cpu")):
        run = RunDir(str(tmp_path / name))
        ids = write_inputs(run, 90)
        write_neighbors(run, ids, 4)
        monkeypatch.setattr(stage, "_device", lambda cfg, device=device: device)
        with caplog.at_level(logging.INFO, logger="enrich_dist.selection"):
            run_select(run, SelectConfig(seed_size=3, replicates=2, budgets=(0.5,), workers=workers))
        tables[name] = run.read_table("selection/ranking.parquet")
    assert "the rankings' products run on cpu" in caplog.text
    assert tables["numpy"].equals(tables["torch"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "cuda"}, r"the Ray cluster has no GPU: use --select-device cpu"),
        ({"device": "cuda", "mode": "cells"}, r"max scores only, not --mode cells .*use --select-device cpu"),
        ({"device": "cuda", "aggregate": "mean"}, r"--aggregate mean: use --select-device cpu"),
        ({"device": "gpu"}, r"select.device \(--select-device\) must be one of cpu, cuda, got 'gpu'"),
        ({"workers": 2, "mode": "cells"}, r"--mode cells does not use it .*leave it unset"),
        ({"workers": 2, "mode": "coverage"}, r"--mode coverage does not use it"),
    ],
)
def test_stage_refuses_a_device_or_workers_the_mode_cannot_use(ray_local, run_dir, change: dict, message: str) -> None:
    write_inputs(run_dir, 20)
    with pytest.raises(ValueError, match=message):
        run_select(run_dir, SelectConfig(**change))
    assert not run_dir.is_done("selection")


def test_device_lowest_matches_the_host_rule() -> None:
    """Ties, ineligible rows, -inf scores, groups, m above the eligible count: the host's rows, in its order."""
    from enrich_dist.selection.shard import lowest_positions

    rng = np.random.default_rng(11)
    n = 500
    scores = rng.integers(-3, 4, n).astype(np.float32) / 4  # many exact ties
    scores[rng.choice(n, 20, replace=False)] = -np.inf
    eligible = rng.random(n) < 0.7
    groups = [np.flatnonzero(np.arange(n) % 3 == g) for g in range(3)] + [np.arange(n), np.empty(0, np.int64)]
    fold = DeviceFold(np.ones((n, 2), np.float32), np.ones(n), groups, "cpu")
    fold.load(scores, eligible)
    for g, positions in enumerate(groups):
        keys = np.where(eligible, scores, np.float32(np.inf))[positions]
        n_eligible = int(np.count_nonzero(keys < np.inf))
        for m in (0, 1, 5, 37, n_eligible, n_eligible + 3):
            local, count = fold.lowest(g, m)
            assert count == n_eligible
            got = local[np.lexsort((local, keys[local]))]
            np.testing.assert_array_equal(got, lowest_positions(keys, min(m, n_eligible)))
    before = (eligible.copy(), scores.copy())
    fold.drop(np.arange(10))
    fold.set_scores(np.arange(5), np.full(5, 9.0, np.float32))
    assert np.array_equal(eligible, before[0]) and np.array_equal(scores, before[1]), "the mirrors alias the host's"
    assert fold.lowest(3, n)[1] == int(np.count_nonzero(eligible[10:]))
