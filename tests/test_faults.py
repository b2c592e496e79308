"""Faults with real processes: a killed embedding actor, a killed driver, a flaky S3 server, a full disk.

Each test checks the stage's promise: outputs equal to an uninterrupted run's, committed work not redone,
and on a write error a clear message with committed outputs left as they were.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from faultproxy import FaultProxy  # tests/ is on sys.path (pytest rootdir conftest)
from s3env import use_loopback_s3_env

from enrich_dist import schema
from enrich_dist.config import EmbedConfig, ManifestConfig, RunConfig, SelectConfig, SimilarityConfig
from enrich_dist.storage import TMP_PREFIX, RunDir

use_loopback_s3_env()  # at collection, so the Ray workers started later inherit it

REPO = Path(__file__).resolve().parents[1]
DRIVER_TIMEOUT_S = 300  # a stuck subprocess fails the test instead of hanging it


# ---------------------------------------------------------------- helpers


def write_inputs(run: RunDir, n: int, dim: int, shards: int = 4, seed: int = 0) -> None:
    """A committed manifest and committed unit-norm embeddings of ``n`` images (no image files needed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    for s, part in enumerate(np.array_split(ids, shards)):
        run.write_table(
            f"{schema.EMBEDDINGS_DIR}/part-{s:05d}.parquet",
            pa.table(
                {"image_id": pa.array(part), "embedding": pa.FixedSizeListArray.from_arrays(x[part].ravel(), dim)},
                schema=schema.embeddings_schema(dim),
            ),
        )
        m = len(part)
        run.write_table(
            f"{schema.MANIFEST_DIR}/part-{s:05d}.parquet",
            pa.table(
                {
                    "image_id": pa.array(part),
                    "uri": [f"img/{i}.png" for i in part],
                    "patient_id": [f"p{i % 7}" for i in part],
                    "clip_id": [f"c{i % 31}" for i in part],
                    "frame": pa.array([0] * m, pa.int32()),
                    "label": ["A" if i % 3 else "B" for i in part],
                    "split": ["train"] * m,
                    "mask_uri": pa.nulls(m, pa.string()),
                    "status": ["ok"] * m,
                    "error": pa.nulls(m, pa.string()),
                },
                schema=schema.MANIFEST,
            ),
        )
    run.mark_done(schema.MANIFEST_DIR, {"n_images": n})
    run.mark_done(schema.EMBEDDINGS_DIR, {"n_embedded": n})


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tmp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(f"{TMP_PREFIX}*")]


def driver(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m enrich_dist ARGS`` in its own process group (its local Ray too), output to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "enrich_dist", *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# A local Ray that cannot start on an overloaded machine (its agent too slow to report a port) is no fault of
# the stage under test: such a driver is started once more, never more, and only for that message.
RAY_STARTUP_FAILED = "The current node timed out during startup"


def _ray_start_failed(proc: subprocess.Popen, log: Path, offset: int) -> bool:
    return proc.returncode != 0 and RAY_STARTUP_FAILED in log.read_text()[offset:]


def complete(args: list[str], log: Path) -> str:
    """Run a driver to its end; its output (the test fails with it on a non-zero exit)."""
    for attempt in (1, 2):
        offset = len(log.read_text()) if log.exists() else 0
        proc = driver(args, log)
        try:
            proc.wait(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail(f"driver still running after {DRIVER_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
        if not (attempt == 1 and _ray_start_failed(proc, log, offset)):
            break
    text = log.read_text()[offset:]
    assert proc.returncode == 0, text[-4000:]
    return text


def start_and_kill_when(args: list[str], log: Path, predicate, what: str) -> None:
    """Start a driver, SIGKILL it (and its local Ray) as soon as ``predicate()`` holds."""
    for attempt in (1, 2):
        offset = len(log.read_text()) if log.exists() else 0
        proc = driver(args, log)
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        while not predicate():
            if proc.poll() is not None:
                if attempt == 1 and _ray_start_failed(proc, log, offset):
                    break
                pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                kill_group(proc)
                pytest.fail(f"no {what} after {DRIVER_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.01)
        else:
            kill_group(proc)
            return


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a driver, its process group and every process it started (its local Ray), by pid."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for child in family:  # anything that left the group (a Ray daemon) goes too
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def write_config(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---------------------------------------------------------------- an embedding actor killed mid-stage


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3 API server (moto, server mode) on a free loopback port."""
    import logging

    from moto.server import ThreadedMotoServer

    for name in ("werkzeug", "moto"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


ECHO_IMAGES = 24


@pytest.fixture(scope="module")
def echo_archive(moto_endpoint):
    """(endpoint, manifest.csv URI) of a synthetic echo archive in a fresh bucket of the S3 server."""
    import boto3

    from enrich_dist.datasets import make_echo_archive

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"endpoint_url": moto_endpoint}
    make_echo_archive(f"s3://{bucket}/echo", ECHO_IMAGES, 0, storage_options=options, workers=1, progress=False)
    return moto_endpoint, f"s3://{bucket}/echo/manifest.csv"




def _embedder_pids() -> set[int]:
    """Pids of this test process's Ray workers that hold the embedding stage's actor."""
    import psutil

    pids = set()
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "ShardEmbedder" in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def test_embed_actor_sigkilled_mid_stage_every_image_embedded_once(ray_local, echo_archive, tmp_path):
    from enrich_dist.embed import run_embed
    from enrich_dist.manifest import run_manifest

    endpoint, archive = echo_archive
    n, shard_size = ECHO_IMAGES, 3
    # the archive is read through a slow server (50 ms a request), so the stage lasts long enough to be hit
    slow = FaultProxy(endpoint, rate=0.0, delay=0.05)
    killed = RunDir(str(tmp_path / "killed"), {"endpoint_url": slow.start()})
    clean = RunDir(str(tmp_path / "clean"), {"endpoint_url": endpoint})
    run_manifest(killed, archive, ManifestConfig(shard_size=shard_size), {"endpoint_url": endpoint})
    shutil.copytree(killed.path(schema.MANIFEST_DIR), clean.path(schema.MANIFEST_DIR))
    cfg = EmbedConfig(embedder="pixels", batch_size=shard_size)

    outcome: dict = {}

    def stage() -> None:
        try:
            outcome["stats"] = run_embed(killed, cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=stage, name="embed-stage")
    thread.start()
    victims: set[int] = set()
    deadline = time.monotonic() + DRIVER_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        committed = killed.shards(schema.EMBEDDINGS_DIR)
        pids = _embedder_pids()
        if committed and pids:
            assert len(committed) < n // shard_size, "the stage finished before the actor could be killed"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            victims = pids
            break
        time.sleep(0.01)
    thread.join(DRIVER_TIMEOUT_S)
    slow.stop()
    assert not thread.is_alive(), "the embed stage hung after its actor was killed"
    assert "error" not in outcome, outcome.get("error")
    assert victims, "no embedding actor process was found to kill"
    # Ray Data restarted the actor in a new process and retried its shards
    assert not victims & _embedder_pids()

    emb = killed.read_table(schema.EMBEDDINGS_DIR)
    ids = emb.column("image_id").to_pylist()
    manifest = killed.read_table(schema.MANIFEST_DIR)
    ok = [i for i, s in zip(manifest["image_id"].to_pylist(), manifest["status"].to_pylist(), strict=True) if s == "ok"]
    assert len(ok) == n and sorted(ids) == sorted(ok) and len(set(ids)) == len(ids)
    assert killed.is_done(schema.EMBEDDINGS_DIR) and outcome["stats"]["n_embedded"] == n
    assert not tmp_files(Path(killed.uri))

    run_embed(clean, cfg)
    shards = {p: clean.read_bytes(p) for p in clean.shards(schema.EMBEDDINGS_DIR).values()}
    assert {p: killed.read_bytes(p) for p in killed.shards(schema.EMBEDDINGS_DIR).values()} == shards


# ---------------------------------------------------------------- the driver killed during similarity and selection


def _summary_without_timings(run: RunDir) -> dict:
    summary = run.read_json("similarity/summary.json")
    return {k: v for k, v in summary.items() if k not in ("seconds", "tiles")}


def test_driver_sigkilled_during_similarity_rerun_redoes_only_uncommitted_tiles(ray_local, tmp_path):
    from enrich_dist.similarity import run_similarity
    from enrich_dist.similarity.reduce import PARTIALS_DIR, STATE

    n, dim, block = 8000, 32, 256
    killed, clean = RunDir(str(tmp_path / "killed")), RunDir(str(tmp_path / "clean"))
    for run in (killed, clean):
        write_inputs(run, n, dim)
    config = write_config(tmp_path / "run.yaml", "similarity: {checkpoint_seconds: 0}\n")
    args = ["similarity", "--output", killed.uri, "--num-cpus", "1", "--block-size", str(block), "--config", config]
    log = tmp_path / "driver.log"

    start_and_kill_when(args, log, lambda: killed.exists(STATE), "a similarity checkpoint")
    state = np.load(io.BytesIO(killed.read_bytes(STATE)))
    committed, total = int(state["done"].sum()), len(state["done"])
    assert 0 < committed < total and not killed.is_done("similarity"), (committed, total)

    complete(args, log)
    summary = killed.read_json("similarity/summary.json")
    assert summary["tiles"] == {"total": total, "computed": total - committed, "resumed": committed, "nodes": 1}
    assert not killed.exists(PARTIALS_DIR) and not tmp_files(Path(killed.uri))

    run_similarity(clean, SimilarityConfig(block_size=block))
    for rel in clean.shards(schema.NEIGHBORS_DIR).values():
        assert killed.read_bytes(rel) == clean.read_bytes(rel), rel
    assert list(killed.shards(schema.NEIGHBORS_DIR)) == list(clean.shards(schema.NEIGHBORS_DIR))
    assert _summary_without_timings(killed) == _summary_without_timings(clean)


SELECT_ARGS = ["--select-workers", "1", "--seed-size", "30", "--batch-size", "20", "--replicates", "2",
               "--budgets", "0.1,0.5,1.0"]
SELECT_CFG = dict(workers=1, seed_size=30, batch_size=20, replicates=2, budgets=(0.1, 0.5, 1.0))
SELECTION_FILES = ("selection/ranking.parquet", "selection/random_ranking.parquet", "selection/subsets.parquet")


def test_driver_sigkilled_during_selection_rerun_resumes_checkpoint(ray_local, tmp_path):
    from enrich_dist.selection import run_select
    from enrich_dist.selection.checkpoint import CHECKPOINT_DIR, checkpoint_path

    n, dim = 1000, 16
    killed, clean = RunDir(str(tmp_path / "killed")), RunDir(str(tmp_path / "clean"))
    for run in (killed, clean):
        write_inputs(run, n, dim)
    config = write_config(tmp_path / "run.yaml", "select: {checkpoint_seconds: 0}\n")
    args = ["select", "--output", killed.uri, "--num-cpus", "1", "--config", config, *SELECT_ARGS]
    log = tmp_path / "driver.log"

    start_and_kill_when(args, log, lambda: killed.exists(checkpoint_path(0)), "a selection checkpoint")
    saved = killed.read_table(checkpoint_path(0))
    ranked = int(np.count_nonzero(saved["chosen"].to_numpy()))
    assert 30 <= ranked < n and not killed.is_done("selection"), ranked

    text = complete(args, log)
    # replicate 0 picks up where its last committed checkpoint stopped, not from its seeds
    assert f"resuming a ranking at {ranked} of {n} images" in text, text[-3000:]
    assert killed.is_done("selection") and not killed.exists(CHECKPOINT_DIR)
    assert not tmp_files(Path(killed.uri))

    run_select(clean, SelectConfig(**SELECT_CFG))
    for rel in SELECTION_FILES:
        assert killed.read_bytes(rel) == clean.read_bytes(rel), rel


# ---------------------------------------------------------------- write errors: a full disk, a file-size limit

# Runs in a fresh interpreter: Ray starts first (its daemons unlimited), then this driver's own writes are
# limited to LIMIT bytes per file (RLIMIT_FSIZE; SIGXFSZ ignored so a write past it fails with EFBIG).
_LIMITED_DRIVER = """
import resource, signal, sys
limit, argv = int(sys.argv[1]), sys.argv[2:]
if argv[0] != "-":
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if argv[0] == "-":  # one overwrite through the run dir
    from enrich_dist.storage import RunDir
    RunDir(argv[1]).write_bytes(argv[2], b"x" * (2 * limit))
else:
    from enrich_dist.cli import main
    sys.exit(main(argv))
"""


def limited(limit: int, argv: list[str]) -> subprocess.CompletedProcess:
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", _LIMITED_DRIVER, str(limit), *argv], cwd=REPO, capture_output=True, text=True,
            timeout=DRIVER_TIMEOUT_S,
        )
        if attempt == 2 or RAY_STARTUP_FAILED not in done.stderr:
            return done


def test_overwrite_past_the_file_size_limit_keeps_the_previous_version(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_json("report/stats.json", {"version": 1})
    before = files_of(tmp_path)
    done = limited(1000, ["-", run.uri, "report/stats.json"])
    assert done.returncode != 0
    assert f"cannot write {run.uri_of('report/stats.json')}" in done.stderr, done.stderr[-2000:]
    assert "file-size limit" in done.stderr
    assert files_of(tmp_path) == before and not tmp_files(tmp_path)


def test_select_failing_to_write_says_why_and_keeps_committed_outputs(ray_local, tmp_path):
    from enrich_dist.selection import run_select
    from enrich_dist.selection.checkpoint import checkpoint_path

    n, dim = 3000, 16
    run, clean = RunDir(str(tmp_path / "run")), RunDir(str(tmp_path / "clean"))
    for r in (run, clean):
        write_inputs(r, n, dim)
    inputs = files_of(Path(run.uri))
    # selection's Ray workers commit their checkpoints; the driver cannot write ranking.parquet (> 16 KB)
    args = ["select", "--output", run.uri, "--select-workers", "0", *SELECT_ARGS[2:]]
    done = limited(16 * 1024, args)
    assert done.returncode != 0
    assert f"cannot write {run.uri_of('selection/ranking.parquet')}" in done.stderr, done.stderr[-3000:]
    assert "file-size limit" in done.stderr
    after = files_of(Path(run.uri))
    assert {k: v for k, v in after.items() if k in inputs} == inputs
    assert not run.is_done("selection") and not run.exists("selection/ranking.parquet")
    assert not tmp_files(Path(run.uri))
    assert run.exists(checkpoint_path(0)) and run.exists(checkpoint_path(1))

    # with room again, the rerun resumes the committed rankings and writes what an unhindered run writes
    cfg = SelectConfig(**{**SELECT_CFG, "workers": 0})
    run_select(run, cfg)
    run_select(clean, cfg)
    for rel in SELECTION_FILES:
        assert run.read_bytes(rel) == clean.read_bytes(rel), rel


# ---------------------------------------------------------------- a flaky S3 server


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) :]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_pipeline_through_a_faulty_s3_proxy_matches_a_clean_run(ray_local, echo_archive):
    import json

    import boto3

    from enrich_dist.pipeline import run_stages

    endpoint, archive = echo_archive
    bucket = archive.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    stages = ("manifest", "embed", "similarity", "select")

    def pipeline(endpoint: str, name: str) -> None:
        cfg = RunConfig(input=archive, output=f"s3://{bucket}/runs/{name}")
        cfg.manifest.shard_size = 12
        cfg.embed.embedder, cfg.embed.batch_size = "pixels", 12
        cfg.similarity.block_size, cfg.similarity.checkpoint_seconds = 16, 0.0
        cfg.select.replicates, cfg.select.budgets, cfg.select.checkpoint_seconds = 2, (0.5, 1.0), 0.0
        run_stages(cfg, stages, {"endpoint_url": endpoint})

    pipeline(endpoint, "clean")
    proxy = FaultProxy(endpoint, rate=0.15, seed=7)
    with proxy as proxy_url:
        pipeline(proxy_url, "faulty")
    print(f"fault proxy: {dict(proxy.counts)}")
    assert all(proxy.counts[f] > 0 for f in ("500", "503", "reset", "drop")), proxy.counts

    clean, faulty = _objects(s3, bucket, "runs/clean/"), _objects(s3, bucket, "runs/faulty/")
    timed = {"run.json", "similarity/summary.json", "selection/selection.json"}
    assert sorted(clean) == sorted(faulty)
    for key in clean:
        if key in timed or key.endswith("_SUCCESS"):
            continue
        assert faulty[key] == clean[key], key
    for key in ("similarity/summary.json",):
        a, b = json.loads(clean[key]), json.loads(faulty[key])
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
