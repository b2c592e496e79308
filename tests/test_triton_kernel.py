"""The Triton tile kernel, run by Triton's interpreter on CPU tensors, against brute force and the torch kernel.

The interpreter needs ``TRITON_INTERPRET=1`` before triton is imported (triton's own library functions
are jitted then). This module sets it while it imports triton, and unsets it afterwards, when the
session has not imported triton yet and ``TRITON_INTERPRET`` is not set otherwise; where triton
came first, compiled, one test runs this file again in a fresh interpreted process. The
compiled kernel is checked too: it is lowered to sm_90 machine code in a compiled process (no GPU
needed). Small blocks make several blocks per tile, none dividing it; inputs have exact products
(a 2^-8 grid, or one nonzero coordinate), so every order of summation gives the same float32 and
every field must match exactly.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_similarity import exact_unit_vectors as grid_vectors  # tests/ is on sys.path
from test_similarity import sign_vectors

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        from enrich_dist.similarity import triton_kernel
    finally:
        del os.environ["TRITON_INTERPRET"]
else:
    triton = pytest.importorskip("triton")
    from enrich_dist.similarity import triton_kernel

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from enrich_dist.similarity.kernel import TileStats  # noqa: E402
from enrich_dist.similarity.plan import histogram_edges  # noqa: E402
from enrich_dist.similarity.torch_kernel import bin_limits, tile_stats_torch  # noqa: E402
from enrich_dist.similarity.triton_kernel import tile_stats_triton  # noqa: E402

INTERPRETED = isinstance(triton.language.standard.zeros, InterpretedFunction)
THRESHOLDS = (0.5, 0.7, 0.9)
FIELDS = ("row_counts", "col_counts", "row_vals", "row_idx", "col_vals", "col_idx", "hist")
interpreted_only = pytest.mark.skipif(
    not INTERPRETED or not triton_kernel._jitted()[1],
    reason="compiled triton: see test_in_interpreted_process",
)


def run_pytest(select: str, interpret: str, timeout: int) -> None:
    """This file's tests matching ``select`` in a fresh process with ``TRITON_INTERPRET=interpret``."""
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-k", select]
    root = Path(__file__).parents[1]
    done = subprocess.run(
        [*args, __file__], capture_output=True, text=True, env=env, timeout=timeout, cwd=root
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small blocks (several per tile); ``TRITON_INTERPRET`` as the process was started (constexpr helpers read it)."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernel, "BLOCK_M", 16)
    monkeypatch.setattr(triton_kernel, "BLOCK_N", 16)
    monkeypatch.setattr(triton_kernel, "BLOCK_K", 16)


def brute_force(
    xi, xj, diagonal, k, thresholds, bins, *, row_offset=0, col_offset=0, edge_threshold=None
) -> TileStats:
    """Dense oracle: float32 products (exact in float64 first), the CPU kernel's float64 bins, counts
    strictly above each threshold, top-k by (descending value, ascending index) over each line's pairs."""
    s = (xi.astype(np.float64) @ xj.astype(np.float64).T).astype(np.float32)
    nr, nc = s.shape
    pair = np.ones((nr, nc), bool)
    if diagonal:
        pair = np.triu(pair, 1)
    v = s[pair].astype(np.float64)
    binned = np.clip(np.floor((v + 1.0) * (bins / 2)), 0, bins - 1).astype(np.int64)
    hist = np.bincount(binned, minlength=bins)
    row_counts = np.array([((s > t) & pair).sum(axis=1) for t in thresholds], np.int64).reshape(-1, nr)
    col_counts = np.array([((s > t) & pair).sum(axis=0) for t in thresholds], np.int64).reshape(-1, nc)

    def top(sims, ok, offset):
        vals, idx = np.full((len(sims), k), -np.inf, np.float32), np.full((len(sims), k), -1, np.int64)
        for i, (line, keep) in enumerate(zip(sims, ok, strict=True)):
            best = sorted(np.flatnonzero(keep), key=lambda j, line=line: (-float(line[j]), j))[:k]
            vals[i, : len(best)], idx[i, : len(best)] = line[best], np.asarray(best, np.int64) + offset
        return vals, idx

    row_vals, row_idx = top(s, pair, col_offset)
    col_vals, col_idx = top(s.T, pair.T, row_offset)
    stats = TileStats(row_counts, col_counts, row_vals, row_idx, col_vals, col_idx, hist)
    if edge_threshold is not None:
        ii, jj = np.nonzero(pair & (s > edge_threshold))
        stats.edge_rows, stats.edge_cols, stats.edge_vals = ii + row_offset, jj + col_offset, s[ii, jj]
    return stats


def sorted_edges(st: TileStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((st.edge_cols, st.edge_rows))
    return st.edge_rows[order], st.edge_cols[order], st.edge_vals[order]


def assert_same(got: TileStats, want: TileStats, what: str) -> None:
    """Every field equal, with its shape and dtype; edges in any order."""
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert (g.shape, g.dtype) == (w.shape, w.dtype), (
            f"{what}: {name} {g.shape} {g.dtype} != {w.shape} {w.dtype}"
        )
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: {name}")
    names = ("edge_rows", "edge_cols", "edge_vals")
    for name, g, w in zip(names, sorted_edges(got), sorted_edges(want), strict=True):
        assert g.dtype == w.dtype, f"{what}: {name} dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: {name}")


def check(xi, xj, diagonal, k, thresholds, bins, **kw) -> TileStats:
    """The Triton kernel against the torch kernel (dtypes too) and the brute-force oracle."""
    edges = histogram_edges(bins)
    got = tile_stats_triton(xi, xj, diagonal, k, thresholds, edges, device="cpu", **kw)
    want = tile_stats_torch(xi, xj, diagonal, k, thresholds, edges, device="cpu", **kw)
    what = f"{len(xi)}x{len(xj)} diagonal={diagonal} k={k} {kw}"
    assert_same(got, want, f"torch, {what}")
    assert_same(got, brute_force(xi, xj, diagonal, k, thresholds, bins, **kw), f"oracle, {what}")
    return got


@interpreted_only
@pytest.mark.parametrize("n", [1, 2, 7, 33, 130, 257])
def test_diagonal_tiles_match_oracle_and_torch(n: int, monkeypatch) -> None:
    """Diagonal tiles with duplicate rows (ties), blocks not dividing the tile, k from 0 past the row length."""
    if n > 100:
        monkeypatch.setattr(triton_kernel, "BLOCK_M", 32)
    x = grid_vectors(n, 8, seed=n, duplicates=min(5, n // 3))
    offset = 3 * n
    for k in (0, 1, 5, n + 3) if n < 100 else (5, n + 3):
        edge = 0.5 if k == 5 else None
        check(x, x, True, k, THRESHOLDS, 40, row_offset=offset, col_offset=offset, edge_threshold=edge)


@interpreted_only
@pytest.mark.parametrize("nr, nc", [(1, 1), (2, 7), (7, 2), (33, 17), (45, 130), (130, 20)])
def test_off_diagonal_tiles_match_oracle_and_torch(nr: int, nc: int) -> None:
    """Off-diagonal tiles with offsets, rows and columns repeated (ties on both sides)."""
    x = grid_vectors(nr + nc, 8, seed=nr * nc)
    xi, xj = x[:nr].copy(), x[nr:].copy()
    xi[nr // 2 :] = xi[0]
    xj[::3] = xj[-1]
    for k in (0, 1, 5, max(nr, nc) + 3):
        check(xi, xj, False, k, (0.9, 0.5, 0.7), 40, row_offset=100, col_offset=7, edge_threshold=0.5)


@interpreted_only
@pytest.mark.parametrize("diagonal", [True, False])
def test_sign_vectors_values_on_edges_and_thresholds(diagonal: bool) -> None:
    """Similarities -1, -0.5, 0, 0.5, 1 only: every one on a bin edge, on a threshold, tied many times."""
    x = sign_vectors(40, seed=3)
    xj = x if diagonal else sign_vectors(23, seed=4)
    for k in (1, 12):
        check(x, xj, diagonal, k, (0.0, -0.5, 0.5), 8, edge_threshold=0.0)
        check(x, xj, diagonal, k, (0.0, -0.5, 0.5), 4)


def special_values(bins: int) -> np.ndarray:
    """float32 similarities on and next to every bin limit and threshold, past +-1, and signed zeros."""
    limits = bin_limits(bins)
    values = [limits, np.nextafter(limits, np.float32(-np.inf)), np.nextafter(limits, np.float32(np.inf))]
    for t in (0.5, 0.7, 0.9, -0.5, 0.0, 1.0, -1.0):
        f = np.float32(t)
        values.append(np.float32([f, np.nextafter(f, np.float32(-1)), np.nextafter(f, np.float32(2))]))
    values.append(np.float32([1.0000001, -1.0000001, 1e-45, -1e-45, -0.0]))
    return np.concatenate(values).astype(np.float32)


@interpreted_only
@pytest.mark.parametrize(
    "bins, block_max", [(1, None), (2, None), (8, None), (200, None), (200, 64), (1000, None)]
)
def test_values_on_bin_limits_and_thresholds(bins: int, block_max: int | None, monkeypatch) -> None:
    """Rows ``c e_1`` against ``e_1``, ``-e_1`` and ``e_1 / 2``: the products are exactly the chosen floats, so
    the histogram sees every bin limit and its neighbors, the counts every threshold and its neighbors.
    ``block_max`` 64: the histogram by atomic adds per entry. Wide blocks: the interpreter's time goes by blocks."""
    if block_max:
        monkeypatch.setattr(triton_kernel, "HIST_BLOCK_MAX", block_max)
    monkeypatch.setattr(triton_kernel, "BLOCK_N", 64)
    c = special_values(bins)
    xj = np.zeros((len(c), 3), np.float32)
    xj[:, 0] = c
    xi = np.zeros((5, 3), np.float32)
    xi[:, 0] = [1.0, -1.0, 1.0, 0.5, 0.0]
    thresholds = (0.9, 0.5, 0.7, -0.5, 0.0, 0.9999999)
    st = check(xi, xj, False, 4, thresholds, bins, row_offset=9, col_offset=2, edge_threshold=0.7)
    assert st.hist.sum() == xi.shape[0] * len(c)
    # a diagonal tile of single-coordinate rows: products are single float32 roundings, exact in any order
    x = np.zeros((40, 3), np.float32)
    x[:, 0] = c[np.linspace(0, len(c) - 1, 40).astype(int)]
    check(x, x, True, 3, thresholds, bins, edge_threshold=0.5)


@interpreted_only
@pytest.mark.parametrize("diagonal", [True, False])
def test_row_chunks_and_edge_reruns(diagonal: bool, monkeypatch) -> None:
    """Tiny candidate and edge buffers: several row chunks (column top-k merged across them, ties included)
    and edge buffers that overflow, so chunks are run again for their edges at the exact size."""
    monkeypatch.setattr(triton_kernel, "CANDIDATE_ELEMENTS", 1)
    monkeypatch.setattr(triton_kernel, "EDGE_BUFFER", 3)
    assert triton_kernel.chunk_rows(70, 70, 4) == 16
    x = grid_vectors(70, 8, seed=11, duplicates=20)
    x[:10] = x[0]
    xj = x if diagonal else grid_vectors(37, 8, seed=12, duplicates=10)
    offsets = {"row_offset": 5, "col_offset": 5 if diagonal else 90}
    st = check(x, xj, diagonal, 4, THRESHOLDS, 20, edge_threshold=0.5, **offsets)
    assert len(st.edge_rows) > 3
    check(x, xj, diagonal, 0, (), 20, edge_threshold=None)


@interpreted_only
def test_half_precision_is_close() -> None:
    """fp16 products are approximate: the same histogram mass, neighbors close to the fp32 and torch fp16 ones.

    Not bf16: Triton 3.9's interpreter multiplies bf16 operands of ``tl.dot`` as their raw uint16 bits
    (bf16 is lowered in test_compiles_for_hopper instead)."""
    x = grid_vectors(40, 16, seed=2)
    edges = histogram_edges(20)
    want = brute_force(x, x, True, 3, THRESHOLDS, 20)
    st = tile_stats_triton(x, x, True, 3, THRESHOLDS, edges, device="cpu", precision="fp16")
    ref = tile_stats_torch(x, x, True, 3, THRESHOLDS, edges, device="cpu", precision="fp16")
    assert st.hist.sum() == want.hist.sum()
    for vals in (want.row_vals, ref.row_vals):
        finite = np.isfinite(vals)
        np.testing.assert_array_equal(np.isfinite(st.row_vals), finite)
        assert np.abs(st.row_vals[finite] - vals[finite]).max() < 0.01


def test_bad_arguments(monkeypatch) -> None:
    x = grid_vectors(5, 4, seed=1)
    edges = histogram_edges(10)
    with pytest.raises(ValueError, match="precision"):
        tile_stats_triton(x, x, True, 2, THRESHOLDS, edges, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="diagonal"):
        tile_stats_triton(x, x[:3], True, 2, THRESHOLDS, edges, device="cpu")
    with pytest.raises(ValueError, match="span"):
        tile_stats_triton(x, x, True, 2, THRESHOLDS, np.linspace(0, 1, 11), device="cpu")
    with pytest.raises(ValueError, match="edge_threshold"):
        tile_stats_triton(x, x, True, 2, THRESHOLDS, edges, device="cpu", edge_threshold=0.6)
    monkeypatch.setattr(triton_kernel, "triton", None)
    with pytest.raises(ImportError, match="pip install triton"):
        tile_stats_triton(x, x, True, 2, THRESHOLDS, edges, device="cpu")
    monkeypatch.setattr(triton_kernel, "triton", triton)
    monkeypatch.setattr(triton_kernel, "_jitted", lambda: (None, False))  # compiled: CUDA only
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tile_stats_triton(x, x, True, 2, THRESHOLDS, edges, device="cpu")


def test_module_imports_without_triton() -> None:
    """Without triton the module imports; the function says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import numpy as np\n"
        "from enrich_dist.similarity import triton_kernel as t\n"
        "try:\n"
        "    t.tile_stats_triton(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), True, 1, (0.5,),"
        " np.linspace(-1, 1, 5), device='cpu')\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_compiles_for_hopper(monkeypatch, tmp_path) -> None:
    """The compiled (not interpreted) kernel lowers to sm_90 machine code in each of its variants: Triton's
    NVIDIA backend and its bundled ptxas, no GPU. Runs in a compiled process."""
    if INTERPRETED:
        run_pytest("test_compiles_for_hopper", "0", timeout=300)
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("Triton without its NVIDIA backend")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    kernel, interpreted = triton_kernel._jitted()
    assert not interpreted
    pointers = {
        "bin_lim_ptr": "*fp32", "hist_ptr": "*i64", "lim_ptr": "*fp32", "row_cnt_ptr": "*i32", "col_cnt_ptr": "*i32",
        "row_cand_ptr": "*i64", "col_cand_ptr": "*i64", "edge_count_ptr": "*i64", "edge_i_ptr": "*i32",
        "edge_j_ptr": "*i32", "edge_v_ptr": "*fp32",
    }  # fmt: skip
    # everything in fp32 / bf16 with the histogram by atomics per entry, no thresholds / the edge rerun
    for dtype, diagonal, stats, edges, hist_bins, nt in (
        ("fp32", True, True, True, 256, 3), ("bf16", False, True, False, 0, 0), ("fp32", False, False, True, 256, 2),
    ):  # fmt: skip
        meta = {
            "DIAGONAL": diagonal, "ROUND": dtype != "fp32", "STATS": stats, "NT": nt, "TOPK": True, "EDGES": edges,
            "HIST_BINS": hist_bins, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
        }  # fmt: skip
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in meta:
                signature[name] = "constexpr"
            elif name in ("a_ptr", "b_ptr"):
                signature[name] = f"*{dtype}"
            else:
                signature[name] = pointers.get(name, "fp32" if name in ("half", "edge_lim") else "i32")
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=meta),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": triton_kernel.NUM_WARPS},
        )
        assert compiled.asm["cubin"]


@pytest.mark.skipif(INTERPRETED, reason="this process interprets: the kernel tests ran in it")
def test_in_interpreted_process() -> None:
    """Triton was imported compiled before this module: the interpreted tests in a fresh process."""
    run_pytest("not test_compiles_for_hopper and not test_in_interpreted_process", "1", timeout=600)
