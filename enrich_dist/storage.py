"""One run-directory abstraction over fsspec: every stage reads and writes through it."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
T = TypeVar("T")

# The S3 client libraries log request URLs and signed headers at DEBUG (the endpoint, the access key id):
# they stay at WARNING even when the package logs at DEBUG, so credentials and endpoints never reach a log.
for _client_logger in ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "aiohttp"):
    logging.getLogger(_client_logger).setLevel(logging.WARNING)

TMP_PREFIX = ".tmp-"
DONE_NAME = "_SUCCESS"
READ_THREADS = 8  # shards of one folder read at once

# Transient object-store errors are retried: at most RETRY_ATTEMPTS calls, exponential backoff with jitter.
RETRY_ATTEMPTS = 5
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# S3 error codes (and HTTP statuses as codes) that mean "try again later"
_TRANSIENT_CODES = frozenset({
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "TooManyRequests", "500", "502", "503", "504",
})
# errnos s3fs maps throttling and server errors to (503 -> EBUSY, InternalError -> EREMOTEIO), and network errnos
_TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
    getattr(errno, "EREMOTEIO", errno.EIO),
})
# transport errors of botocore, aiohttp and fsspec, matched by class name so this module imports none of them
_TRANSIENT_TYPES = frozenset({
    "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "IncompleteRead", "ClientPayloadError", "ClientConnectionError", "ServerDisconnectedError", "FSTimeoutError",
    "ResponseParserError",
})
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# write errors that need the user, with what to do about them (the message names the file)
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space on it, or give another --output",
    errno.EDQUOT: "the disk quota is used up: free space or raise the quota, or give another --output",
    errno.EFBIG: "the file is over this process's file-size limit (ulimit -f) or the filesystem's largest file: "
    "raise the limit, or give another --output",
    errno.EROFS: "the filesystem is read-only: give a writable --output",
    errno.EACCES: "permission denied: give this user (or these credentials) write access, or give another --output",
    errno.EPERM: "not permitted: give this user (or these credentials) write access, or give another --output",
}


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: network trouble, throttling or a server-side (5xx) error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(current).__mro__):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status >= 500 or status == 429 or str(response.get("Error", {}).get("Code")) in _TRANSIENT_CODES:
                return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__
    return False


def redact_uri(uri: str) -> str:
    """A URI fit for logs: any ``user:password@`` part removed."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


def with_retries(call: Callable[[], T], what: str, attempts: int | None = None) -> T:
    """``call()``, retried on transient errors with exponential backoff and jitter; other errors pass at once.

    Each retry is logged at WARNING with ``what`` (a URI, redacted) and the error's type and code only: error
    messages can carry endpoints, so they are left to the exception that is finally raised.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            ceiling = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1))
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            log.warning(
                "%s: transient storage error %s (attempt %d of %d); retrying in %.1fs",
                redact_uri(what), _error_kind(exc), attempt, attempts, delay,
            )
            time.sleep(delay)
            attempt += 1


def _error_kind(exc: BaseException) -> str:
    """Type name plus S3 error code or errno name, never the message."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    response = getattr(cause, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code"):
        return f"{type(exc).__name__} ({response['Error']['Code']})"
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return f"{type(exc).__name__} ({errno.errorcode[exc.errno]})"
    return type(exc).__name__


def shard_name(index: int, ext: str = "parquet") -> str:
    """Fixed, zero-padded shard file name (``part-00007.parquet``)."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"part-{index:05d}.{ext}"


def shard_index(name: str) -> int:
    """Inverse of :func:`shard_name` for a base name like ``part-00007.parquet``."""
    base = posixpath.basename(name)
    if not base.startswith("part-"):
        raise ValueError(f"not a shard file name: {name!r}")
    return int(base[len("part-") :].split(".", 1)[0])


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (protocol, path); plain paths are ``file``."""
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return protocol, path
    return "file", os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a path or URI.

    Remote filesystems get no listings cache unless ``storage_options`` asks for one: Ray workers in other
    processes write shards that a cached listing in this process would never show.
    """
    protocol, path = split_uri(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), path
    fs = fsspec.filesystem(protocol, **{"use_listings_cache": False, **(storage_options or {})})
    return fs, path.rstrip("/")


def join_uri(base: str, rel: str) -> str:
    """Join a relative path onto a path or URI."""
    if "://" in base:
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(base, rel)


def read_uri(uri: str, storage_options: dict | None = None) -> bytes:
    """Read one whole file given by path or URI (transient errors retried)."""
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.cat_file(path), uri)


@dataclass(frozen=True)
class FileInfo:
    """A file found under an input prefix."""

    uri: str
    size: int


def walk_files(uri: str, storage_options: dict | None = None) -> list[FileInfo]:
    """All files below a folder or URI prefix, recursively, sorted by URI (hidden files skipped)."""
    fs, root = filesystem(uri, storage_options)
    protocol, _ = split_uri(uri)
    if not with_retries(lambda: fs.exists(root), uri):
        raise FileNotFoundError(f"input {uri!r} does not exist: check the path or URI")
    if not with_retries(lambda: fs.isdir(root), uri):
        return [FileInfo(uri, int(with_retries(lambda: fs.size(root), uri)))]
    found = with_retries(lambda: fs.find(root, detail=True, withdirs=False), uri)
    out = []
    for path, info in found.items():
        rel = posixpath.relpath(path, root) if protocol != "file" else os.path.relpath(path, root)
        if any(part.startswith(".") for part in rel.replace(os.sep, "/").split("/")):
            continue
        full = path if protocol == "file" else f"{protocol}://{path}"
        out.append(FileInfo(full, int(info.get("size") or 0)))
    out.sort(key=lambda f: f.uri)
    return out


class RunDir:
    """A run directory (local folder or object-store prefix) with atomic, resumable writes.

    Files are written whole to a temporary name and committed by rename on local disks; on object
    stores a single PUT is already atomic, so the object appears only when complete. A stage marks
    itself complete with a ``_SUCCESS`` file written last.
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.storage_options = dict(storage_options or {})
        self.protocol, _ = split_uri(self.uri)
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["storage_options"])

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._root = filesystem(self.uri, self.storage_options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves root
        assert self._root is not None
        return self._root

    def path(self, rel: str) -> str:
        """Path inside the filesystem for a path relative to the run dir."""
        if rel in ("", "."):
            return self.root
        return posixpath.join(self.root, rel) if not self.is_local else os.path.join(self.root, rel)

    def uri_of(self, rel: str) -> str:
        """Full URI (or local path) of a file in the run dir."""
        return join_uri(self.uri, rel)

    def exists(self, rel: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(rel)), self.uri_of(rel))

    def listdir(self, rel: str, suffix: str = "") -> list[str]:
        """Committed file names (relative to the run dir) directly under ``rel``, sorted."""
        base = self.path(rel)
        if not self.exists(rel):
            return []
        names = []
        for entry in with_retries(lambda: self.fs.ls(base, detail=True), self.uri_of(rel)):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if name.startswith(TMP_PREFIX) or not name.endswith(suffix) or entry.get("type") == "directory":
                continue
            names.append(posixpath.join(rel, name))
        return sorted(names)

    def shards(self, rel: str, ext: str = "parquet") -> dict[int, str]:
        """Committed ``part-NNNNN`` shards under ``rel`` by index."""
        out = {}
        for name in self.listdir(rel, suffix="." + ext):
            base = posixpath.basename(name)
            if base.startswith("part-"):
                out[shard_index(base)] = name
        return dict(sorted(out.items()))

    def read_bytes(self, rel: str) -> bytes:
        """One whole file of the run dir (transient errors retried)."""
        try:
            return with_retries(lambda: self.fs.cat_file(self.path(rel)), self.uri_of(rel))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri_of(rel)} not found") from exc

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes ``start:stop`` of one file of the run dir (transient errors retried)."""
        try:
            return with_retries(lambda: self.fs.cat_file(self.path(rel), start=start, end=stop), self.uri_of(rel))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri_of(rel)} not found") from exc

    def write_bytes(self, rel: str, data: bytes, fsync: bool = True) -> None:
        """Write a whole file atomically: it is either absent or complete (transient errors retried).

        ``fsync=False`` skips flushing to disk before the rename (still atomic for a crashed process,
        not for a power cut); bulk writers of many small files use it.
        """
        try:
            with_retries(lambda: self._write_once(rel, data, fsync), self.uri_of(rel))
        except OSError as exc:
            fix = _WRITE_FIXES.get(exc.errno) if exc.errno is not None else None
            if fix is None:
                raise
            raise OSError(
                exc.errno,
                f"cannot write {redact_uri(self.uri_of(rel))}: {os.strerror(exc.errno)}; {fix}. Files already "
                "committed are kept and a rerun of the same command resumes from them",
            ) from exc

    def _write_once(self, rel: str, data: bytes, fsync: bool) -> None:
        path = self.path(rel)
        if self.is_local:
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    if fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel).decode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())

    def write_table(self, rel: str, table: pa.Table) -> None:
        """Write one Parquet file atomically."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file, or every committed shard of a folder concatenated in shard order."""
        if rel.endswith(".parquet"):
            return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)
        shards = self.shards(rel)
        if not shards:
            raise FileNotFoundError(f"no committed shards under {self.uri_of(rel)}")

        def read(path: str) -> pa.Table:
            return pq.read_table(pa.BufferReader(self.read_bytes(path)), columns=columns)

        if len(shards) == 1:
            return read(next(iter(shards.values())))
        # shards download and decode in parallel (both release the GIL); the order stays the shards'
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(shards))) as pool:
            return pa.concat_tables(list(pool.map(read, shards.values())))

    def remove(self, rel: str) -> None:
        """Delete a file or folder of the run dir if it exists."""
        path = self.path(rel)

        def remove_once() -> None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

        with_retries(remove_once, self.uri_of(rel))

    def is_done(self, stage: str) -> bool:
        return self.exists(posixpath.join(stage, DONE_NAME))

    def mark_done(self, stage: str, info: dict) -> None:
        """Write the stage's completion marker last."""
        self.write_json(posixpath.join(stage, DONE_NAME), info)

    def require(self, stage: str, command: str) -> None:
        """Raise a clear error naming ``command`` when ``stage`` has not completed in this run dir."""
        if not self.is_done(stage):
            raise FileNotFoundError(
                f"{self.uri} has no completed {stage!r} stage: run `enrich {command} --output {self.uri}` first"
            )

    def clear_done(self, stage: str) -> None:
        self.remove(posixpath.join(stage, DONE_NAME))

    def remove_stale_tmp(self, rel: str) -> int:
        """Delete temporary files a crashed writer left under ``rel``; returns how many."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return 0
        stale = [e for e in self.fs.find(base) if posixpath.basename(e).startswith(TMP_PREFIX)]
        for entry in stale:
            self.fs.rm(entry)
        return len(stale)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def uris_exist(uris: Iterable[str], storage_options: dict | None = None) -> list[bool]:
    """Whether each URI exists (one filesystem per protocol)."""
    out = []
    cache: dict[str, fsspec.AbstractFileSystem] = {}
    for uri in uris:
        protocol, path = split_uri(uri)
        if protocol not in cache:
            cache[protocol] = filesystem(uri, storage_options)[0]
        fs = cache[protocol]
        out.append(with_retries(lambda: fs.exists(path), uri))  # noqa: B023 - called at once
    return out
