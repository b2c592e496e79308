"""Manifest stage: folders, tables, bad files, dense ids, resume."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from enrich_dist import schema
from enrich_dist.config import ManifestConfig
from enrich_dist.manifest import run_manifest


def write_png(path, value=128, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    write_png(root / "p1" / "a.png", 10)
    write_png(root / "p1" / "b.png", 20)
    write_png(root / "p2" / "deep" / "c.PNG", 30)
    np.save(root / "d.npy", np.eye(5))
    (root / "notes.txt").write_text("not an image")
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def test_folder_scan_marks_bad_files_and_skips_others(ray_local, archive, run_dir):
    stats = run_manifest(run_dir, str(archive), ManifestConfig(shard_size=4))
    table = run_dir.read_table(schema.MANIFEST_DIR)
    assert table.schema == schema.MANIFEST
    rows = {os.path.relpath(r["uri"], archive): r for r in table.to_pylist()}
    assert set(rows) == {"p1/a.png", "p1/b.png", "p2/deep/c.PNG", "d.npy", "zero.png", "corrupt.jpg"}
    assert table.column("image_id").to_pylist() == list(range(6))
    assert rows["zero.png"]["status"] == "error" and "empty file" in rows["zero.png"]["error"]
    assert rows["corrupt.jpg"]["status"] == "error" and rows["corrupt.jpg"]["error"]
    assert all(rows[k]["status"] == "ok" and rows[k]["error"] is None for k in ("p1/a.png", "d.npy", "p2/deep/c.PNG"))
    assert stats["n_ok"] == 4 and stats["n_error"] == 2 and stats["n_skipped_files"] == 1
    assert list(run_dir.shards(schema.MANIFEST_DIR)) == [0, 1]  # 6 rows in shards of 4


def test_table_input_relative_uris_and_optional_columns(ray_local, archive, run_dir):
    csv = archive / "list.csv"
    csv.write_text(
        "uri,patient_id,label,frame,extra\n"
        "p1/a.png,P1,A4C,0,x\n"
        "p1/b.png,P1,NT,1,y\n"
        f"{archive / 'p2' / 'deep' / 'c.PNG'},P2,A4C,0,z\n"
        "p1/a.png,P1,A4C,0,dup\n"
        "missing.png,P3,NT,0,w\n"
    )
    run_manifest(run_dir, str(csv), ManifestConfig())
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    assert [r["uri"] for r in rows[:2]] == [str(archive / "p1" / "a.png"), str(archive / "p1" / "b.png")]
    assert [r["patient_id"] for r in rows] == ["P1", "P1", "P2", "P1", "P3"]
    assert [r["frame"] for r in rows] == [0, 1, 0, 0, 0]
    assert rows[0]["clip_id"] is None and rows[0]["status"] == "ok"
    assert rows[3]["status"] == "error" and "duplicate uri" in rows[3]["error"] and "image_id 0" in rows[3]["error"]
    assert rows[4]["status"] == "error" and rows[4]["error"] == "file not found"


def test_parquet_table_input(ray_local, archive, run_dir):
    path = archive / "list.parquet"
    pq.write_table(pa.table({"uri": ["p1/a.png"], "split": ["test"]}), path)
    run_manifest(run_dir, str(path), ManifestConfig())
    row = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()[0]
    assert row["split"] == "test" and row["status"] == "ok"


def test_bad_inputs_have_clear_errors(ray_local, tmp_path, run_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found.*skipped 1 other files"):
        run_manifest(run_dir, str(tmp_path / "empty"), ManifestConfig())
    (tmp_path / "t.csv").write_text("path\nx.png\n")
    with pytest.raises(ValueError, match=r"t.csv: no 'uri' column"):
        run_manifest(run_dir, str(tmp_path / "t.csv"), ManifestConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_manifest(run_dir, str(tmp_path / "nowhere"), ManifestConfig())
    assert not run_dir.is_done(schema.MANIFEST_DIR)


def test_rerun_skips_and_refuses_other_input(ray_local, archive, run_dir, tmp_path):
    run_manifest(run_dir, str(archive), ManifestConfig())
    before = {p: os.stat(run_dir.path(p)).st_mtime_ns for p in run_dir.shards(schema.MANIFEST_DIR).values()}
    run_manifest(run_dir, str(archive), ManifestConfig())
    after = {p: os.stat(run_dir.path(p)).st_mtime_ns for p in run_dir.shards(schema.MANIFEST_DIR).values()}
    assert before == after
    with pytest.raises(ValueError, match="use a new --output"):
        run_manifest(run_dir, str(tmp_path), ManifestConfig())
