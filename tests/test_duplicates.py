"""Duplicate groups, the removal list and leakage, against brute force on awkward graphs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from enrich_dist import pairgraph
from enrich_dist.schema import threshold_folder
from enrich_dist.similarity import duplicates


def random_pairs(n: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random pairs (a < b) with similarities on a coarse grid (many ties)."""
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i, j in itertools.combinations(range(n), 2) if rng.random() < p]
    a = np.array([i for i, _ in pairs], np.int64)
    b = np.array([j for _, j in pairs], np.int64)
    return a, b, np.round(rng.uniform(0.9, 1.0, len(a)), 1).astype(np.float32)


def chain(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.arange(n - 1, dtype=np.int64)
    return a, a + 1, np.full(n - 1, 0.95, np.float32)


CASES = {
    "empty": (0, *random_pairs(0, 0.5, 0)),
    "singletons": (6, *random_pairs(6, 0.0, 1)),
    "chain": (9, *chain(9)),
    "sparse": (40, *random_pairs(40, 0.05, 2)),
    "dense": (25, *random_pairs(25, 0.5, 3)),
}


def naive_components(n: int, a, b) -> list[set[int]]:
    comps = [{i} for i in range(n)]
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        ci = next(c for c in comps if i in c)
        cj = next(c for c in comps if j in c)
        if ci is not cj:
            ci |= cj
            comps.remove(cj)
    return comps


@pytest.mark.parametrize("name", CASES)
def test_groups_are_the_connected_components(name: str) -> None:
    n, a, b, _ = CASES[name]
    group, size = pairgraph.groups(n, a, b)
    comps = naive_components(n, a, b)
    assert len(np.unique(group)) == len(comps)
    for comp in comps:
        members = sorted(comp)
        assert len({int(group[i]) for i in members}) == 1
        assert all(size[i] == len(comp) for i in members)
    firsts = [int(np.flatnonzero(group == g)[0]) for g in range(len(comps))]
    assert firsts == sorted(firsts), "group ids ascend with each group's lowest image"


@pytest.mark.parametrize("policy", pairgraph.KEEP_POLICIES)
@pytest.mark.parametrize("name", CASES)
def test_removal_keeps_an_independent_set_that_dominates(name: str, policy: str) -> None:
    n, a, b, s = CASES[name]
    kept_of, sim = pairgraph.removal(n, a, b, s, policy)
    kept = kept_of == -1
    adjacent = {(int(i), int(j)): float(v) for i, j, v in zip(a, b, s, strict=True)}
    adjacent |= {(j, i): v for (i, j), v in adjacent.items()}
    for i, j in itertools.combinations(np.flatnonzero(kept).tolist(), 2):
        assert (i, j) not in adjacent, "two kept images are near-duplicates"
    for i in np.flatnonzero(~kept).tolist():
        k = int(kept_of[i])
        assert kept[k] and (i, k) in adjacent, "a dropped image needs a kept near-duplicate"
        best = max(v for (p, q), v in adjacent.items() if p == i and kept[q])
        assert sim[i] == np.float32(best)
        assert k == min(q for (p, q), v in adjacent.items() if p == i and kept[q] and v == best)
    assert np.isnan(sim[kept]).all()


@pytest.mark.parametrize("name", CASES)
def test_removal_in_a_given_order_is_the_greedy_independent_set(name: str) -> None:
    """With an explicit order (an ENRICH ranking), an image is kept exactly when no earlier kept image is its
    near-duplicate: the brute-force greedy walk over the order."""
    n, a, b, s = CASES[name]
    order = np.random.default_rng(n).permutation(n)
    kept_of, _ = pairgraph.removal(n, a, b, s, "ranking", order=order)
    adjacent = {(int(i), int(j)) for i, j in zip(a, b, strict=True)}
    adjacent |= {(j, i) for i, j in adjacent}
    kept: list[int] = []
    for i in order.tolist():
        if not any((i, k) in adjacent for k in kept):
            kept.append(i)
    assert sorted(kept) == np.flatnonzero(kept_of == -1).tolist()
    position = np.argsort(order)
    for i in np.flatnonzero(kept_of >= 0).tolist():  # what blocked it: a kept near-duplicate earlier in the order
        assert any((i, k) in adjacent and position[k] < position[i] for k in kept)
    if n > 1:
        with pytest.raises(ValueError, match="permutation"):
            pairgraph.removal(n, a, b, s, "ranking", order=np.zeros(n, np.int64))


def test_removal_does_not_drop_a_chain_wholesale() -> None:
    """A chain is one component, but only every other image goes: groups are not a removal rule."""
    n, a, b, s = CASES["chain"]
    group, _ = pairgraph.groups(n, a, b)
    kept_of, _ = pairgraph.removal(n, a, b, s, "lowest_id")
    assert len(np.unique(group)) == 1
    assert np.flatnonzero(kept_of == -1).tolist() == [0, 2, 4, 6, 8]


def test_central_policy_keeps_the_hub() -> None:
    a = np.array([0, 1, 2, 3], np.int64)
    b = np.array([4, 4, 4, 4], np.int64)
    s = np.full(4, 0.95, np.float32)
    assert np.flatnonzero(pairgraph.removal(5, a, b, s, "central")[0] == -1).tolist() == [4]
    assert np.flatnonzero(pairgraph.removal(5, a, b, s, "lowest_id")[0] == -1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep policy"):
        pairgraph.keep_order(5, a, b, "random")


def test_leakage_equals_brute_force() -> None:
    n, a, b, s = CASES["dense"]
    rng = np.random.default_rng(4)
    split = np.array([rng.choice(["train", "test", None]) for _ in range(n)], dtype=object)
    patient = np.array([rng.choice(["p1", "p2", "p3", None]) for _ in range(n)], dtype=object)
    got = duplicates.leakage(a, b, s, split, patient)
    want = []
    for i, j, v in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        why = [name for name, c in (("split", split), ("patient", patient))
               if c[i] is not None and c[j] is not None and c[i] != c[j]]
        if why:
            want.append((i, j, v, ",".join(why)))
    assert list(zip(got["a"].tolist(), got["b"].tolist(), got["sim"].tolist(), got["crosses"].tolist(),
                    strict=True)) == want
    assert len(duplicates.leakage(a, b, s, None, None)["a"]) == 0


def test_threshold_folder() -> None:
    assert threshold_folder(0.9) == "duplicates/t=0.90"
    assert threshold_folder(0.95) == "duplicates/t=0.95"
    assert threshold_folder(0.925) == "duplicates/t=0.925"
