"""DICOM ingestion on real files shipped in registry packages: cines, LUTs, colour, regions, privacy, manifest."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import zipfile

import numpy as np
import pydicom
import pytest
from deid_data.data import get_dataset
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from enrich_dist import imaging, schema
from enrich_dist.config import EmbedConfig, EncoderConfig, ManifestConfig
from enrich_dist.embed import run_embed
from enrich_dist.encoder import train as train_module
from enrich_dist.imaging.formats import NotAnImage, dicom
from enrich_dist.imaging.formats.pseudonym import KEY_VARIABLE, identifier_mapper, key_from_env, pseudonym
from enrich_dist.manifest import run_manifest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about odd values in test files
KEY = "test-key-0123456789abcdef"
CINE_FRAMES = 30


def pydicom_file(name: str) -> str:
    """A pydicom / pydicom-data test file that ships in the installed packages (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path and os.path.isfile(path), f"{name} should ship with pydicom or pydicom-data (the test extra)"
    return path


def deid(folder: str, name: str) -> str:
    """A file of the deid-data package."""
    path = os.path.join(get_dataset(folder), name)
    assert os.path.isfile(path), f"{name} should ship with deid-data (the test extra)"
    return path


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes handed out."""

    def __init__(self, fh):
        self.fh, self.bytes_read = fh, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readinto(self, buf) -> int:
        data = self.fh.read(len(buf))
        buf[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)


def test_echo_cine_header_only_and_frames():
    path = deid("ultrasounds", "ultrasound-multiframe.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with open(path, "rb") as raw:
        counted = CountingFile(raw)
        header = dicom.read_header(counted, os.path.getsize(path))
    assert header.frames == CINE_FRAMES and header.patient_id == str(ds.PatientID)
    assert header.clip_uid == ds.SOPInstanceUID  # a cine is its own clip
    assert counted.bytes_read < 64 * 1024 < os.path.getsize(path) // 100  # stopped before 43 MB of pixels

    frames = dicom.DicomFrames(read(path))
    region = ds.SequenceOfUltrasoundRegions[0]
    expected_shape = (
        region.RegionLocationMaxY1 - region.RegionLocationMinY0 + 1,
        region.RegionLocationMaxX1 - region.RegionLocationMinX0 + 1,
    )
    first = frames(0)
    assert first.shape == expected_shape and first.dtype == np.float32
    full = pydicom.dcmread(path).pixel_array[5]
    y0, x0 = region.RegionLocationMinY0, region.RegionLocationMinX0
    crop = full[y0 : y0 + expected_shape[0], x0 : x0 + expected_shape[1]]
    np.testing.assert_allclose(frames(5), luma(crop) / 255.0, atol=1e-5)
    with pytest.raises(imaging.ImageError, match="frame 30 out of range: the file has 30 frames"):
        frames(CINE_FRAMES)


def test_load_images_reads_a_cine_once_per_batch(monkeypatch):
    path = deid("ultrasounds", "ultrasound-multiframe.dcm")
    reads = []
    real = imaging.read_uri
    monkeypatch.setattr(imaging, "read_uri", lambda uri, opts=None: reads.append(uri) or real(uri, opts))
    uris, frames = [path] * 10 + ["/nowhere/x.png"], list(range(0, 30, 3)) + [None]
    images, errors = imaging.load_images(uris, 32, threads=2, frames=frames)
    assert reads.count(path) == 1
    assert errors[:10] == [None] * 10 and errors[10] == "file not found"
    diffs = [float(np.abs(images[0] - images[i]).mean()) for i in range(1, 10)]
    assert 0 < min(diffs) and max(diffs) < 0.1  # distinct frames, all near-duplicates of one clip
    with pytest.raises(ValueError, match="2 frames for 1 uris"):
        imaging.load_images([path], 32, frames=[0, 1])


@pytest.mark.parametrize("name, n_frames, photometric", [("GREYSCALE_CINE", 27, "MONOCHROME2"), ("RGB_CINE", 51, "RGB")])
def test_zipped_cines(name, n_frames, photometric):
    with zipfile.ZipFile(deid("ultrasounds", f"{name}.zip")) as zf:
        info = zf.getinfo(f"{name}.dcm")
        with zf.open(info) as fh:
            header = dicom.read_header(fh, info.file_size)
        data = zf.read(info)
    assert header.frames == n_frames
    frames = dicom.DicomFrames(data)
    assert frames.ds.PhotometricInterpretation == photometric and frames.box is not None
    first, last = imaging.preprocess(frames(0), 64), imaging.preprocess(frames(n_frames - 1), 64)
    assert first.std() > 0.02 and last.std() > 0.02
    cosine = float((first * last).sum() / np.linalg.norm(first) / np.linalg.norm(last))
    assert cosine > 0.9  # frames of one clip are near-duplicates: the redundancy ENRICH removes


def test_monochrome1_chest_xray_inverted_at_full_bit_depth():
    path = pydicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15 and raw.max() > 255
    windowed = apply_voi_lut(apply_modality_lut(raw, ds), ds)
    expected = 1.0 - windowed / (2**ds.BitsStored - 1)  # unsigned: pydicom's window output spans 0 .. 2^bits - 1
    ours = imaging.decode(read(path), path)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert len(np.unique(ours)) > 1024  # not squeezed to 8 bits
    assert np.corrcoef(ours[::8, ::8].ravel(), raw[::8, ::8].ravel())[0, 1] < -0.9  # inverted: high values dark


def test_ct_rescale_and_mr_window():
    ct_path, mr_path = pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")
    ct = pydicom.dcmread(ct_path)
    hu = apply_modality_lut(ct.pixel_array, ct)
    assert "WindowCenter" not in ct and hu.min() < 0  # signed, rescaled, no window: min-max of Hounsfield units
    np.testing.assert_allclose(imaging.decode(read(ct_path), ct_path), (hu - hu.min()) / np.ptp(hu), atol=1e-6)
    mr = pydicom.dcmread(mr_path)
    assert mr.PixelRepresentation == 1 and mr.BitsStored == 16
    lo, hi = -(2**15), 2**15 - 1  # signed 16-bit: the window output range
    expected = (apply_voi_lut(apply_modality_lut(mr.pixel_array, mr), mr) - lo) / (hi - lo)
    np.testing.assert_allclose(imaging.decode(read(mr_path), mr_path), expected, atol=1e-6)


def test_voi_lut_sequence_and_modality_lut_sequence():
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        path = pydicom_file(name)
        ds = pydicom.dcmread(path)
        out = imaging.decode(read(path), path)
        values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        assert out.shape == values.shape and 0.0 <= out.min() and out.max() <= 1.0
        assert np.corrcoef(out.ravel(), values.ravel().astype(np.float64))[0, 1] > 0.999


def test_colour_rgb_ybr_and_palette():
    us = pydicom_file("US1_UNCR.dcm")
    ds = pydicom.dcmread(us)
    assert ds.PhotometricInterpretation == "RGB" and "SequenceOfUltrasoundRegions" not in ds
    np.testing.assert_allclose(imaging.decode(read(us), us), luma(ds.pixel_array) / 255.0, atol=1e-5)
    ybr, rgb = pydicom_file("SC_ybr_full_422_uncompressed.dcm"), pydicom_file("SC_rgb.dcm")
    assert np.abs(imaging.decode(read(ybr), ybr) - imaging.decode(read(rgb), rgb)).max() < 0.01
    palette = pydicom_file("gdcm-US-ALOKA-16.dcm")
    pds = pydicom.dcmread(palette)
    assert pds.PhotometricInterpretation == "PALETTE COLOR"
    colour = apply_color_lut(pds.pixel_array, pds)
    regions = [r for r in pds.SequenceOfUltrasoundRegions if r.RegionSpatialFormat == 1]
    y0, y1 = min(r.RegionLocationMinY0 for r in regions), max(r.RegionLocationMaxY1 for r in regions) + 1
    x0, x1 = min(r.RegionLocationMinX0 for r in regions), max(r.RegionLocationMaxX1 for r in regions) + 1
    assert (y1 - y0, x1 - x0) != colour.shape[:2]  # the crop removes the annotated border
    expected = luma(colour[y0:y1, x0:x1]) / np.iinfo(colour.dtype).max
    np.testing.assert_allclose(imaging.decode(read(palette), palette), expected, atol=1e-5)


def test_compressed_transfer_syntaxes_decode_or_fail_clearly():
    j2k, plain = pydicom_file("US1_J2KR.dcm"), pydicom_file("US1_UNCR.dcm")
    if get_decoder(pydicom.dcmread(j2k, stop_before_pixels=True).file_meta.TransferSyntaxUID).is_available:
        np.testing.assert_array_equal(imaging.decode(read(j2k), j2k), imaging.decode(read(plain), plain))  # lossless
    jpeg_ls = pydicom_file("JPEGLSNearLossless_08.dcm")
    tsyntax = pydicom.dcmread(jpeg_ls, stop_before_pixels=True).file_meta.TransferSyntaxUID
    images, errors = imaging.load_images([jpeg_ls, plain], 16)
    assert errors[1] is None
    if get_decoder(tsyntax).is_available:
        assert errors[0] is None and images[0].std() > 0
    else:
        assert "no decoder plugin" in errors[0] and "dicom-codecs" in errors[0] and tsyntax.name in errors[0]
        with open(jpeg_ls, "rb") as fh, pytest.raises(imaging.ImageError, match="enrich-dist\\[dicom-codecs\\]"):
            dicom.read_header(fh, os.path.getsize(jpeg_ls))


def test_header_problems(tmp_path):
    ct = read(pydicom_file("CT_small.dcm"))
    short = tmp_path / "short.dcm"
    short.write_bytes(ct[: len(ct) - 1000])
    with open(short, "rb") as fh, pytest.raises(imaging.ImageError, match="truncated DICOM"):
        dicom.read_header(fh, len(ct) - 1000)
    plan = pydicom_file("rtplan.dcm")
    with open(plan, "rb") as fh, pytest.raises(NotAnImage):
        dicom.read_header(fh, os.path.getsize(plan))
    with pytest.raises(imaging.ImageError, match="not a DICOM file|not a readable DICOM"):
        imaging.decode(b"\x00" * 64 + b"junk" * 50, "junk.dcm")
    with pytest.raises(imaging.ImageError, match="without pixel data"):
        imaging.decode(read(plan), plan)


def test_pseudonyms_are_keyed_and_need_a_key(monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=f"{KEY_VARIABLE}.*--no-pseudonymise"):
        key_from_env()
    mapped = identifier_mapper(True)
    assert mapped(None) is None and mapped("") is None  # no key needed when there is nothing to hide
    with pytest.raises(ValueError, match=KEY_VARIABLE):
        mapped("PAT-1")
    monkeypatch.setenv(KEY_VARIABLE, "short")
    with pytest.raises(ValueError, match="at least 16"):
        key_from_env()
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    mapped = identifier_mapper(True)
    assert mapped("PAT-1") == pseudonym("PAT-1", KEY.encode()) == mapped("PAT-1")
    assert len(mapped("PAT-1")) == 16 and "PAT" not in mapped("PAT-1")
    assert pseudonym("PAT-1", b"another-key-0123456789") != mapped("PAT-1")
    assert identifier_mapper(False)("PAT-1") == "PAT-1"


def write_png(path, value: int = 100) -> None:
    Image.fromarray(np.full((20, 30), value, np.uint8)).save(path)


@pytest.fixture
def mixed_archive(tmp_path):
    """DICOM (a cine, an extensionless still, a non-image object, a truncated and a junk file), PNG and junk."""
    root = tmp_path / "archive"
    (root / "echo").mkdir(parents=True)
    os.symlink(deid("ultrasounds", "ultrasound-multiframe.dcm"), root / "echo" / "cine.dcm")
    shutil.copy(pydicom_file("US1_UNCR.dcm"), root / "echo" / "IM0001")  # found by its DICM marker
    shutil.copy(pydicom_file("rtplan.dcm"), root / "plan.dcm")  # a DICOM without an image: skipped
    ct = read(pydicom_file("CT_small.dcm"))
    (root / "ct_short.dcm").write_bytes(ct[:-1000])
    (root / "junk.dcm").write_bytes(b"not dicom at all" * 20)
    write_png(root / "still.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_mixed_folder_end_to_end(ray_local, mixed_archive, run_dir, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    stats = run_manifest(run_dir, str(mixed_archive), ManifestConfig(shard_size=16))
    table = run_dir.read_table(schema.MANIFEST_DIR)
    assert table.schema == schema.MANIFEST
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == list(range(len(rows)))
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(os.path.relpath(r["uri"], mixed_archive), []).append(r)
    assert set(by_file) == {"echo/cine.dcm", "echo/IM0001", "ct_short.dcm", "junk.dcm", "still.png"}
    cine = by_file["echo/cine.dcm"]
    header = pydicom.dcmread(mixed_archive / "echo" / "cine.dcm", stop_before_pixels=True)
    assert [r["frame"] for r in cine] == list(range(CINE_FRAMES)) and {r["status"] for r in cine} == {"ok"}
    assert {r["clip_id"] for r in cine} == {pseudonym(header.SOPInstanceUID, KEY.encode())}
    assert {r["patient_id"] for r in cine} == {pseudonym(str(header.PatientID), KEY.encode())}
    still = by_file["echo/IM0001"][0]
    assert still["status"] == "ok" and still["frame"] is None
    us = pydicom.dcmread(pydicom_file("US1_UNCR.dcm"), stop_before_pixels=True)
    assert still["clip_id"] == pseudonym(us.SeriesInstanceUID, KEY.encode())
    assert "truncated" in by_file["ct_short.dcm"][0]["error"] and by_file["junk.dcm"][0]["status"] == "error"
    assert by_file["still.png"][0]["status"] == "ok" and by_file["still.png"][0]["patient_id"] is None
    assert stats["n_images"] == CINE_FRAMES + 4 and stats["n_error"] == 2 and stats["n_skipped_files"] == 2
    assert stats["n_dicom_files"] == 4 and stats["n_multiframe_files"] == 1 and stats["pseudonymised"] is True
    identifiers = {str(header.PatientID), header.SOPInstanceUID, header.SeriesInstanceUID, str(us.PatientID)}
    written = {v for r in rows for v in r.values() if isinstance(v, str)} | set(stats["skipped_examples"])
    assert not written & identifiers  # the cine's PatientID is "1": compare whole values
    assert not any(ident in value for ident in identifiers if len(ident) > 8 for value in written)

    embed = run_embed(run_dir, EmbedConfig(embedder="pixels", batch_size=8, num_actors=1, decode_threads=1))
    assert embed["n_embedded"] == stats["n_ok"]
    vectors = run_dir.read_table(schema.EMBEDDINGS_DIR).to_pydict()
    emb = dict(zip(vectors["image_id"], np.asarray(vectors["embedding"]), strict=True))
    first, mid = emb[cine[0]["image_id"]], emb[cine[15]["image_id"]]
    assert 0.8 < float(first @ mid) < 0.99999  # different frames decoded, one redundant clip

    ids, uris, frames = train_module.sample_manifest(run_dir, EncoderConfig(sample=8, seed=1))
    by_id = {r["image_id"]: r for r in rows}
    assert frames == [by_id[int(i)]["frame"] for i in ids] and any(f is not None for f in frames)


def test_identifiers_need_a_key_or_an_opt_out(ray_local, mixed_archive, run_dir, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=KEY_VARIABLE):
        run_manifest(run_dir, str(mixed_archive), ManifestConfig())
    assert not run_dir.is_done(schema.MANIFEST_DIR)
    cfg = dataclasses.replace(ManifestConfig(), pseudonymise=False, sniff_dicom=False)
    stats = run_manifest(run_dir, str(mixed_archive), cfg)
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    header = pydicom.dcmread(mixed_archive / "echo" / "cine.dcm", stop_before_pixels=True)
    assert {r["patient_id"] for r in rows if r["uri"].endswith("cine.dcm")} == {str(header.PatientID)}
    assert not any(r["uri"].endswith("IM0001") for r in rows)  # no sniffing: extensionless files are skipped
    assert stats["pseudonymised"] is False and stats["n_skipped_files"] == 3


def test_table_input_picks_frames_and_keeps_given_ids(ray_local, tmp_path, run_dir, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    cine = deid("ultrasounds", "ultrasound-multiframe.dcm")
    (tmp_path / "list.csv").write_text(
        f"uri,frame,patient_id,label\n{cine},4,P7,A4C\n{cine},,,NT\n{cine},40,,NT\n{cine},4,,dup\n"
    )
    run_manifest(run_dir, str(tmp_path / "list.csv"), ManifestConfig())
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    assert len(rows) == 1 + CINE_FRAMES + 2
    assert rows[0]["frame"] == 4 and rows[0]["patient_id"] == "P7" and rows[0]["label"] == "A4C"
    assert [r["frame"] for r in rows[1 : 1 + CINE_FRAMES]] == list(range(CINE_FRAMES))
    assert {r["label"] for r in rows[1 : 1 + CINE_FRAMES]} == {"NT"}
    assert "frame 40 out of range" in rows[-2]["error"]
    assert rows[-1]["status"] == "error" and "image_id 0" in rows[-1]["error"]
