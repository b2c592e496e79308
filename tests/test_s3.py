"""Object storage: the whole pipeline s3 -> s3 on a real S3 API (moto's server on 127.0.0.1), retries, secrets."""

from __future__ import annotations

import errno
import json
import logging
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from s3env import ACCESS_KEY, SECRET_KEY, use_loopback_s3_env

from enrich_dist import storage
from enrich_dist.storage import RunDir, is_transient, read_uri, redact_uri, with_retries

# Set while pytest collects, before any test starts a Ray: Ray workers inherit the environment of the process
# that started Ray (credentials are never forwarded through a runtime_env).
use_loopback_s3_env()



@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto, server mode) on a free loopback port, for Ray workers too."""
    from moto.server import ThreadedMotoServer

    for name in ("werkzeug", "moto"):  # the test server's own request logs are not the package's
        logging.getLogger(name).setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A boto3 client on the test server."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def _bucket(s3, prefix: str, versioned: bool = False) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _versions(s3, bucket: str) -> dict[str, list[str]]:
    """Every key of a versioned bucket with all its version ids (a rewrite adds one)."""
    out: dict[str, list[str]] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            out.setdefault(v["Key"], []).append(v["VersionId"])
    return {k: sorted(v) for k, v in out.items()}


def _etags(s3, bucket: str) -> dict[str, tuple[str, str]]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"].isoformat())
    return out


@pytest.mark.slow
def test_run_s3_to_s3_then_resume_rewrites_nothing(ray_local, s3, s3_endpoint, caplog):
    from enrich_dist import schema
    from enrich_dist.cli import main
    from enrich_dist.datasets import make_echo_archive
    from enrich_dist.pipeline import STAGE_DIRS

    caplog.set_level(logging.DEBUG)  # even at DEBUG, no credential and no endpoint in the logs
    options = {"endpoint_url": s3_endpoint}
    archive_bucket, runs_bucket = _bucket(s3, "archive"), _bucket(s3, "runs", versioned=True)
    # 120 images: two patients, so the evaluate stage can hold one out
    make_echo_archive(f"s3://{archive_bucket}/echo", 120, 0, storage_options=options, workers=1, progress=False)
    out = f"s3://{runs_bucket}/nightly"
    args = ["run", "--input", f"s3://{archive_bucket}/echo/manifest.csv", "--output", out,
            "--storage-options", json.dumps(options), "--epochs", "1", "--sample", "40", "--replicates", "2",
            "--block-size", "32", "--budgets", "0.5,1.0", "--model", "linear", "--log-level", "DEBUG"]
    assert main(args) == 0

    run = RunDir(out, options)
    for folder in STAGE_DIRS.values():
        assert run.is_done(folder), folder
    manifest = run.read_table(schema.MANIFEST_DIR)
    assert manifest.num_rows == 120 and set(manifest["status"].to_pylist()) == {"ok"}
    assert all(u.startswith(f"s3://{archive_bucket}/echo/") for u in manifest["uri"].to_pylist())
    assert run.read_table(schema.EMBEDDINGS_DIR).num_rows == 120
    assert run.read_json("similarity/summary.json")["n_pairs"] == 120 * 119 // 2
    assert run.read_table("selection/ranking.parquet").num_rows == 2 * 120
    assert run.exists("report/index.html")

    # nothing secret in what the run wrote, nor in its logs: not the credentials, not the endpoint
    endpoint_hostport = s3_endpoint.split("://", 1)[1]
    for key in _etags(s3, runs_bucket):
        body = s3.get_object(Bucket=runs_bucket, Key=key)["Body"].read()
        for needle in (SECRET_KEY, ACCESS_KEY, endpoint_hostport):
            assert needle.encode() not in body, (needle, key)
    state = run.read_json("run.json")
    assert "storage_options" not in json.dumps(state)
    for needle in (SECRET_KEY, ACCESS_KEY, endpoint_hostport):
        assert needle not in caplog.text

    # a resumed rerun writes no new version of any committed artifact (only the report and run.json)
    archive_before, versions_before = _etags(s3, archive_bucket), _versions(s3, runs_bucket)
    assert all(len(v) == 1 for k, v in versions_before.items() if k.split("/")[1] in STAGE_DIRS.values())
    assert main(args) == 0
    versions_after = _versions(s3, runs_bucket)
    changed = {k for k in versions_after if versions_after[k] != versions_before.get(k)}
    assert changed and all(k.startswith("nightly/report/") or k == "nightly/run.json" for k in changed), changed
    assert _etags(s3, archive_bucket) == archive_before
    rerun_state = run.read_json("run.json")
    for stage in STAGE_DIRS:
        assert rerun_state["stages"][stage] == state["stages"][stage]


def test_listing_sees_objects_written_by_other_processes(s3, s3_endpoint):
    """No stale listing cache: Ray workers write shards the driver must see on its next listing."""
    bucket = _bucket(s3, "listing")
    run = RunDir(f"s3://{bucket}/run", {"endpoint_url": s3_endpoint})
    s3.put_object(Bucket=bucket, Key="run/embeddings/part-00000.parquet", Body=b"a")
    assert list(run.shards("embeddings")) == [0]
    s3.put_object(Bucket=bucket, Key="run/embeddings/part-00001.parquet", Body=b"b")
    s3.put_object(Bucket=bucket, Key="run/embeddings/sub/part-00002.parquet", Body=b"c")
    assert list(run.shards("embeddings")) == [0, 1]
    assert run.read_bytes("embeddings/part-00001.parquet") == b"b"
    with pytest.raises(FileNotFoundError, match="part-00009.parquet not found"):
        run.read_bytes("embeddings/part-00009.parquet")


def test_s3_errors_are_classified(s3_endpoint):
    """Throttling and server errors, as s3fs raises them, are transient; missing keys and denials are not."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    def client_error(code: str, status: int) -> BaseException:
        response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return translate_boto_error(ClientError(response, "GetObject"))

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("SomethingNew", 502))
    assert is_transient(EndpointConnectionError(endpoint_url=s3_endpoint))
    assert is_transient(ConnectionResetError())
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    assert not is_transient(ValueError("bad parquet"))


class FlakyFS(MemoryFileSystem):
    """An in-memory filesystem whose whole-file calls fail as told first."""

    protocol = "flaky"
    failures: dict[str, list[BaseException]] = {}
    calls: dict[str, int] = {}

    def _maybe_fail(self, method: str) -> None:
        FlakyFS.calls[method] = FlakyFS.calls.get(method, 0) + 1
        pending = FlakyFS.failures.get(method)
        if pending:
            raise pending.pop(0)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail("cat_file")
        return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._maybe_fail("pipe_file")
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    """A ``flaky://`` run dir; sleeps are recorded instead of waited."""
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.failures, FlakyFS.calls = {}, {}
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    return RunDir(f"flaky://bucket-{uuid.uuid4().hex[:8]}/run"), sleeps


def test_transient_errors_are_retried_with_backoff(flaky, caplog):
    run, sleeps = flaky
    detail = "could not connect to http://10.9.8.7:9000/bucket?X-Amz-Credential=leaked"
    FlakyFS.failures = {
        "pipe_file": [OSError(errno.EBUSY, detail), ConnectionResetError(detail)],
        "cat_file": [TimeoutError(detail)],
    }
    with caplog.at_level(logging.WARNING, logger="enrich_dist.storage"):
        run.write_bytes("a/part-00000.parquet", b"payload")
        assert run.read_bytes("a/part-00000.parquet") == b"payload"
    assert FlakyFS.calls == {"pipe_file": 3, "cat_file": 2}
    assert len(sleeps) == 3
    # exponential ceilings with jitter: attempt k waits in [c/2, c], c = base * 2^(k-1)
    assert storage.RETRY_BASE_S / 2 <= sleeps[0] <= storage.RETRY_BASE_S
    assert storage.RETRY_BASE_S <= sleeps[1] <= 2 * storage.RETRY_BASE_S
    assert "transient storage error OSError (EBUSY) (attempt 1 of 5)" in caplog.text
    assert "part-00000.parquet" in caplog.text
    assert "10.9.8.7" not in caplog.text and "leaked" not in caplog.text


def test_permanent_errors_fail_at_once_and_retries_are_bounded(flaky):
    run, sleeps = flaky
    FlakyFS.failures = {"cat_file": [PermissionError(errno.EACCES, "AccessDenied")]}
    run.write_bytes("x", b"1")
    with pytest.raises(PermissionError):
        run.read_bytes("x")
    assert FlakyFS.calls["cat_file"] == 1 and sleeps == []

    FlakyFS.failures = {"cat_file": [OSError(errno.EBUSY, "SlowDown") for _ in range(10)]}
    with pytest.raises(OSError, match="SlowDown"):
        read_uri(run.uri_of("x"))
    assert FlakyFS.calls["cat_file"] == 1 + storage.RETRY_ATTEMPTS
    assert len(sleeps) == storage.RETRY_ATTEMPTS - 1
    assert max(sleeps) <= storage.RETRY_MAX_S


def test_with_retries_passes_results_and_redacts_uris():
    assert with_retries(lambda: 7, "s3://b/k") == 7
    assert redact_uri("s3://AKIA:secret@bucket/key") == "s3://bucket/key"
    assert redact_uri("s3://bucket/a@b") == "s3://bucket/a@b"
    assert redact_uri("/local/path@x") == "/local/path@x"


def test_approx_similarity_streams_through_s3_scratch_files(ray_local, s3, s3_endpoint, monkeypatch):
    """The approximate mode's scatter and gather files on S3: tasks read ranges of them; same table as in memory."""
    import numpy as np
    from test_similarity import clustered, write_embeddings

    from enrich_dist.config import SimilarityConfig
    from enrich_dist.schema import NEIGHBORS_DIR
    from enrich_dist.similarity import partitioned, stage
    from enrich_dist.similarity.stage import compute_similarity, run_similarity

    monkeypatch.setattr(partitioned, "SCAN_ROWS", 41)
    monkeypatch.setattr(partitioned, "GROUP_ROWS", 60)
    monkeypatch.setattr(stage, "_read_embeddings", lambda run: pytest.fail("approx mode must not read the matrix"))
    run = RunDir(f"s3://{_bucket(s3, 'runs')}/approx", {"endpoint_url": s3_endpoint})
    x = clustered(150, 8, 8, 0.4, seed=31)
    ids = np.arange(150) * 3
    write_embeddings(run, x, ids, shards=3)
    cfg = SimilarityConfig(mode="approx", n_partitions=6, nprobe=2, top_k=4, block_size=16, sample_size=30)
    run_similarity(run, cfg)
    assert run.read_table(NEIGHBORS_DIR).equals(compute_similarity(x, ids, cfg, progress=False)[0])
    assert not run.exists(partitioned.SCRATCH_DIR)


def test_bring_your_own_parquet_is_read_from_s3_by_ranges(s3, s3_endpoint, monkeypatch, tmp_path):
    """A byo Parquet file on S3 is read through a file handle (row group by row group), never fetched whole;
    a matrix above the in-memory limit goes to a memory-mapped file; transient errors read it again."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from enrich_dist import embed

    opts = {"endpoint_url": s3_endpoint}
    uri = f"s3://{_bucket(s3, 'byo')}/mine.parquet"
    vecs = np.random.default_rng(3).standard_normal((5000, 16)).astype(np.float32)
    table = pa.table({"image_id": np.arange(5000) * 2, "embedding": pa.FixedSizeListArray.from_arrays(vecs.ravel(), 16)})
    with fsspec.open(uri, "wb", **opts) as fh:
        pq.write_table(table, fh, row_group_size=700)
    monkeypatch.setattr(embed, "read_uri", lambda *a, **kw: pytest.fail("a byo Parquet file must not be read whole"))
    monkeypatch.setattr(embed, "BYO_IN_MEMORY", 0)
    key, keys, matrix = embed.read_byo(uri, opts, spill=str(tmp_path))
    assert key == "image_id" and keys.tolist() == list(range(0, 10000, 2))
    assert isinstance(matrix, np.memmap) and np.array_equal(matrix, vecs)

    real, calls = embed._byo_parquet, []

    def flaky(source, spill=None):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real(source, spill)

    monkeypatch.setattr(embed, "_byo_parquet", flaky)
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.0)
    assert np.array_equal(embed.read_byo(uri, opts, spill=str(tmp_path))[2], vecs) and len(calls) == 2
