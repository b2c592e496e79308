"""``enrich export``: ranking prefixes joined with the manifest, Label Studio tasks, links, rendered frames, s3."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_s3 import _bucket, s3, s3_endpoint  # noqa: F401 - fixtures

from enrich_dist import schema
from enrich_dist.cli import main
from enrich_dist.export import export, parse_duration
from enrich_dist.imaging import decode
from enrich_dist.storage import RunDir, shard_name


def volume(n_frames: int, seed: int = 0):
    """A 6 x 7 x ``n_frames`` NIfTI volume: its slices are the frames a manifest lists."""
    data = np.random.default_rng(seed).random((6, 7, n_frames)).astype(np.float32)
    return nib.Nifti1Image(data, np.eye(4))


def make_run(run: RunDir, archive: str, n_png: int = 5, n_frames: int = 4) -> tuple[list[dict], dict]:
    """A run dir with a manifest (PNG files, frames of one .npy cine) and a 2-replicate ranking; its rows and ranks."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_png):
        path = os.path.join(archive, f"img{i}.png")
        if "://" not in archive:
            os.makedirs(archive, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
        rows.append({"uri": path, "frame": None, "patient_id": f"p{i % 2}", "clip_id": None})
    cine = os.path.join(archive, "cine.nii")
    if "://" not in archive:
        nib.save(volume(n_frames), cine)
    rows += [{"uri": cine, "frame": f, "patient_id": "p9", "clip_id": "c1"} for f in range(n_frames)]
    n = len(rows)
    ids = np.arange(n) * 3 + 1
    table = {name: pa.nulls(n, schema.MANIFEST.field(name).type) for name in schema.MANIFEST.names}
    table.update(
        image_id=pa.array(ids, pa.int64()), uri=pa.array([r["uri"] for r in rows]),
        frame=pa.array([r["frame"] for r in rows], pa.int32()), patient_id=pa.array([r["patient_id"] for r in rows]),
        clip_id=pa.array([r["clip_id"] for r in rows]), status=pa.array(["ok"] * n),
    )
    run.write_table(f"{schema.MANIFEST_DIR}/{shard_name(0)}", pa.table(table, schema=schema.MANIFEST))
    ranks = {}
    parts = []
    for r in range(2):
        order = np.random.default_rng(r).permutation(n)
        ranks[r] = order
        parts.append(pa.table({
            "replicate": pa.array([r] * n, pa.int32()), "rank": pa.array(np.arange(n), pa.int64()),
            "image_id": pa.array(ids[order]), "is_seed": pa.array([k < 2 for k in range(n)]),
            "round": pa.array(np.arange(n), pa.int32()),
            "score": pa.array([None, None] + [float(k) / n for k in range(2, n)], pa.float32()),
        }))
    run.write_table("selection/ranking.parquet", pa.concat_tables(parts))
    run.mark_done("selection", {})
    for row, image_id in zip(rows, ids, strict=True):
        row["image_id"] = int(image_id)
    return rows, ranks


def expected(rows: list[dict], order: np.ndarray, k: int) -> list[tuple]:
    return [(rank, rows[i]["image_id"], rows[i]["uri"], rows[i]["frame"], rows[i]["patient_id"], rows[i]["clip_id"])
            for rank, i in enumerate(order[:k])]


def got_rows(table: pa.Table) -> list[tuple]:
    cols = ["rank", "image_id", "uri", "frame", "patient_id", "clip_id"]
    return list(zip(*[table.column(c).to_pylist() for c in cols], strict=True))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_export_is_the_ranking_prefix_joined_with_the_manifest(tmp_path, fmt: str) -> None:
    run = RunDir(str(tmp_path / "run"))
    rows, ranks = make_run(run, str(tmp_path / "archive"))
    out = str(tmp_path / f"next.{fmt}")
    info = export(run.uri, out, fmt, n=6, replicate=1)
    table = pacsv.read_csv(out) if fmt == "csv" else pq.read_table(out)
    assert info["rows"] == table.num_rows == 6
    if fmt == "parquet":
        assert got_rows(table) == expected(rows, ranks[1], 6)
    else:  # CSV types are inferred: compare ids and uris
        assert table.column("image_id").to_pylist() == [rows[i]["image_id"] for i in ranks[1][:6]]
        assert table.column("uri").to_pylist() == [rows[i]["uri"] for i in ranks[1][:6]]
    scores = table.column("score").to_pylist()
    assert scores[:2] == [None, None] and scores[2] == pytest.approx(2 / 9)
    export(run.uri, out, fmt, budget=0.5)
    n_half = round(0.5 * len(rows))
    assert (pacsv.read_csv(out) if fmt == "csv" else pq.read_table(out)).num_rows == n_half
    assert not os.path.exists(out + ".partial")


def test_labelstudio_tasks_and_rendered_frames(tmp_path) -> None:
    run = RunDir(str(tmp_path / "run"))
    rows, ranks = make_run(run, str(tmp_path / "archive"))
    to = str(tmp_path / "ls")
    info = export(run.uri, to, "labelstudio", n=len(rows))
    tasks = json.load(open(os.path.join(to, "tasks.json")))
    assert isinstance(tasks, list) and len(tasks) == len(rows) and info["rendered"] == 4
    for rank, (task, i) in enumerate(zip(tasks, ranks[0], strict=True)):
        assert set(task) == {"data", "meta"} and set(task["data"]) == {"image"}
        assert task["meta"]["rank"] == rank and task["meta"]["image_id"] == rows[i]["image_id"]
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=")
        path = "/" + url.split("?d=", 1)[1]
        if rows[i]["frame"] is None:
            assert path == rows[i]["uri"]
        else:  # the frame itself, as a PNG, not the cine's uri
            assert path.endswith(f"images/{rows[i]['image_id']}.png")
            want = decode(open(rows[i]["uri"], "rb").read(), rows[i]["uri"], rows[i]["frame"])
            got = np.asarray(Image.open(path), np.float32) / 255
            np.testing.assert_allclose(got, want, atol=1 / 255)


def test_links_folder_named_by_rank(tmp_path) -> None:
    run = RunDir(str(tmp_path / "run"))
    rows, ranks = make_run(run, str(tmp_path / "archive"))
    to = str(tmp_path / "links")
    export(run.uri, to, "links", n=7)
    names = sorted(os.listdir(to))
    assert len(names) == 7
    for rank, (name, i) in enumerate(zip(names, ranks[0][:7], strict=True)):
        assert name.startswith(f"{rank:06d}_{rows[i]['image_id']}.")
        path = os.path.join(to, name)
        if rows[i]["frame"] is None:
            assert os.path.islink(path) and os.readlink(path) == rows[i]["uri"]
        else:
            want = decode(open(rows[i]["uri"], "rb").read(), rows[i]["uri"], rows[i]["frame"])
            assert not os.path.islink(path) and Image.open(path).size == want.shape[::-1]
    export(run.uri, to, "links", n=7)  # a rerun replaces, never fails on existing links
    assert sorted(os.listdir(to)) == names


def test_bad_settings_are_named(tmp_path, caplog) -> None:
    run = RunDir(str(tmp_path / "run"))
    make_run(run, str(tmp_path / "archive"))
    with pytest.raises(ValueError, match="replicates \\[0, 1\\]"):
        export(run.uri, str(tmp_path / "x.csv"), n=3, replicate=5)
    with pytest.raises(ValueError, match="exactly one of --n"):
        export(run.uri, str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="fraction in"):
        export(run.uri, str(tmp_path / "x.csv"), budget=1.5)
    with pytest.raises(ValueError, match="local file"):
        export(run.uri, str(tmp_path / "x.csv"), n=2, presign="1d")
    with pytest.raises(FileNotFoundError, match="enrich select"):
        export(str(tmp_path / "empty"), str(tmp_path / "x.csv"), n=2)
    assert main(["export", "--output", str(tmp_path / "empty"), "--n", "2", "--to", str(tmp_path / "x.csv")]) == 3
    assert main(["export", "--output", run.uri, "--budget", "0.3", "--to", str(tmp_path / "y.csv")]) == 0
    assert pacsv.read_csv(str(tmp_path / "y.csv")).num_rows == 3
    assert [parse_duration(t) for t in ("7d", "12h", "30m", "90s", "60")] == [604800, 43200, 1800, 90, 60]
    for bad in ("8d", "soon", "0"):
        with pytest.raises(ValueError, match="--presign"):
            parse_duration(bad)


def test_s3_run_dir_with_presigned_urls_and_copies(s3, s3_endpoint, tmp_path) -> None:  # noqa: F811
    bucket = _bucket(s3, "export")
    opts = {"endpoint_url": s3_endpoint}
    archive = f"s3://{bucket}/archive"
    run = RunDir(f"s3://{bucket}/run", opts)
    rows, ranks = make_run(run, archive, n_png=3, n_frames=2)
    rng = np.random.default_rng(1)
    for row in rows:
        key = row["uri"].split(f"{bucket}/", 1)[1]
        if row["uri"].endswith(".png") and row["frame"] is None:
            buf = pa.BufferOutputStream()
            Image.fromarray(rng.integers(0, 255, (5, 5), dtype=np.uint8)).save(buf, format="PNG")
            s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue().to_pybytes())
    s3.put_object(Bucket=bucket, Key="archive/cine.nii", Body=volume(2).to_bytes())

    out = str(tmp_path / "next.parquet")
    export(run.uri, out, "parquet", n=5, presign="1h", storage_options=opts)
    table = pq.read_table(out)
    assert got_rows(table) == expected(rows, ranks[0], 5)
    assert all(u.startswith(s3_endpoint) and ("Signature=" in u or "X-Amz-Signature=" in u)
               for u in table.column("url").to_pylist())
    to = str(tmp_path / "links")
    export(run.uri, to, "links", n=5, storage_options=opts)
    names = sorted(os.listdir(to))
    assert len(names) == 5 and not any(os.path.islink(os.path.join(to, name)) for name in names)
    for name, i in zip(names, ranks[0][:5], strict=True):
        if rows[i]["frame"] is None:
            key = rows[i]["uri"].split(f"{bucket}/", 1)[1]
            assert open(os.path.join(to, name), "rb").read() == s3.get_object(Bucket=bucket, Key=key)["Body"].read()
