"""RunDir: atomic writes, shards, done markers, stale temporaries."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from enrich_dist.storage import RunDir, shard_index, shard_name, walk_files


def test_shard_names_round_trip():
    assert shard_name(7) == "part-00007.parquet"
    assert shard_name(123456, "json") == "part-123456.json"
    for i in (0, 1, 99999, 100000):
        assert shard_index(shard_name(i)) == i
    with pytest.raises(ValueError):
        shard_name(-1)
    with pytest.raises(ValueError):
        shard_index("x.parquet")


def test_write_is_atomic_and_listing_skips_temporaries(run_dir):
    run_dir.write_bytes("a/part-00001.parquet", b"x")
    # a crashed writer's leftover must not look like a committed shard
    os.makedirs(run_dir.path("a"), exist_ok=True)
    with open(run_dir.path("a/.tmp-part-00000.parquet.dead"), "wb") as fh:
        fh.write(b"half")
    assert list(run_dir.shards("a")) == [1]
    assert run_dir.remove_stale_tmp("a") == 1
    assert os.listdir(run_dir.path("a")) == ["part-00001.parquet"]


def test_failed_write_leaves_nothing(run_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    run_dir.write_bytes("b/keep.json", b"{}")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        run_dir.write_bytes("b/keep.json", b'{"new": 1}')
    assert run_dir.read_bytes("b/keep.json") == b"{}"
    assert sorted(os.listdir(run_dir.path("b"))) == ["keep.json"]


def test_tables_and_shards_concatenate_in_order(run_dir):
    for i in (2, 0, 1):
        run_dir.write_table(f"t/{shard_name(i)}", pa.table({"v": [i, i]}))
    assert run_dir.read_table("t").column("v").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert run_dir.read_table("t/part-00001.parquet").num_rows == 2
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        run_dir.read_table("missing")


def test_done_markers_and_require(run_dir):
    assert not run_dir.is_done("stage")
    with pytest.raises(FileNotFoundError, match="run `enrich embed --output"):
        run_dir.require("stage", "embed")
    run_dir.mark_done("stage", {"n": 3})
    assert run_dir.is_done("stage")
    run_dir.require("stage", "embed")
    assert run_dir.read_json("stage/_SUCCESS") == {"n": 3}


def test_pickles_without_filesystem(run_dir):
    import pickle

    run_dir.write_bytes("x", b"1")
    clone = pickle.loads(pickle.dumps(run_dir))
    assert clone.read_bytes("x") == b"1" and clone.uri == run_dir.uri


def test_walk_files_recursive_sorted_skips_hidden(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "z.png").write_bytes(b"1")
    (tmp_path / "a.png").write_bytes(b"22")
    (tmp_path / ".hidden.png").write_bytes(b"3")
    (tmp_path / "b" / ".cache").mkdir()
    (tmp_path / "b" / ".cache" / "q.png").write_bytes(b"4")
    found = walk_files(str(tmp_path))
    assert [os.path.relpath(f.uri, tmp_path) for f in found] == ["a.png", "b/c/z.png"]
    assert [f.size for f in found] == [2, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        walk_files(str(tmp_path / "nope"))


def test_local_uri_forms(tmp_path):
    run = RunDir(str(tmp_path / "r") + "/")
    run.write_json("run.json", {"a": 1})
    assert RunDir("file://" + str(tmp_path / "r")).read_json("run.json") == {"a": 1}
