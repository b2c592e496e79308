"""Security checks: paths confined to the archive root, no credentials in outputs, escaped HTML, safe checkpoints.

Proven elsewhere, not repeated: every rendered Kubernetes pod runs non-root, without privilege
escalation, with all capabilities dropped and a read-only root (test_k8s.py::
test_pods_run_as_non_root_with_read_only_root); credentials reach pods from Secrets only
(test_k8s.py::test_run_lifecycle_and_credentials, test_pseudonym_key_reaches_the_driver_only);
URIs and labels with markup are escaped in the report (test_report.py::test_full_report_renders_every_section);
S3 client loggers never log at DEBUG and retry logs redact URIs (test_s3.py::test_with_retries_passes_results_and_redacts_uris).
"""

from __future__ import annotations

import html
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from enrich_dist import schema
from enrich_dist.cli import main
from enrich_dist.config import ManifestConfig, RunConfig
from enrich_dist.encoder import load_encoder
from enrich_dist.manifest import confine, run_manifest
from enrich_dist.pipeline import public_config
from enrich_dist.storage import RunDir

MARKER = "MARKER-5ecret-9f27c1"  # a credential value that must never be written anywhere
HOSTILE = "\"'><script>alert(1)</script>"


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((24, 24)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --- paths confined to the archive root -----------------------------------------------------------


@pytest.fixture
def layout(tmp_path):
    """archive/ with a table and images, and a secret image beside it, outside the archive."""
    archive = tmp_path / "archive"
    (archive / "img").mkdir(parents=True)
    (archive / "img" / "a.png").write_bytes(png_bytes(0))
    (tmp_path / "outside.png").write_bytes(png_bytes(1))
    os.symlink(tmp_path / "outside.png", archive / "img" / "link.png")
    return archive


@pytest.mark.parametrize(
    "entry, declared_root",
    [
        ("../outside.png", False),  # a relative path climbing out of the table's folder
        ("img/../../outside.png", False),
        ("img/link.png", False),  # a symlink under the folder pointing outside it
        ("{tmp}/outside.png", True),  # an absolute path outside the declared root
        ("file://{tmp}/outside.png", True),  # file:// to elsewhere
        ("{archive}/img/link.png", True),
    ],
)
def test_table_paths_outside_the_root_are_refused(layout, run_dir, entry, declared_root):
    tmp = layout.parent
    table = layout / "list.csv"
    table.write_text(f"uri\nimg/a.png\n{entry.format(tmp=tmp, archive=layout)}\n")
    cfg = ManifestConfig(root=str(layout) if declared_root else None)
    with pytest.raises(ValueError, match=r"1 image paths lie outside the archive root") as err:
        run_manifest(run_dir, str(table), cfg)
    message = str(err.value)
    assert str(table) in message and str(layout) in message and "set --archive-root" in message
    assert not run_dir.exists(schema.MANIFEST_DIR)


def test_archive_root_option_confines_a_table_from_the_command_line(layout, tmp_path, caplog):
    table = layout / "list.csv"
    table.write_text(f"uri\nimg/a.png\n{layout.parent}/outside.png\n")
    out = tmp_path / "run"
    argv = ["manifest", "--input", str(table), "--output", str(out), "--archive-root", str(layout)]
    with caplog.at_level(logging.ERROR, logger="enrich_dist"):
        assert main(argv) == 3  # input data outside the root
    assert "outside the archive root" in caplog.text and "outside.png" in caplog.text
    assert not (out / schema.MANIFEST_DIR / "_SUCCESS").exists()


def test_paths_inside_the_root_are_kept(ray_local, layout, run_dir):
    table = layout / "list.csv"
    table.write_text(f"uri\nimg/a.png\n./img/../img/a.png\n{layout}/img/a.png\n")
    run_manifest(run_dir, str(table), ManifestConfig(root=str(layout)))
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    assert {r["uri"] for r in rows} == {str(layout / "img" / "a.png")}
    assert [r["status"] for r in rows] == ["ok", "error", "error"]  # the same file, listed thrice


def test_folder_scan_with_declared_root_refuses_escaping_links(layout, run_dir):
    with pytest.raises(ValueError, match=r"link.png"):
        run_manifest(run_dir, str(layout / "img"), ManifestConfig(root=str(layout / "img")))


def test_mask_paths_are_confined_too(layout, run_dir):
    table = layout / "list.csv"
    table.write_text("uri,mask_uri\nimg/a.png,../outside.png\n")
    with pytest.raises(ValueError, match=r"outside the archive root .*outside.png"):
        run_manifest(run_dir, str(table), ManifestConfig())


@pytest.mark.parametrize(
    "uri",
    ["s3://other/archive/a.png", "s3://bucket/archive2/a.png", "s3://bucket/archive/../private/a.png",
     "gs://bucket/archive/a.png", "/etc/passwd", "file:///etc/passwd"],
)
def test_object_store_uris_outside_the_root_are_refused(uri):
    with pytest.raises(ValueError, match="outside the archive root 's3://bucket/archive'"):
        confine(pa.array(["s3://bucket/archive/x/b.png", uri]), "s3://bucket/archive/list.csv", "s3://bucket/archive")
    confine(pa.array(["s3://bucket/archive/x/b.png"]), "s3://bucket/archive/list.csv", "s3://bucket/archive")


# --- no credentials in run.json, logs or the report; hostile strings escaped ------------------------


@pytest.fixture(scope="module")
def hostile_run(ray_local, tmp_path_factory):
    """The whole pipeline (pixels, report) on a table with markup in uris, patients, clips and labels,
    run through the command line with credentials set to a marker; returns the run and its log."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("hostile")
    archive = root / "archive"
    folder = archive / f"d{HOSTILE.replace('/', '_')}"
    folder.mkdir(parents=True)
    lines = ["uri,patient_id,clip_id,label"]
    for i in range(10):
        (folder / f"x{i}.png").write_bytes(png_bytes(i))
        lines.append(f'"{folder.name.replace(chr(34), chr(34) * 2)}/x{i}.png",'
                     f'"P{i % 3}{HOSTILE.replace(chr(34), chr(34) * 2)}",c{i % 5},"{["A4C", HOSTILE][i % 2].replace(chr(34), chr(34) * 2)}"')
    shutil.copy(get_testdata_file("US1_UNCR.dcm"), archive / "us.dcm")  # a DICOM: the pseudonym key is used
    lines.append("us.dcm,,,A4C")
    (archive / "list.csv").write_text("\n".join(lines) + "\n")
    env = {"AWS_SECRET_ACCESS_KEY": MARKER, "AWS_ACCESS_KEY_ID": MARKER, "ENRICH_PSEUDONYM_KEY": MARKER,
           "AWS_SESSION_TOKEN": MARKER}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logger = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        out = root / "run"
        code = main(["run", "--input", str(archive / "list.csv"), "--output", str(out), "--log-level", "DEBUG",
                     "--embedder", "pixels", "--replicates", "2", "--budgets", "0.5,1.0", "--top-k", "3",
                     "--model", "linear"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0, stream.getvalue()[-3000:]
    return RunDir(str(out)), stream.getvalue()


def test_no_credentials_in_run_dir_or_logs(hostile_run):
    run, log_text = hostile_run
    assert "open file:" in log_text and "stage report: finished" in log_text  # captured at DEBUG level
    assert MARKER not in log_text
    files = [p for p in Path(run.uri).rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.name == "index.html" for p in files)
    for path in files:
        assert MARKER.encode() not in path.read_bytes(), path
    manifest = run.read_table(schema.MANIFEST_DIR)
    dicom_row = [r for r in manifest.to_pylist() if r["uri"].endswith("us.dcm")][0]
    assert dicom_row["status"] == "ok" and len(dicom_row["patient_id"]) > 8  # a keyed pseudonym was written


def test_credentials_in_uris_are_redacted_from_run_json():
    cfg = RunConfig(input=f"s3://AKIA:{MARKER}@bucket/list.csv", output=f"s3://k:{MARKER}@bucket/run")
    cfg.select.seed_ids = f"s3://u:{MARKER}@bucket/seeds.csv"
    stored = repr(public_config(cfg))
    assert MARKER not in stored and "s3://bucket/list.csv" in stored and "s3://bucket/run" in stored


def test_report_escapes_every_hostile_string(hostile_run):
    run, _ = hostile_run
    page = (Path(run.uri) / "report" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert HOSTILE not in page and "alert(1)</script>" not in page
    assert html.escape(HOSTILE) in page  # the label is shown, escaped
    # no attribute is broken open: with every name="value" pair removed, no quote or bracket is left in a tag
    for tag in re.findall(r"<[a-zA-Z][^>]*>", page):
        rest = re.sub(r'\s[\w:-]+="[^"]*"', "", tag[1:-1])
        assert not re.search(r"[\"'<=]", rest), tag[:200]


# --- checkpoints are loaded with weights_only -----------------------------------------------------


class _Payload:
    """Unpickling this would run code: it creates the file named by ``target``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"format": 1, "config": {}, "state_dict": {}, "x": _Payload(str(target))}, buf)
    with pytest.raises(ValueError, match=r"encoder/vae.pt is not a loadable .*Weights only load failed") as err:
        load_encoder(buf.getvalue())
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert "rerun `enrich train-encoder`" in str(err.value)
    assert not target.exists()


def test_damaged_checkpoint_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"encoder/vae.pt is not a loadable encoder checkpoint .*train-encoder"):
        load_encoder(b"\x00not a checkpoint")


def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(__file__).resolve().parents[1] / "enrich_dist"
    calls = []
    for path in package.rglob("*.py"):
        for match in re.finditer(r"torch\.load\((.*?)\)\n", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls, "the encoder loads its checkpoint with torch.load"
    assert all("weights_only=True" in args for _, args in calls), calls


_USAGE_PROBE = """
import os
os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
from enrich_dist.runtime import ray_session
with ray_session(num_cpus=1):
    import ray
    from ray._common.usage import usage_lib
    worker = ray.get(ray.remote(lambda: os.environ.get("RAY_USAGE_STATS_ENABLED")).remote())
    print("driver", usage_lib.usage_stats_enabled(), "worker", worker)
"""


def test_local_run_reports_no_usage_statistics():
    """A local Ray started by enrich_dist, with nothing set in the environment, has usage reporting off in the
    driver (Ray's own check) and in its workers."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
    done = subprocess.run([sys.executable, "-c", _USAGE_PROBE], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "driver False worker 0" in done.stdout, done.stdout + done.stderr[-2000:]
