"""The bad-input catalogue: each input is handled, and the message names the file and the fix.

Entries already proven elsewhere are not repeated here (see docs/reliability.md): budgets out of
range (test_selection.py::test_run_select_rejects_bad_config, test_pipeline.py::test_bad_option_value_is_named),
seed ids not in the archive (test_selection.py::test_seed_ids_unknown_are_named), bring-your-own
embeddings of the wrong shape (test_embed.py::test_bring_your_own_bad_files_are_named) and embedding
shards of mixed dimension (test_invariants.py::test_embeddings_of_another_dimension_are_caught).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from enrich_dist import imaging, schema
from enrich_dist.config import EmbedConfig, ManifestConfig, RunConfig
from enrich_dist.embed import run_embed
from enrich_dist.manifest import run_manifest
from enrich_dist.pipeline import run_stages
from enrich_dist.storage import RunDir


def png_bytes(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def texture(seed: int, size: int = 24) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)


def write_textures(root, n: int, start: int = 0) -> list:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = root / f"img{i:02d}.png"
        path.write_bytes(png_bytes(texture(i)))
        paths.append(path)
    return paths


def pixel_config(src, out) -> RunConfig:
    cfg = RunConfig(input=str(src), output=str(out))
    cfg.embed.embedder, cfg.embed.pixel_size = "pixels", 8
    cfg.similarity.top_k = 3
    cfg.select.replicates, cfg.select.budgets = 2, (0.5, 1.0)
    return cfg


# --- empty archives -------------------------------------------------------------------------------


def _empty_folder(tmp_path):
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


def _only_other_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    return tmp_path / "in"


def _header_only_csv(tmp_path):
    (tmp_path / "list.csv").write_text("uri,label\n")
    return tmp_path / "list.csv"


def _empty_parquet(tmp_path):
    pq.write_table(pa.table({"uri": pa.array([], pa.string())}), tmp_path / "list.parquet")
    return tmp_path / "list.parquet"


@pytest.mark.parametrize("make", [_empty_folder, _only_other_files, _header_only_csv, _empty_parquet])
def test_empty_archive_is_refused(ray_local, tmp_path, run_dir, make):  # a folder scan probes in Ray tasks
    src = make(tmp_path)
    with pytest.raises(ValueError, match="no images found") as err:
        run_manifest(run_dir, str(src), ManifestConfig())
    assert str(src) in str(err.value) and "point --input at a folder of images" in str(err.value)
    assert not run_dir.exists(schema.MANIFEST_DIR)


# --- one image ------------------------------------------------------------------------------------


def test_one_image_runs_every_stage(ray_local, tmp_path):
    write_textures(tmp_path / "archive", 1)
    cfg = pixel_config(tmp_path / "archive", tmp_path / "run")
    run_stages(cfg, ("manifest", "train-encoder", "embed", "similarity", "select", "report"))
    run = RunDir(cfg.output)
    summary = run.read_json("similarity/summary.json")
    assert summary["n_images"] == 1 and summary["n_pairs"] == 0
    ranking = run.read_table("selection/ranking.parquet").to_pylist()
    assert [(r["replicate"], r["rank"], r["image_id"]) for r in ranking] == [(0, 0, 0), (1, 0, 0)]
    stages = run.read_json("run.json")["stages"]
    assert all(stages[s]["invariants"]["ok"] for s in ("manifest", "embed", "similarity", "select", "report"))


# --- truncated, corrupt, zero-byte and non-image files --------------------------------------------


def test_unreadable_files_become_error_rows_named_in_the_log(ray_local, tmp_path, run_dir, caplog):
    root = tmp_path / "archive"
    good = write_textures(root, 2)
    full = png_bytes(texture(7, 64))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is a text file with an image extension")
    (root / "notes.txt").write_text("not an image, no image extension")
    with caplog.at_level(logging.WARNING, logger="enrich_dist.manifest"):
        stats = run_manifest(run_dir, str(root), ManifestConfig())
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in run_dir.read_table(schema.MANIFEST_DIR).to_pylist()}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {p.name for p in good}
    assert "empty file (0 bytes)" in rows["zero.png"]["error"]
    assert "not a recognised image format" in rows["text.png"]["error"]
    assert rows["truncated.png"]["error"] and rows["corrupt.jpg"]["error"]
    assert "notes.txt" not in rows and stats["n_skipped_files"] == 1 and stats["n_error"] == 4
    # the log names example files with their reason, and what to do
    assert "4 images cannot be used" in caplog.text and str(root / "corrupt.jpg") in caplog.text
    assert "replace or remove those files" in caplog.text


# --- image kinds: 16-bit, RGBA, palette, tiny -----------------------------------------------------


def _palette_with_transparency() -> bytes:
    img = Image.fromarray(texture(3)).convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


KINDS = {
    "16-bit": lambda: png_bytes(texture(1).astype(np.uint16) * 16),
    "RGBA": lambda: png_bytes(np.dstack([texture(1), texture(2), texture(3), texture(4)])),
    "palette": lambda: png_bytes(np.asarray(Image.fromarray(texture(5)).convert("P")), mode="P"),
    "palette+transparency": _palette_with_transparency,
    "1x1": lambda: png_bytes(np.full((1, 1), 200, np.uint8)),
    "1x1 16-bit": lambda: png_bytes(np.full((1, 1), 4000, np.uint16)),
    "1x1 RGBA": lambda: png_bytes(np.full((1, 1, 4), 90, np.uint8)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_image_kinds_pass_the_check_and_preprocess(tmp_path, kind):
    path = tmp_path / "x.png"
    path.write_bytes(KINDS[kind]())
    assert imaging.probe(path.read_bytes(), str(path)) is None
    out = imaging.load_image(str(path))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert np.isfinite(out).all() and 0.0 <= out.min() <= out.max() <= 1.0


# --- huge images ----------------------------------------------------------------------------------


def write_gray_png(path, width: int, height: int, idat: bool = True) -> None:
    """A width x height 8-bit gray PNG (black with a bright centred square), streamed row by row."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        if idat:
            comp, q = zlib.compressobj(6), width // 4
            dark, bright = b"\x00" + bytes(width), b"\x00" + bytes(q) + b"\xc8" * (width - 2 * q) + bytes(q)
            rows = [comp.compress(bright if height // 4 <= y < height - height // 4 else dark) for y in range(height)]
            fh.write(chunk(b"IDAT", b"".join(rows) + comp.flush()))
        fh.write(chunk(b"IEND", b""))


PEAK_RSS = """
import resource, sys
import numpy as np
from enrich_dist import imaging
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = imaging.load_image(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, out.shape[0], out.shape[1], float(out.mean()))
"""


def test_huge_png_decodes_in_bounded_memory(tmp_path):
    """20000 x 20000 (the pixel limit) decodes at about its own decoded size (400 MB), shrunk before any copy."""
    side = 20000
    path = tmp_path / "huge.png"
    write_gray_png(path, side, side)
    assert path.stat().st_size < 2_000_000  # compresses tiny: a decompression bomb by ratio
    assert imaging.probe(path.read_bytes(), str(path)) is None
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    grew_kib, h, w, mean = out.stdout.split()
    assert (int(h), int(w)) == (64, 64)
    assert float(mean) == pytest.approx(200 / 255, abs=0.02)  # cropped to the bright square
    decoded_mib = side * side / 2**20
    assert int(grew_kib) / 1024 < 1.5 * decoded_mib  # without shrinking first it is about 3x


def test_image_over_the_pixel_limit_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    write_gray_png(path, 30000, 30000, idat=False)  # only the header: nothing would be decoded anyway
    reason = imaging.probe(path.read_bytes(), str(path))
    assert "image too large (900000000 pixels, limit 400000000)" in reason and "downscale it" in reason
    with pytest.raises(imaging.ImageError, match="downscale it"):
        imaging.decode(path.read_bytes(), str(path))


# --- duplicate URIs -------------------------------------------------------------------------------


def test_duplicate_uris_spelled_differently_are_error_rows(ray_local, tmp_path, run_dir):
    write_textures(tmp_path / "img", 2)
    table = tmp_path / "list.csv"
    a = tmp_path / "img" / "img00.png"
    table.write_text(f"uri\nimg/img00.png\n./img/img00.png\nimg/../img/img00.png\n{a}\nfile://{a}\nimg/img01.png\n")
    run_manifest(run_dir, str(table), ManifestConfig())
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error", "ok"]
    assert all(r["error"] == "duplicate uri (same file as image_id 0)" for r in rows[1:5])
    assert {r["uri"] for r in rows} == {str(a), str(tmp_path / "img" / "img01.png")}


# --- constant images ------------------------------------------------------------------------------


def test_constant_images_are_left_out_as_zero_norm(ray_local, tmp_path):
    root = tmp_path / "archive"
    write_textures(root, 4)
    for value in (0, 255):
        (root / f"flat{value}.png").write_bytes(png_bytes(np.full((20, 20), value, np.uint8)))
    cfg = pixel_config(root, tmp_path / "run")
    run_stages(cfg, ("manifest", "train-encoder", "embed", "similarity"))
    run = RunDir(cfg.output)
    errors = run.read_table("embeddings_errors").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in errors) == ["flat0.png", "flat255.png"]
    assert {r["error"] for r in errors} == {"zero-norm embedding"}
    assert run.read_json("similarity/summary.json")["n_images"] == 4
    embed = run.read_json("run.json")["stages"]["embed"]["invariants"]
    assert embed["rows"] == 4 and embed["errors"] == 2 and embed["manifest_ok_rows"] == 6


# --- mismatched manifest columns ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\na.png,x\n", r"no 'uri' column \(found \['path', 'label'\]\); a table input needs a 'uri' column"),
        ("uri,frame\na.png,first\n", r"column 'frame' cannot be read as int32.*fix the values or drop the column"),
        ("uri,label\na.png,x,extra\n", r"cannot read the table .*expected a CSV or Parquet file"),
        ("uri,label\n,x\n", r"1 rows have an empty 'uri'; fill or drop them"),
    ],
)
def test_mismatched_table_columns_are_named(tmp_path, run_dir, text, message):
    (tmp_path / "a.png").write_bytes(png_bytes(texture(0)))
    table = tmp_path / "list.csv"
    table.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        run_manifest(run_dir, str(table), ManifestConfig())
    assert str(table) in str(err.value)
    assert not run_dir.exists(schema.MANIFEST_DIR)


# --- embeddings of the wrong dimension ------------------------------------------------------------


def test_byo_embeddings_of_mixed_dimension_are_named(ray_local, tmp_path, run_dir):
    write_textures(tmp_path / "archive", 2)
    run_manifest(run_dir, str(tmp_path / "archive"), ManifestConfig())
    path = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"image_id": [0, 1], "embedding": [[1.0, 0.0, 0.0], [0.0, 1.0]]}), path)
    with pytest.raises(ValueError, match=r"vectors.parquet: embedding rows have different lengths \[2, 3\]") as err:
        run_embed(run_dir, EmbedConfig(embedder="byo", embeddings=str(path)))
    assert "same dimension" in str(err.value) and not run_dir.is_done(schema.EMBEDDINGS_DIR)


# --- a run dir from an incompatible version or config ---------------------------------------------


@pytest.fixture
def manifest_run(ray_local, tmp_path):
    write_textures(tmp_path / "archive", 3)
    cfg = pixel_config(tmp_path / "archive", tmp_path / "run")
    run_stages(cfg, ("manifest",))
    return cfg, RunDir(cfg.output)


def test_run_dir_of_another_format_is_refused(manifest_run):
    cfg, run = manifest_run
    state = run.read_json("run.json")
    assert state["format"] == 1
    run.write_json("run.json", {**state, "format": 99})
    with pytest.raises(ValueError, match=r"incompatible enrich_dist \(run dir format 99.*new --output folder"):
        run_stages(cfg, ("manifest",))
    run.write_bytes("run.json", b"{not json")
    with pytest.raises(ValueError, match=r"run.json is not readable JSON.*new --output folder"):
        run_stages(cfg, ("manifest",))


def test_completed_stage_with_other_settings_is_refused(manifest_run):
    cfg, run = manifest_run
    before = run.read_bytes("manifest/part-00000.parquet")
    cfg.manifest.shard_size = 2  # an operational setting: the stage is reused as it is
    run_stages(cfg, ("manifest",))
    cfg.manifest.nifti_axis = 0
    with pytest.raises(ValueError, match=r"run/manifest was computed with other manifest settings \(nifti_axis: 2 -> 0\)") as err:
        run_stages(cfg, ("manifest",))
    assert "Start fresh with a new --output folder" in str(err.value)
    assert run.read_bytes("manifest/part-00000.parquet") == before and run.is_done(schema.MANIFEST_DIR)
    assert json.loads(run.read_bytes("run.json"))["stages"]["manifest"]["settings"]["nifti_axis"] == 2


def test_settings_added_after_a_stage_ran_count_as_their_defaults(manifest_run):
    """A run dir from before a setting existed stays usable at that setting's default, and only there."""
    cfg, run = manifest_run
    state = run.read_json("run.json")
    del state["stages"]["manifest"]["settings"]["nifti_axis"]  # as if the setting did not exist yet
    run.write_json("run.json", state)
    run_stages(cfg, ("manifest",))  # the default (2) is what the old stage did
    cfg.manifest.nifti_axis = 0
    with pytest.raises(ValueError, match=r"other manifest settings \(nifti_axis: 2 -> 0\)"):
        run_stages(cfg, ("manifest",))


def test_missing_input_or_stage_fails_before_ray_starts(tmp_path, caplog, monkeypatch):
    """No Ray is started for a command that cannot run: the message names the run dir or input and the fix."""
    from enrich_dist import pipeline
    from enrich_dist.cli import main

    monkeypatch.setattr(pipeline, "ray_session", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main(["select", "--output", str(tmp_path / "no_run")]) == 3  # run-dir data (enrich_dist/errors.py)
    assert "no completed 'embed' stage, which 'select' reads" in caplog.text and "enrich embed --output" in caplog.text
    assert main(["run", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "r")]) == 3
    assert f"--input {tmp_path / 'nowhere'} does not exist" in caplog.text
    assert main(["embed", "--output", str(tmp_path / "no_run")]) == 3
    assert "no completed 'manifest' stage, which 'embed' reads" in caplog.text
