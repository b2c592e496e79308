"""``enrich export``: the images to label first, as a table, a Label Studio task list or a folder of links.

The export is a prefix of one ranking (``selection/ranking.parquet``, replicate ``replicate``; with
``--seed-ids`` every replicate holds the same ranking) joined with the manifest: ``rank``,
``image_id``, ``uri``, ``frame``, ``patient_id``, ``clip_id``, ``score``. A uri alone names the wrong
image for a frame of a DICOM cine or NIfTI volume, and browsers do not show such files (or NPY), so the
``labelstudio`` and ``links`` formats render such images to PNG beside their output (``images/``).
Object-store uris can be presigned (``presign`` seconds) and then carry a ``url`` column.
"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from .errors import ConfigError
from .imaging import decode, manifest_nifti_axis
from .schema import MANIFEST_DIR, RANKING_PATH
from .storage import RunDir, filesystem, read_uri, split_uri

log = logging.getLogger("enrich_dist.export")

FORMATS = ("csv", "parquet", "labelstudio", "links")
RANKING = RANKING_PATH
NEXT_TO_LABEL = "export/next_to_label.csv"
BROWSER_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``7d``, ``12h``, ``30m``, ``3600s`` or ``3600``."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"--presign {text!r}: give a duration such as 7d, 12h, 30m or 3600s")
    seconds = int(float(match.group(1)) * _UNITS[match.group(2)])
    if not 1 <= seconds <= 7 * 86400:
        raise ConfigError(f"--presign {text!r}: object stores sign for 1 s to 7 days")
    return seconds


def ranking_prefix(
    run: RunDir, n: int | None, budget: float | None, replicate: int, seeds: bool = True
) -> pa.Table:
    """The first ``n`` images (or ``budget`` of them, a fraction) of replicate ``replicate``'s ranking, joined with the manifest.

    ``seeds`` False leaves the seed images (already labelled ones, with ``--seed-ids``) out first.
    """
    run.require("selection", "select")
    ranking = run.read_table(RANKING, columns=["replicate", "rank", "image_id", "is_seed", "score"])
    if not seeds:
        ranking = ranking.filter(pc.invert(ranking.column("is_seed")))
    replicates = sorted(set(ranking.column("replicate").to_pylist()))
    if replicate not in replicates:
        raise ConfigError(f"--replicate {replicate}: {run.uri_of(RANKING)} holds replicates {replicates}")
    ranking = ranking.filter(pc.equal(ranking.column("replicate"), replicate)).sort_by("rank")
    total = ranking.num_rows
    if (n is None) == (budget is None):
        raise ConfigError("give exactly one of --n (images) and --budget (a fraction of the ranked images)")
    if budget is not None:
        if not 0 < budget <= 1:
            raise ConfigError(f"--budget {budget}: a fraction in (0, 1]; use --n for a count")
        n = max(1, round(budget * total))
    if n < 1:
        raise ConfigError(f"--n {n}: at least 1")
    prefix = ranking.slice(0, min(n, total))
    manifest = run.read_table(MANIFEST_DIR, columns=["image_id", "uri", "frame", "patient_id", "clip_id"])
    joined = prefix.join(manifest, "image_id", join_type="left outer").sort_by("rank")
    return joined.select(["rank", "image_id", "uri", "frame", "patient_id", "clip_id", "score"])


def write_next_to_label(run: RunDir) -> dict:
    """``export/next_to_label.csv``: an incremental run's ranked images that are not yet labelled, in ranking order."""
    table = ranking_prefix(run, None, 1.0, 0, seeds=False)
    tmp = pa.BufferOutputStream()
    pacsv.write_csv(table, tmp)
    run.write_bytes(NEXT_TO_LABEL, tmp.getvalue().to_pybytes())
    log.info("export: %d images to label next, in ranking order, in %s", table.num_rows, run.uri_of(NEXT_TO_LABEL))
    return {"rows": table.num_rows, "path": NEXT_TO_LABEL}


def _needs_render(uri: str) -> bool:
    """Files a browser cannot show, and every frame of a multi-frame one (DICOM, NIfTI; raster files hold one image)."""
    return not uri.lower().endswith(BROWSER_TYPES)


def _render(uri: str, frame, path: str, storage_options: dict | None, nifti_axis: int) -> None:
    """Decode one image (one frame) and write it as an 8-bit grayscale PNG."""
    img = decode(read_uri(uri, storage_options), uri, frame, nifti_axis)
    Image.fromarray(np.clip(np.round(img * 255), 0, 255).astype(np.uint8), mode="L").save(path)


def _presigned(uris: list[str], seconds: int, storage_options: dict | None) -> list[str]:
    out = []
    for uri in uris:
        protocol, _ = split_uri(uri)
        if protocol == "file":
            raise ConfigError(f"--presign: {uri} is a local file; presigning is for object-store uris (s3://, gs://)")
        fs, path = filesystem(uri, storage_options)
        out.append(fs.sign(path, expiration=seconds))
    return out


def export(
    run_uri: str,
    to: str,
    fmt: str = "csv",
    n: int | None = None,
    budget: float | None = None,
    replicate: int = 0,
    presign: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Write the export; returns what was written (format, rows, path, rendered images)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    run = RunDir(run_uri, storage_options)
    table = ranking_prefix(run, n, budget, replicate)
    if presign is not None:
        table = table.append_column("url", pa.array(_presigned(table.column("uri").to_pylist(),
                                                                parse_duration(presign), storage_options)))
    to = os.path.abspath(os.path.expanduser(to))
    rendered = 0
    if fmt in ("csv", "parquet"):
        os.makedirs(os.path.dirname(to) or ".", exist_ok=True)
        tmp = to + ".partial"
        if fmt == "csv":
            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
        os.replace(tmp, to)
    else:
        rendered = _write_folder(run, table, to, fmt, storage_options)
    log.info("export: %d images of replicate %d as %s in %s (%d rendered to PNG)", table.num_rows, replicate, fmt, to,
             rendered)
    return {"format": fmt, "rows": table.num_rows, "path": to, "rendered": rendered}


def _write_folder(run: RunDir, table: pa.Table, to: str, fmt: str, storage_options: dict | None) -> int:
    """``labelstudio`` (tasks.json, rendered images in images/) or ``links`` (one link, copy or PNG per image, by rank)."""
    os.makedirs(to, exist_ok=True)
    axis = manifest_nifti_axis(run)
    rendered = 0
    tasks = []
    for row in table.to_pylist():
        uri, frame = row["uri"], row["frame"]
        local = split_uri(uri)[0] == "file"
        render = _needs_render(uri)
        ext = ".png" if render else os.path.splitext(uri)[1].lower()
        if fmt == "links":
            target = os.path.join(to, f"{row['rank']:06d}_{row['image_id']}{ext}")
            if os.path.lexists(target):
                os.remove(target)
        else:
            target = os.path.join(to, "images", f"{row['image_id']}.png")
        if render:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _render(uri, frame, target, storage_options, axis)
            rendered += 1
            source = target
        elif fmt == "links" and local:
            os.symlink(split_uri(uri)[1], target)
        elif fmt == "links":
            with open(target, "wb") as f:
                f.write(read_uri(uri, storage_options))
        else:
            source = split_uri(uri)[1] if local else uri
        if fmt == "labelstudio":
            if row.get("url"):
                url = row["url"]
            elif render or local:  # Label Studio's local-file serving, document root /
                url = "/data/local-files/?d=" + source.lstrip("/")
            else:  # served by a cloud storage connected in Label Studio
                url = uri
            tasks.append({"data": {"image": url}, "meta": {k: v for k, v in row.items() if k != "url"}})
    if fmt == "labelstudio":
        tmp = os.path.join(to, "tasks.json.partial")
        with open(tmp, "w") as f:
            json.dump(tasks, f, indent=1)
        os.replace(tmp, os.path.join(to, "tasks.json"))
    return rendered
