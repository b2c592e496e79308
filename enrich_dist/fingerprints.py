"""File identity across runs: what a later incremental run compares to tell unchanged files from changed ones.

Every manifest stage writes ``manifest_files/files.parquet`` (:data:`FILES`), one row per distinct file:

- ``rel``: the file's path relative to the archive root (the input folder or prefix, the ``--archive-root``
  when declared, else a table's folder); null for a file outside that root. Two runs match files by
  ``rel``, so a copied or re-mounted archive (``/data/echo`` -> ``/mnt/echo``) is the same archive;
  files of runs without ``rel`` are matched by ``uri``.
- ``size``; ``etag`` (object stores: the ETag or version tag the store lists); ``digest`` (local files:
  BLAKE2b of the size, the first and the last 64 KiB, read once at manifest time); ``mtime_ns`` (local).

A file is unchanged when the size matches and the strongest identity both runs hold matches: the digest,
else the ETag, else the mtime. The digest samples the file instead of hashing it whole (a full hash would
read the whole archive every night): an edit that keeps the size and leaves the first and last 64 KiB
alone goes unnoticed, which a DICOM or NIfTI edit does not do (their headers sit at the start), and a
plain copy (new mtime, same bytes) is recognised as unchanged.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from .storage import filesystem, split_uri, with_retries

FILES = pa.schema(
    [
        ("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("etag", pa.string()),
        ("rel", pa.string()), ("digest", pa.string()),
    ]
)
SAMPLE_BYTES = 64 << 10
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "updated", "mtime")
_THREADS = 8


def _remote_version(info: dict) -> str | None:
    for key in _VERSION_KEYS:
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def sampled_digest(path: str, size: int) -> str:
    """BLAKE2b-128 of the size, the first and the last :data:`SAMPLE_BYTES` of a local file."""
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def relative_to(uri: str, root: str | None) -> str | None:
    """``uri``'s path under ``root`` (both normalised), or None when it lies elsewhere or there is no root."""
    if not root:
        return None
    (p_uri, path), (p_root, base) = split_uri(uri), split_uri(root)
    if p_uri != p_root:
        return None
    path, base = posixpath.normpath(path), posixpath.normpath(base).rstrip("/")
    return path[len(base) + 1:] if path.startswith(base + "/") else None


def _local(uri: str) -> tuple[int | None, int | None, str | None, str | None]:
    path = split_uri(uri)[1]
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns), None, sampled_digest(path, int(st.st_size))
    except OSError:
        return None, None, None, None


def fingerprint_files(uris: list[str], storage_options: dict | None = None, root: str | None = None) -> pa.Table:
    """One :data:`FILES` row per distinct file of ``uris``, ``rel`` taken against the archive ``root``.

    Local files are stat'ed and sampled in a few threads; on object stores each parent prefix is listed
    once (one request per folder, not per file). A file that vanished gets nulls, which never match.
    """
    unique = sorted(set(uris))
    found: dict[str, tuple] = {}
    local = [u for u in unique if split_uri(u)[0] == "file"]
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for uri in unique:
        protocol, path = split_uri(uri)
        if protocol != "file":
            groups[(protocol, posixpath.dirname(path))].append(uri)

    def list_group(key: tuple[str, str]) -> dict[str, tuple]:
        protocol, parent = key
        fs, _ = filesystem(f"{protocol}://{parent}", storage_options)
        try:
            entries = with_retries(lambda: fs.ls(parent, detail=True), f"{protocol}://{parent}")
        except FileNotFoundError:
            entries = []
        by_name = {e["name"].rstrip("/"): e for e in entries}
        out = {}
        for uri in groups[key]:
            path = split_uri(uri)[1].rstrip("/")
            info = by_name.get(path)
            if info is None:
                try:
                    info = with_retries(lambda: fs.info(path), uri)  # noqa: B023 - called at once
                except FileNotFoundError:
                    out[uri] = (None, None, None, None)
                    continue
            out[uri] = (int(info.get("size") or 0), None, _remote_version(info), None)
        return out

    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        found.update(zip(local, pool.map(_local, local), strict=True))
        for part in pool.map(list_group, list(groups)):
            found.update(part)
    rows = [found[u] for u in unique]
    return pa.table(
        {
            "uri": pa.array(unique, pa.string()),
            "size": pa.array([r[0] for r in rows], pa.int64()),
            "mtime_ns": pa.array([r[1] for r in rows], pa.int64()),
            "etag": pa.array([r[2] for r in rows], pa.string()),
            "rel": pa.array([relative_to(u, root) for u in unique], pa.string()),
            "digest": pa.array([r[3] for r in rows], pa.string()),
        },
        schema=FILES,
    )


class Fingerprint:
    """One file's recorded identity (a row of :data:`FILES`; columns older runs lack read as null)."""

    __slots__ = ("uri", "size", "mtime_ns", "etag", "rel", "digest")

    def __init__(self, row: dict):
        for name in self.__slots__:
            setattr(self, name, row.get(name))

    @property
    def key(self) -> str:
        """What matches files across runs: the path under the archive root, else the uri."""
        return f"rel:{self.rel}" if self.rel is not None else f"uri:{self.uri}"

    def same_content(self, other: Fingerprint) -> bool:
        """Same size, and the strongest identity both hold is equal (digest, else ETag, else mtime)."""
        if self.size is None or self.size != other.size:
            return False
        for attr in ("digest", "etag", "mtime_ns"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine is not None and theirs is not None:
                return mine == theirs
        return False


def read_fingerprints(table: pa.Table) -> list[Fingerprint]:
    """The recorded files of a run (``manifest_files/files.parquet``), vanished ones left out."""
    rows = table.to_pylist()
    return [Fingerprint(r) for r in rows if r.get("size") is not None]
