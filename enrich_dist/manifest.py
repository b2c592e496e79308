"""Manifest stage: one row per image of the archive, with dense ids and a decode check."""

from __future__ import annotations

import io
import logging
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from . import imaging, schema
from .config import ManifestConfig
from .runtime import as_completed
from .storage import RunDir, join_uri, read_uri, shard_name, split_uri, walk_files

log = logging.getLogger(__name__)
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
    if "://" in uri or uri.startswith("/"):
        return uri
    return join_uri(base, uri)


def read_source_table(src: str, storage_options: dict | None = None) -> pa.Table:
    """Read a CSV/Parquet table of URIs; relative URIs resolve against the table's folder."""
    data = read_uri(src, storage_options)
    try:
        if src.lower().endswith(".csv"):
            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in ("uri", "patient_id", "clip_id", "label", "split", "mask_uri")}
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
                raise ValueError(f"{src}: column {name!r} cannot be read as {field.type}: {exc}") from None
            if name in ("uri", "mask_uri"):
                col = pa.array([None if u is None else _resolve(u, base) for u in col.to_pylist()], pa.string())
            out[name] = col
        else:
            out[name] = pa.nulls(table.num_rows, field.type)
    if table.num_rows and out["uri"].null_count:
        raise ValueError(f"{src}: {out['uri'].null_count} rows have an empty 'uri'; fill or drop them")
    return pa.table(out)


def scan_folder(src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> tuple[pa.Table, list[str]]:
    """Image files under a folder/prefix (by extension) as a table, plus the skipped non-image files."""
    files = walk_files(src, storage_options)
    exts = tuple(e.lower() for e in cfg.extensions)
    keep = [f.uri for f in files if f.uri.lower().endswith(exts)]
    skipped = [f.uri for f in files if not f.uri.lower().endswith(exts)]
    cols = {"uri": pa.array(keep, pa.string())}
    for name in schema.OPTIONAL_MANIFEST_COLUMNS:
        cols[name] = pa.nulls(len(keep), schema.MANIFEST.field(name).type)
    return pa.table(cols), skipped


@ray.remote(num_cpus=1)
def _probe_chunk(uris: list[str], storage_options: dict | None) -> list[str | None]:
    out: list[str | None] = []
    for uri in uris:
        try:
            out.append(imaging.probe(read_uri(uri, storage_options), uri))
        except FileNotFoundError:
            out.append("file not found")
        except OSError as exc:
            out.append(f"cannot read file: {exc}")
    return out


def probe_all(uris: list[str], storage_options: dict | None = None) -> list[str | None]:
    """Check every file in parallel Ray tasks; the error message per file, None when readable."""
    chunks = [uris[i : i + PROBE_CHUNK] for i in range(0, len(uris), PROBE_CHUNK)]
    refs = [_probe_chunk.remote(chunk, storage_options) for chunk in chunks]
    results: list[list[str | None]] = [[] for _ in chunks]
    for i, res in as_completed(refs, "manifest: checking files", log):
        results[i] = res
    return [e for chunk in results for e in chunk]


def build_manifest(src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> tuple[pa.Table, dict]:
    """The manifest table (schema.MANIFEST) for a folder, prefix or table of URIs, and scan stats."""
    if is_table(src):
        table, skipped = read_source_table(src, storage_options), []
    else:
        table, skipped = scan_folder(src, cfg, storage_options)
    if table.num_rows == 0:
        raise ValueError(
            f"no images found in {src!r} (looked for {', '.join(cfg.extensions)}"
            f"{'; skipped ' + str(len(skipped)) + ' other files' if skipped else ''}): point --input at a folder "
            "of images or a table with a 'uri' column"
        )
    uris = table.column("uri").to_pylist()
    errors = probe_all(uris, storage_options)
    first_seen: dict[str, int] = {}
    for i, uri in enumerate(uris):
        if uri in first_seen:
            errors[i] = f"duplicate uri (same file as image_id {first_seen[uri]})"
        else:
            first_seen[uri] = i
    status = pa.array(["ok" if e is None else "error" for e in errors], pa.string())
    cols = {"image_id": pa.array(range(table.num_rows), pa.int64())}
    cols.update({name: table.column(name) for name in table.column_names})
    cols["status"] = status
    cols["error"] = pa.array(errors, pa.string())
    manifest = pa.table(cols).select(schema.MANIFEST.names).cast(schema.MANIFEST)
    n_err = int(pc.sum(pc.equal(status, "error")).as_py() or 0)
    stats = {
        "input": src,
        "n_images": manifest.num_rows,
        "n_ok": manifest.num_rows - n_err,
        "n_error": n_err,
        "n_skipped_files": len(skipped),
        "skipped_examples": skipped[:5],
    }
    return manifest, stats


def run_manifest(run: RunDir, src: str, cfg: ManifestConfig, storage_options: dict | None = None) -> dict:
    """Write ``manifest/part-NNNNN.parquet`` for the archive ``src``; skips when already done."""
    if run.is_done(schema.MANIFEST_DIR):
        stats = run.read_json(f"{schema.MANIFEST_DIR}/_SUCCESS")
        if stats.get("input") != src:
            raise ValueError(
                f"{run.uri} already holds a manifest of {stats.get('input')!r}, not {src!r}: "
                "use a new --output folder for a different archive"
            )
        log.info("manifest: already complete (%d images), skipping", stats["n_images"])
        return stats
    start = time.monotonic()
    manifest, stats = build_manifest(src, cfg, storage_options)
    run.remove(schema.MANIFEST_DIR)
    for i, off in enumerate(range(0, manifest.num_rows, cfg.shard_size)):
        run.write_table(f"{schema.MANIFEST_DIR}/{shard_name(i)}", manifest.slice(off, cfg.shard_size))
    stats["n_shards"] = -(-manifest.num_rows // cfg.shard_size)
    stats["seconds"] = round(time.monotonic() - start, 3)
    run.mark_done(schema.MANIFEST_DIR, stats)
    log.info(
        "manifest: %d images (%d ok, %d errors, %d non-image files skipped) in %.1fs",
        stats["n_images"], stats["n_ok"], stats["n_error"], stats["n_skipped_files"], stats["seconds"],
    )
    return stats

