"""Manifest stage: one row per image of the archive (per frame of a cine, per slice of a volume), with dense ids.

Every file is checked in parallel Ray tasks; DICOM and NIfTI files are read up to their headers only.
Identifiers read from DICOM headers (PatientID; the clip's SOPInstanceUID for a cine, else the
SeriesInstanceUID) are written as keyed pseudonyms (HMAC-SHA256 with ``ENRICH_PSEUDONYM_KEY``,
computed on the driver so the key never reaches a worker or the run dir) unless pseudonymisation is
turned off; no other header value reaches the outputs. Values given in a table input are kept as given.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from . import imaging, schema, stages
from .config import ManifestConfig, RunConfig
from .errors import ConfigError
from .executor import Context, done_record, execute
from .fingerprints import fingerprint_files
from .imaging import formats
from .imaging.formats.pseudonym import identifier_mapper, key_from_env
from .invariants import count_duplicates, ids_of
from .runtime import as_completed
from .storage import RunDir, filesystem, join_uri, read_uri, redact_uri, shard_name, split_uri, walk_files

log = logging.getLogger(__name__)
HEADER_BLOCK = 256 * 1024  # read-ahead of header-only reads (object stores default to tens of MB)
RASTER_EXTENSIONS = (*imaging.PIL_EXTENSIONS, *imaging.NPY_EXTENSIONS)
TABLE_EXTENSIONS = (".csv", ".parquet")
PROBE_CHUNK = 256


def is_table(src: str) -> bool:
    """Whether the input is a table of URIs rather than a folder or prefix of images."""
    return src.lower().endswith(TABLE_EXTENSIONS)


def _dirname(uri: str) -> str:
    protocol, path = split_uri(uri)
    parent = posixpath.dirname(path)
    return parent if protocol == "file" else f"{protocol}://{parent}"


def _resolve(uri: str, base: str) -> str:
    """A table's uri made absolute against the table's folder; local paths normalised (``./``, ``..``)."""
    if uri.startswith("file://"):
        return os.path.normpath(uri[len("file://") :])
    if "://" in uri:
        return uri
    if uri.startswith("/"):
        return os.path.normpath(uri)
    joined = join_uri(base, uri)
    return joined if "://" in joined else os.path.normpath(joined)




def _inside(uri: str, protocol: str, root: str, links: bool) -> bool:
    scheme, path = split_uri(uri)
    if scheme != protocol:
        return False
    if protocol == "file":
        real = os.path.realpath(path) if links else os.path.normpath(path)  # realpath resolves symlinks too
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)
    return path.startswith(root.rstrip("/") + "/") and ".." not in path.split("/")


def confine(uris: pa.Array | pa.ChunkedArray, src: str, root: str, links: bool = True) -> None:
    """Refuse ``uris`` (of images or masks) that lie outside the archive ``root``, naming them and the fix.

    ``links`` resolves symlinks before the check (table inputs); a folder scan lists the operator's own
    tree, whose links are followed as they are.
    """
    protocol, path = split_uri(root)
    root_path = (os.path.realpath(path) if links else os.path.normpath(path)) if protocol == "file" else path
    outside = [u for u in uris.to_pylist() if u is not None and not _inside(u, protocol, root_path, links)]
    if outside:
        shown = ", ".join(repr(redact_uri(u)) for u in outside[:3])
        raise ValueError(
            f"{redact_uri(src)}: {len(outside)} image paths lie outside the archive root {redact_uri(root)!r} "
            f"(e.g. {shown}; '..', other buckets, file:// paths and symlinks are resolved first): list only "
            "images under the root, or set --archive-root (manifest.root in --config) to a folder that holds them all"
        )


def read_source_table(src: str, storage_options: dict | None = None) -> pa.Table:
    """Read a CSV/Parquet table of URIs; relative URIs resolve against the table's folder."""
    data = read_uri(src, storage_options)
    try:
        if src.lower().endswith(".csv"):
            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in ("uri", "patient_id", "clip_id", "label", "split", "mask_uri")},
                    strings_can_be_null=True,  # an empty cell is no value (a DICOM's header id is then used)
                ),
            )
        else:
            table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{src}: cannot read the table ({exc}); expected a CSV or Parquet file") from None
    if "uri" not in table.column_names:
        raise ValueError(
            f"{src}: no 'uri' column (found {table.column_names}); a table input needs a 'uri' column "
            f"and may have {list(schema.OPTIONAL_MANIFEST_COLUMNS)}"
        )
    extra = sorted(set(table.column_names) - {"uri", *schema.OPTIONAL_MANIFEST_COLUMNS})
    if extra:
        log.info("%s: ignoring columns %s", src, extra)
    base = _dirname(src)
    out = {}
    for name in ("uri", *schema.OPTIONAL_MANIFEST_COLUMNS):
        field = schema.MANIFEST.field(name)
        if name in table.column_names:
            col = table.column(name)
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(
                    f"{src}: column {name!r} cannot be read as {field.type}: {exc}; fix the values or drop the column"
                ) from None
            if name in ("uri", "mask_uri"):
                given = [None if u is None or not u.strip() else u for u in col.to_pylist()]  # "" is empty
                col = pa.array([None if u is None else _resolve(u, base) for u in given], pa.string())
                relative = [u is not None and "://" not in u and not u.startswith("/") for u in given]
                # a relative path must stay under the table's folder ('..' and symlinks resolved)
                confine(col.filter(pa.array(relative, pa.bool_())), src, base, links=True)
            out[name] = col
        else:
            out[name] = pa.nulls(table.num_rows, field.type)
    if table.num_rows and out["uri"].null_count:
        raise ValueError(f"{src}: {out['uri'].null_count} rows have an empty 'uri'; fill or drop them")
    return pa.table(out)


def scan_folder(src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> tuple[pa.Table, list[str]]:
    """Candidate image files under a folder/prefix as a table, plus the files skipped by extension.

    With ``cfg.sniff_dicom`` files of other extensions stay candidates: the probe keeps those that
    carry the DICOM marker (``IM0001``, UID-named files) and skips the rest.
    """
    files = walk_files(src, storage_options)
    exts = tuple(e.lower() for e in cfg.extensions)
    keep = [f.uri for f in files if cfg.sniff_dicom or f.uri.lower().endswith(exts)]
    skipped = [f.uri for f in files if not cfg.sniff_dicom and not f.uri.lower().endswith(exts)]
    cols = {"uri": pa.array(keep, pa.string())}
    for name in schema.OPTIONAL_MANIFEST_COLUMNS:
        cols[name] = pa.nulls(len(keep), schema.MANIFEST.field(name).type)
    return pa.table(cols), skipped


@dataclass(frozen=True)
class FileProbe:
    """What checking one file found: an error, a reason to skip it, or its frames and raw identifiers."""

    error: str | None = None
    skipped: str | None = None
    frames: int | None = None  # frames (slices) of a DICOM or NIfTI file; None for raster images
    multi: bool = False  # frames are addressed by index (a cine or a volume)
    patient_id: str | None = None
    clip_uid: str | None = None
    dicom: bool = False


def _probe_header(uri: str, storage_options: dict | None, nifti_axis: int, sniff_only: bool) -> FileProbe:
    fs, path = filesystem(uri, storage_options)
    size = int(fs.size(path))
    if size == 0:
        return FileProbe(error="empty file (0 bytes)")
    with fs.open(path, "rb", block_size=HEADER_BLOCK) as fh:
        if formats.is_nifti(uri):
            from .imaging.formats import nifti

            return FileProbe(frames=nifti.read_header(fh, uri, nifti_axis), multi=True)
        head = fh.read(formats.SNIFF_BYTES)
        fh.seek(0)
        if not formats.is_dicom(uri, head):
            if sniff_only:
                return FileProbe(skipped="not an image (no known extension, no DICOM marker)")
            return FileProbe(error=imaging.probe(head + fh.read(), uri))
        from .imaging.formats import dicom

        try:
            header = dicom.read_header(fh, size)
        except formats.NotAnImage as exc:
            return FileProbe(skipped=str(exc), dicom=True)
        except imaging.ImageError as exc:
            return FileProbe(error=str(exc), dicom=True)
    return FileProbe(
        frames=header.frames, multi=header.frames > 1, patient_id=header.patient_id, clip_uid=header.clip_uid, dicom=True
    )


def probe_file(uri: str, storage_options: dict | None, nifti_axis: int, sniff_only: bool = False) -> FileProbe:
    """Check one file: raster images are verified whole, DICOM and NIfTI read up to their pixel data."""
    try:
        if formats.extension(uri) in RASTER_EXTENSIONS:
            return FileProbe(error=imaging.probe(read_uri(uri, storage_options), uri))
        return _probe_header(uri, storage_options, nifti_axis, sniff_only)
    except imaging.ImageError as exc:
        return FileProbe(error=str(exc))
    except FileNotFoundError:
        return FileProbe(error="file not found")
    except OSError as exc:
        return FileProbe(error=f"cannot read file: {exc}")


@ray.remote(num_cpus=1)
def _probe_chunk(
    uris: list[str], sniff: list[bool], storage_options: dict | None, nifti_axis: int
) -> list[FileProbe]:
    return [probe_file(u, storage_options, nifti_axis, s) for u, s in zip(uris, sniff, strict=True)]


def probe_all(
    uris: list[str], storage_options: dict | None = None, nifti_axis: int = 2, sniff_only: list[bool] | None = None
) -> list[FileProbe]:
    """Check every file in parallel Ray tasks; ``sniff_only`` marks files kept only if they are DICOM."""
    sniff = sniff_only or [False] * len(uris)
    starts = range(0, len(uris), PROBE_CHUNK)
    refs = [
        _probe_chunk.remote(uris[i : i + PROBE_CHUNK], sniff[i : i + PROBE_CHUNK], storage_options, nifti_axis)
        for i in starts
    ]
    results: list[list[FileProbe]] = [[] for _ in refs]
    for i, res in as_completed(refs, "manifest: checking files", log):
        results[i] = res
    return [p for chunk in results for p in chunk]


def _no_images(src: str, cfg: ManifestConfig, skipped: list[str]) -> ValueError:
    return ValueError(
        f"no images found in {src!r} (looked for {', '.join(cfg.extensions)}"
        f"{' and DICOM files by content' if cfg.sniff_dicom else ''}"
        f"{'; skipped ' + str(len(skipped)) + ' other files' if skipped else ''}): point --input at a folder "
        "of images or a table with a 'uri' column"
    )


def _rows_of(probe: FileProbe, frame: int | None) -> int:
    """Manifest rows of one input row: every frame of a readable multi-frame file when no frame is named."""
    return probe.frames if probe.multi and probe.error is None and frame is None else 1


def _expand(table: pa.Table, probes: list[FileProbe], cfg: ManifestConfig) -> tuple[pa.Table, list[str | None]]:
    """One row per frame of each multi-frame file whose row names no frame; header ids filled in; per-row errors."""
    mapped = identifier_mapper(cfg.pseudonymise)
    uris = table.column("uri").to_pylist()
    given = table.column("frame").to_pylist()
    patients, clips = table.column("patient_id").to_pylist(), table.column("clip_id").to_pylist()
    counts = np.array([_rows_of(p, f) for p, f in zip(probes, given, strict=True)], dtype=np.int64)
    expand = np.array([p.multi and p.error is None and f is None for p, f in zip(probes, given, strict=True)], bool)
    errors: list[str | None] = []
    for i, p in enumerate(probes):
        error = p.error
        if error is None and p.multi and given[i] is not None and not 0 <= given[i] < p.frames:
            error = f"frame {given[i]} out of range: the file has {p.frames} frames"
        if error is None and p.dicom:
            patients[i] = patients[i] if patients[i] is not None else mapped(p.patient_id)
            clips[i] = clips[i] if clips[i] is not None else mapped(p.clip_uid)
        elif error is None and p.multi and clips[i] is None:
            clips[i] = uris[i]  # a NIfTI volume is its own clip; its uri is in the outputs already
        errors.append(error)
    take = np.repeat(np.arange(len(probes)), counts)
    position = np.arange(len(take)) - np.repeat(np.cumsum(counts) - counts, counts)
    given_values = np.array([-1 if g is None else g for g in given], dtype=np.int64)
    frame_values = np.where(expand[take], position, given_values[take])
    out = table.set_column(table.schema.get_field_index("patient_id"), "patient_id", pa.array(patients, pa.string()))
    out = out.set_column(out.schema.get_field_index("clip_id"), "clip_id", pa.array(clips, pa.string()))
    out = out.take(pa.array(take))
    frames = pa.array(frame_values, pa.int32(), mask=frame_values < 0)
    out = out.set_column(out.schema.get_field_index("frame"), "frame", frames)
    return out, [errors[i] for i in take]


def build_manifest(src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    """The manifest table (schema.MANIFEST) for a folder, prefix or table of URIs, and scan stats."""
    formats.check_axis(cfg.nifti_axis)
    if is_table(src):
        table, skipped = read_source_table(src, storage_options), []
        sniff = [False] * table.num_rows
    else:
        table, skipped = scan_folder(src, cfg, storage_options)
        exts = tuple(e.lower() for e in cfg.extensions)
        sniff = [not u.lower().endswith(exts) for u in table.column("uri").to_pylist()]
        if cfg.pseudonymise and any(formats.is_dicom(u) for u in table.column("uri").to_pylist()):
            key_from_env()  # fail before reading a large tree, not after
    if table.num_rows == 0:
        raise _no_images(src, cfg, skipped)
    if cfg.root or not is_table(src):  # a table's absolute uris are confined when a root is declared
        for column in ("uri", "mask_uri"):
            confine(table.column(column), src, cfg.root or src, links=is_table(src) or bool(cfg.root))
    probes = probe_all(table.column("uri").to_pylist(), storage_options, cfg.nifti_axis, sniff)
    keep = [p.skipped is None or is_table(src) for p in probes]
    skipped += [u for u, k in zip(table.column("uri").to_pylist(), keep, strict=True) if not k]
    probes = [
        p if p.skipped is None else FileProbe(error=f"not an image: {p.skipped}")
        for p, k in zip(probes, keep, strict=True)
        if k
    ]
    table = table.filter(pa.array(keep, pa.bool_()))
    if table.num_rows == 0:
        raise _no_images(src, cfg, skipped)
    keys = list(zip(table.column("uri").to_pylist(), table.column("frame").to_pylist(), strict=True))
    first_row = np.cumsum([0] + [_rows_of(p, frame) for p, (_, frame) in zip(probes, keys, strict=True)])
    first_seen: dict[tuple[str, int | None], int] = {}
    for i, key in enumerate(keys):
        if key in first_seen:
            probes[i] = FileProbe(error=f"duplicate uri (same file as image_id {first_row[first_seen[key]]})")
        else:
            first_seen[key] = i
    expanded, errors = _expand(table, probes, cfg)
    status = pa.array(["ok" if e is None else "error" for e in errors], pa.string())
    cols = {"image_id": pa.array(range(expanded.num_rows), pa.int64())}
    cols.update({name: expanded.column(name) for name in expanded.column_names})
    cols["status"] = status
    cols["error"] = pa.array(errors, pa.string())
    manifest = pa.table(cols).select(schema.MANIFEST.names).cast(schema.MANIFEST)
    n_err = int(pc.sum(pc.equal(status, "error")).as_py() or 0)
    stats = {
        "input": src,
        "n_images": manifest.num_rows,
        "n_ok": manifest.num_rows - n_err,
        "n_error": n_err,
        "n_files": table.num_rows,
        "n_dicom_files": sum(p.dicom for p in probes),
        "n_multiframe_files": sum(p.multi and p.error is None for p in probes),
        "n_skipped_files": len(skipped),
        "skipped_examples": skipped[:5],
        "nifti_axis": cfg.nifti_axis,
        "pseudonymised": cfg.pseudonymise,
    }
    return manifest, stats


def run_manifest(run: RunDir, src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> dict:
    """Write ``manifest/part-NNNNN.parquet`` for the archive ``src``; skips when already done."""
    ctx = Context(RunConfig(input=src, manifest=cfg), storage_options)
    return execute(stages.MANIFEST, run, ctx).stats


def manifest_matches(run: RunDir, ctx: Context, stats: dict) -> None:
    """A completed manifest is of this run's archive, or the run is refused."""
    if stats.get("input") != ctx.config.input:
        raise ConfigError(
            f"{run.uri} already holds a manifest of {stats.get('input')!r}, not {ctx.config.input!r}: "
            "use a new --output folder for a different archive"
        )


def compute_manifest(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): shards and file identities of the archive."""
    src, cfg, storage_options = ctx.config.input, ctx.config.manifest, ctx.storage_options
    if not src:
        raise ConfigError("the manifest stage needs --input (a folder, URI prefix or table of URIs)")
    start = time.monotonic()
    manifest, stats = build_manifest(src, cfg, storage_options)
    run.remove(schema.MANIFEST_DIR)
    for i, off in enumerate(range(0, manifest.num_rows, cfg.shard_size)):
        run.write_table(f"{schema.MANIFEST_DIR}/{shard_name(i)}", manifest.slice(off, cfg.shard_size))
    # file identities (path under the archive root, size, sampled digest or ETag) that a later incremental
    # run compares (fingerprints.py)
    root = cfg.root or (_dirname(src) if is_table(src) else src)
    run.write_table(
        schema.MANIFEST_FILES, fingerprint_files(manifest.column("uri").to_pylist(), storage_options, root=root)
    )
    stats["n_shards"] = -(-manifest.num_rows // cfg.shard_size)
    stats["seconds"] = round(time.monotonic() - start, 3)
    if stats["n_error"]:
        bad = manifest.filter(pc.equal(manifest.column("status"), "error")).slice(0, 3).to_pylist()
        log.warning(
            "manifest: %d images cannot be used and are left out, e.g. %s; each has status 'error' and the reason "
            "in %s: replace or remove those files and run again with a new --output to include them",
            stats["n_error"], "; ".join(f"{redact_uri(r['uri'])}: {r['error']}" for r in bad), run.uri_of(schema.MANIFEST_DIR),
        )
    log.info(
        "manifest: %d images (%d ok, %d errors, %d non-image files skipped) in %.1fs",
        stats["n_images"], stats["n_ok"], stats["n_error"], stats["n_skipped_files"], stats["seconds"],
    )
    return stats


def check_manifest(run: RunDir) -> tuple[dict, list[str]]:
    """Dense ids 0..N-1 in shard order, statuses ok/error with a reason for every error, counts as recorded."""
    rows = dup = bad_status = missing_reason = n_ok = 0
    problems: list[str] = []
    out_of_order = 0
    for path in run.shards(schema.MANIFEST_DIR).values():
        table = run.read_table(path, columns=["image_id", "status", "error"])
        ids = table["image_id"].to_numpy()
        out_of_order += int(np.count_nonzero(ids != np.arange(rows, rows + len(ids))))
        rows += len(ids)
        status = table["status"]
        is_ok, is_error = pc.equal(status, "ok").fill_null(False), pc.equal(status, "error").fill_null(False)
        n_ok += int(pc.sum(is_ok).as_py() or 0)
        bad_status += int(pc.sum(pc.invert(pc.or_(is_ok, is_error))).as_py() or 0)
        missing_reason += int(pc.sum(pc.and_(is_error, pc.is_null(table["error"]))).as_py() or 0)
    all_ids = np.sort(ids_of(run, schema.MANIFEST_DIR))
    dup = count_duplicates(all_ids)
    if rows == 0:
        problems.append("no rows")
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if out_of_order and not dup:
        problems.append(f"{out_of_order} image_ids are not the dense sequence 0..{rows - 1} in shard order")
    if bad_status:
        problems.append(f"{bad_status} rows with a status other than 'ok' or 'error'")
    if missing_reason:
        problems.append(f"{missing_reason} error rows without an error message")
    done = done_record(run, schema.MANIFEST_DIR)
    if done and (done.get("n_images"), done.get("n_ok")) != (rows, n_ok):
        problems.append(
            f"{rows} rows ({n_ok} ok) but its done marker records {done.get('n_images')} ({done.get('n_ok')} ok)"
        )
    return {"rows": rows, "ok_rows": n_ok, "duplicate_ids": dup, "nan": 0}, problems
