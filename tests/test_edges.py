"""The similarity stage's edge list (every pair above a threshold) against a dense brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest
from test_similarity import (
    clustered,
    crash_after_tiles,
    exact_unit_vectors,
    sign_vectors,
    torch_cpu,
    write_embeddings,
)

from enrich_dist.config import SimilarityConfig
from enrich_dist.schema import EDGES_DIR
from enrich_dist.similarity import (
    histogram_edges,
    kernel,
    run_similarity,
    stage,
    tile_plan,
    tile_stats,
)
from enrich_dist.similarity.stage import compute_similarity_edges

THRESHOLDS = (0.5, 0.7, 0.9)


def oracle_edges(x: np.ndarray, t: float) -> set[tuple[int, int]]:
    """Pairs (i < j) whose float64 similarity is strictly above ``t``."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.nonzero(np.triu(s > t, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def tiled_edges(x: np.ndarray, block: int, t: float, kernel_fn) -> list[tuple[int, int, float]]:
    """Every tile's edges over the tile plan, as the driver receives them."""
    found = []
    for r0, r1, c0, c1 in tile_plan(len(x), block):
        st = kernel_fn(
            x[r0:r1], x[c0:c1], r0 == c0, 2, THRESHOLDS, histogram_edges(20),
            row_offset=r0, col_offset=c0, edge_threshold=t,
        )
        assert len(st.edge_rows) == len(st.edge_cols) == len(st.edge_vals)
        found += list(zip(st.edge_rows.tolist(), st.edge_cols.tolist(), st.edge_vals.tolist(), strict=True))
    return found


@pytest.mark.parametrize("kernel_fn", [tile_stats, torch_cpu])
@pytest.mark.parametrize("n, block", [(1, 1), (2, 1), (7, 3), (50, 16), (101, 37), (101, 128)])
def test_tile_edges_match_oracle(kernel_fn, n: int, block: int) -> None:
    x = exact_unit_vectors(n, 8, seed=n, duplicates=n // 4)
    found = tiled_edges(x, block, 0.5, kernel_fn)
    pairs = [(min(a, b), max(a, b)) for a, b, _ in found]
    assert len(pairs) == len(set(pairs)), "each pair once"
    assert set(pairs) == oracle_edges(x, 0.5)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    assert all(v == np.float32(s[a, b]) for a, b, v in found)


@pytest.mark.parametrize("kernel_fn", [tile_stats, torch_cpu])
def test_values_on_the_edge_threshold_are_not_edges(kernel_fn) -> None:
    """Sign vectors only meet at -1, -0.5, 0, 0.5, 1: at t = 0.5 only the exact duplicates are edges."""
    x = sign_vectors(60, seed=2)
    pairs = {(min(a, b), max(a, b)) for a, b, _ in tiled_edges(x, 13, 0.5, kernel_fn)}
    assert pairs == oracle_edges(x, 0.5)
    assert pairs and all(np.array_equal(x[a], x[b]) for a, b in pairs)


def test_dense_chunks_overflow_the_buffer_and_lose_nothing(monkeypatch) -> None:
    monkeypatch.setattr(kernel, "EDGE_BUFFER", 3)
    x = exact_unit_vectors(40, 4, seed=5, duplicates=20)
    pairs = {(a, b) for a, b, _ in tiled_edges(x, 17, 0.5, tile_stats)}
    assert len(pairs) > 3 and pairs == oracle_edges(x, 0.5)


def test_edge_threshold_must_be_a_counted_threshold() -> None:
    x = exact_unit_vectors(5, 4, seed=1)
    with pytest.raises(ValueError, match="must be one of the thresholds"):
        tile_stats(x, x, True, 2, THRESHOLDS, histogram_edges(4), edge_threshold=0.8)


def edge_set(table) -> dict[tuple[int, int], float]:
    a, b = table.column("i").to_pylist(), table.column("j").to_pylist()
    return dict(zip(zip(a, b, strict=True), table.column("sim").to_pylist(), strict=True))


@pytest.mark.parametrize("n, block, t", [(1, 4, 0.9), (3, 2, 0.5), (50, 7, 0.7), (101, 16, 0.9)])
def test_stage_edges_match_oracle(ray_local, n: int, block: int, t: float) -> None:
    """Edges name image ids (a < b), sorted, each pair once; ids need not arrive sorted."""
    x = exact_unit_vectors(n, 8, seed=n + 1, duplicates=n // 3)
    ids = np.random.default_rng(n).permutation(np.arange(n) * 3 + 11)
    _, summary, edges = compute_similarity_edges(
        x, ids, SimilarityConfig(block_size=block, top_k=3, edge_threshold=t), progress=False
    )
    want = {(min(ids[i], ids[j]), max(ids[i], ids[j])) for i, j in oracle_edges(x, t)}
    got = edge_set(edges)
    assert set(got) == want
    keys = list(zip(edges.column("i").to_pylist(), edges.column("j").to_pylist(), strict=True))
    assert keys == sorted(keys) and all(a < b for a, b in keys)
    assert summary["edges"] == {"threshold": t, "pairs": len(want), "max_edges": 50_000_000, "complete": True,
                                "path": EDGES_DIR}
    # an edge threshold outside the counted ones joins the kernel's thresholds, not the summary's
    assert set(summary["thresholds"]) == {"0.5", "0.7", "0.9"}


def test_stage_edge_threshold_off_and_extra(ray_local) -> None:
    x = exact_unit_vectors(30, 8, seed=3, duplicates=8)
    ids = np.arange(30)
    _, summary, edges = compute_similarity_edges(x, ids, SimilarityConfig(edge_threshold=None), progress=False)
    assert summary["edges"] is None and edges.num_rows == 0
    _, summary, edges = compute_similarity_edges(x, ids, SimilarityConfig(edge_threshold=0.8), progress=False)
    assert set(edge_set(edges)) == oracle_edges(x, 0.8) and "0.8" not in summary["thresholds"]
    with pytest.raises(ValueError, match=r"similarity.edge_threshold \(--edge-threshold\) must be in \[-1,1\)"):
        compute_similarity_edges(x, ids, SimilarityConfig(edge_threshold=1.5), progress=False)


def test_approx_edges_are_true_pairs_once(ray_local) -> None:
    x = clustered(300, 16, 12, 0.35, seed=3)
    cfg = SimilarityConfig(mode="approx", n_partitions=10, nprobe=2, edge_threshold=0.7, top_k=3)
    _, summary, edges = compute_similarity_edges(x, np.arange(300), cfg, progress=False)
    got = edge_set(edges)
    truth = oracle_edges(x, 0.7)
    assert set(got) <= truth and len(got) > 0.5 * len(truth)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    assert all(abs(v - s[a, b]) < 1e-5 for (a, b), v in got.items())
    assert summary["edges"]["complete"] is False and summary["edges"]["pairs"] == len(got)


def test_run_similarity_writes_edges_and_refuses_past_the_cap(ray_local, run_dir, tmp_path) -> None:
    from enrich_dist.storage import RunDir

    x = exact_unit_vectors(70, 8, seed=9, duplicates=20)
    ids = np.arange(70) * 2
    write_embeddings(run_dir, x, ids, shards=2)
    summary = run_similarity(run_dir, SimilarityConfig(block_size=16, top_k=4))
    table = run_dir.read_table(EDGES_DIR)
    want = {(int(ids[i]), int(ids[j])) for i, j in oracle_edges(x, 0.9)}
    assert set(edge_set(table)) == want and summary["edges"]["pairs"] == len(want) >= 20
    assert run_dir.read_json("similarity/summary.json")["edges"]["threshold"] == 0.9

    capped = RunDir(str(tmp_path / "capped"))
    write_embeddings(capped, x, ids, shards=1)
    with pytest.raises(ValueError, match="--max-edge-pairs"):
        run_similarity(capped, SimilarityConfig(block_size=16, max_edges=5))
    assert not capped.is_done("similarity") and not capped.shards(EDGES_DIR)


def test_resumed_run_keeps_the_edges_of_committed_tiles(ray_local, run_dir, monkeypatch) -> None:
    monkeypatch.setattr(stage, "MIN_TASK_PAIRS", 1)
    x = exact_unit_vectors(90, 8, seed=12, duplicates=30)
    ids = np.arange(90)
    write_embeddings(run_dir, x, ids, shards=2)
    cfg = SimilarityConfig(block_size=16, top_k=4, checkpoint_seconds=0.0, edge_threshold=0.7)
    crash_after_tiles(monkeypatch, run_dir, cfg, 9)
    summary = run_similarity(run_dir, cfg)
    assert summary["tiles"]["resumed"] == 9
    assert set(edge_set(run_dir.read_table(EDGES_DIR))) == oracle_edges(x, 0.7)


def test_cli_edge_options() -> None:
    from enrich_dist.cli import build_parser, config_from_args

    args = build_parser().parse_args(["similarity", "--output", "r", "--edge-threshold", "none",
                                      "--max-edge-pairs", "1000"])
    cfg = config_from_args(args).similarity
    assert (cfg.edge_threshold, cfg.max_edges) == (None, 1000)
    args = build_parser().parse_args(["similarity", "--output", "r", "--edge-threshold", "0.95",
                                      "--duplicate-thresholds", "0.98"])
    assert config_from_args(args).similarity.edge_threshold == 0.95
    # the default duplicate threshold 0.9 would need pairs the edge list no longer keeps: refused at once
    args = build_parser().parse_args(["similarity", "--output", "r", "--edge-threshold", "0.95"])
    with pytest.raises(ValueError, match=r"duplicate_thresholds \[0.9\] lie below"):
        config_from_args(args)
    args = build_parser().parse_args(["similarity", "--output", "r", "--duplicate-thresholds", "none"])
    assert config_from_args(args).similarity.duplicate_thresholds == ()


def test_run_similarity_writes_duplicates_and_leakage(ray_local, run_dir) -> None:
    """duplicates/t=…/ groups and removal list and duplicates/leakage.parquet equal brute force on the oracle's pairs."""
    import pyarrow as pa
    from test_siblings import schema, shard_name

    from enrich_dist.schema import MANIFEST_DIR
    from enrich_dist.similarity import duplicates

    n = 60
    x = exact_unit_vectors(n, 8, seed=21, duplicates=25)
    ids = np.arange(n)
    write_embeddings(run_dir, x, ids, shards=2)
    rows = {name: pa.nulls(n, schema.MANIFEST.field(name).type) for name in schema.MANIFEST.names}
    rows.update(image_id=pa.array(ids, pa.int64()), uri=pa.array([f"/a/{i}.png" for i in ids]),
                status=pa.array(["ok"] * n), split=pa.array(["test" if i % 4 == 0 else "train" for i in ids]),
                patient_id=pa.array([f"p{i % 3}" if i % 5 else None for i in ids]))
    run_dir.write_table(f"{MANIFEST_DIR}/{shard_name(0)}", pa.table(rows, schema=schema.MANIFEST))
    cfg = SimilarityConfig(block_size=16, top_k=3, edge_threshold=0.7, duplicate_thresholds=(0.9, 0.7), keep="central")
    summary = run_similarity(run_dir, cfg)
    for t in (0.7, 0.9):
        pairs = oracle_edges(x, t)
        a = np.array([p[0] for p in pairs], np.int64)
        b = np.array([p[1] for p in pairs], np.int64)
        group, size = duplicates.groups(n, a, b)
        folder = duplicates.threshold_folder(t)
        got = run_dir.read_table(f"{folder}/groups.parquet").to_pydict()
        in_group = np.flatnonzero(size > 1)
        assert got == {"image_id": in_group.tolist(), "group_id": group[in_group].tolist(),
                       "group_size": size[in_group].tolist()}
        removed = run_dir.read_table(f"{folder}/remove.parquet").to_pydict()
        dropped = set(removed["image_id"])
        kept = set(range(n)) - dropped
        assert all((min(i, j), max(i, j)) not in pairs for i in kept for j in kept if i != j)
        assert all((min(i, k), max(i, k)) in pairs and k in kept
                   for i, k in zip(removed["image_id"], removed["kept_image_id"], strict=True))
        record = summary["duplicates"]["thresholds"][f"{t:g}"]
        assert record["remove"] == len(dropped) and record["pairs"] == len(pairs)
        assert record["images_in_groups"] == len(in_group)
    leak = run_dir.read_table("duplicates/leakage.parquet").to_pylist()
    split = ["test" if i % 4 == 0 else "train" for i in ids]
    patient = [f"p{i % 3}" if i % 5 else None for i in ids]
    want = []
    for i, j in sorted(oracle_edges(x, 0.9)):
        why = [w for w, c in (("split", split), ("patient", patient)) if c[i] and c[j] and c[i] != c[j]]
        if why:
            want.append((i, j, ",".join(why)))
    assert [(r["i"], r["j"], r["crosses"]) for r in leak] == want and want
    assert summary["duplicates"]["leakage"]["pairs"] == len(want)


def test_duplicate_thresholds_below_the_edge_list_are_refused_before_any_work(run_dir) -> None:
    with pytest.raises(ValueError, match="lower --edge-threshold"):
        run_similarity(run_dir, SimilarityConfig(edge_threshold=0.9, duplicate_thresholds=(0.8,)))
    with pytest.raises(ValueError, match="--keep"):
        run_similarity(run_dir, SimilarityConfig(keep="oldest"))
