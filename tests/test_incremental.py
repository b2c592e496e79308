"""Incremental runs over a grown archive: reuse of the encoder and of unchanged embeddings, ranking of new images.

One previous run over 23 images (manifest shards of 7: awkward sizes), then the archive grows by 9
images, one image is rewritten and one deleted. Proof of reuse: one shard of the previous run's
embeddings is negated on disk before the incremental run; the incremental run must carry those
negated vectors (copied, not recomputed) while a fresh embedding with the same encoder gives the
original ones.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from enrich_dist import schema
from enrich_dist.cli import main
from enrich_dist.config import load_config
from enrich_dist.embed import run_embed
from enrich_dist.incremental import FILES_PATH, copy_encoder
from enrich_dist.manifest import run_manifest
from enrich_dist.storage import RunDir, shard_name

# dummy credentials for the loopback S3 test server, set at collection so Ray workers (started later) inherit them
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "AKIAENRICHTEST000002", "AWS_SECRET_ACCESS_KEY": "enrich-incremental-test",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}.items():
    os.environ.setdefault(_key, _value)
N_OLD, N_ADDED = 23, 9
CONFIG = """
manifest: {shard_size: 7}
encoder: {epochs: 1, sample: 20, latent_dim: 16, batch_size: 8}
embed: {batch_size: 5}
similarity: {block_size: 9}
select: {replicates: 2, budgets: [0.2, 1.0], seed_size: 3, batch_size: 4}
"""


def _image(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 40 + seed % 13  # awkward, varying sizes
    img = np.zeros((size, size), np.uint8)
    for _ in range(3):
        x, y, w, h = rng.integers(0, size - 8, 4)
        img[y : y + 8 + h % 16, x : x + 8 + w % 16] = rng.integers(60, 255)
    img = (img + rng.integers(0, 30, img.shape)).astype(np.uint8)
    Image.fromarray(img).save(path)


def _vectors(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    table = run.read_table(schema.EMBEDDINGS_DIR)
    dim = table.schema.field("embedding").type.list_size
    return table["image_id"].to_numpy(), table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)


def _by_uri(run: RunDir) -> dict[str, int]:
    m = run.read_table(schema.MANIFEST_DIR, columns=["image_id", "uri"])
    return dict(zip(m["uri"].to_pylist(), m["image_id"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def grown(ray_local, tmp_path_factory):
    """(archive, config path, previous run, incremental run, fresh embedding of the grown archive, facts)."""
    base = tmp_path_factory.mktemp("incremental")
    archive, old_dir = base / "archive", str(base / "old")
    archive.mkdir()
    for i in range(N_OLD):
        _image(str(archive / f"img{i:03d}.png"), i)
    config = base / "run.yaml"
    config.write_text(CONFIG)
    assert main(["run", "--input", str(archive), "--output", old_dir, "--config", str(config)]) == 0
    old = RunDir(old_dir)

    # the archive grows: new images, one rewritten (other content, later mtime), one deleted
    for i in range(N_OLD, N_OLD + N_ADDED):
        _image(str(archive / f"img{i:03d}.png"), i)
    changed, removed = str(archive / "img005.png"), str(archive / "img017.png")
    _image(changed, 1005)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.remove(removed)

    # negate the vectors of previous shard 1 on disk: reused rows must carry them unchanged
    rel = f"{schema.EMBEDDINGS_DIR}/{shard_name(1)}"
    table = old.read_table(rel)
    dim = table.schema.field("embedding").type.list_size
    neg = -table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(neg.reshape(-1), pa.float32()), dim)
    old.write_table(rel, table.set_column(1, "embedding", emb))
    tampered_uris = set(
        old.read_table(schema.MANIFEST_DIR)
        .filter(pc.is_in(pc.field("image_id"), table["image_id"]))["uri"]
        .to_pylist()
    )

    new_dir = str(base / "new")
    logging.getLogger("enrich_dist").setLevel(logging.INFO)
    assert main(
        ["run", "--input", str(archive), "--output", new_dir, "--previous-run", old_dir, "--config", str(config)]
    ) == 0

    # a fresh embedding of the grown archive with the same encoder: the oracle
    fresh = RunDir(str(base / "fresh"))
    cfg = load_config(str(config))
    run_manifest(fresh, str(archive), cfg.manifest)
    copy_encoder(fresh, old)
    run_embed(fresh, cfg.embed)
    facts = {"changed": changed, "removed": removed, "tampered": tampered_uris - {changed, removed}}
    return archive, config, old, RunDir(new_dir), fresh, facts


def test_counts_and_provenance_are_recorded(grown):
    _, _, old, new, _, facts = grown
    stats = new.read_json("run.json")["stages"]["incremental"]["stats"]
    assert stats["n_new"] == N_ADDED and stats["n_changed"] == 1 and stats["n_removed"] == 1
    assert stats["n_reused"] == N_OLD - 2 and stats["n_retried"] == 0
    assert stats["n_images"] == N_OLD + N_ADDED - 1 and stats["previous_run"] == old.uri
    # the encoder is the previous run's, byte for byte, and says where it came from
    assert new.read_bytes("encoder/contrastive.pt") == old.read_bytes("encoder/contrastive.pt")
    assert new.read_json("encoder/_SUCCESS")["reused_from"] == old.uri
    # every run records file fingerprints; the rewritten file's differ, the others' match
    fp_old = {r["uri"]: r for r in old.read_table(FILES_PATH).to_pylist()}
    fp_new = {r["uri"]: r for r in new.read_table(FILES_PATH).to_pylist()}
    assert facts["removed"] in fp_old and facts["removed"] not in fp_new
    assert fp_old[facts["changed"]]["mtime_ns"] != fp_new[facts["changed"]]["mtime_ns"]
    same = [u for u in fp_new if u in fp_old and u != facts["changed"]]
    assert len(same) == N_OLD - 2 and all(fp_old[u] == fp_new[u] for u in same)
    states = new.read_table("incremental/images.parquet")
    by_state = {s: states.filter(pc.equal(states["state"], s)).num_rows for s in ("reused", "new", "changed")}
    assert by_state == {"reused": N_OLD - 2, "new": N_ADDED, "changed": 1}


def test_unchanged_embeddings_are_copied_not_recomputed(grown):
    _, _, old, new, fresh, facts = grown
    ids, vecs = _vectors(new)
    fids, fvecs = _vectors(fresh)
    uri_new, uri_fresh = _by_uri(new), _by_uri(fresh)
    assert uri_new == uri_fresh  # same manifest, same dense ids
    row = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    frow = dict(zip(fids.tolist(), range(len(fids)), strict=True))
    old_ids, old_vecs = _vectors(old)
    old_row = dict(zip(old_ids.tolist(), range(len(old_ids)), strict=True))
    uri_old = _by_uri(old)
    assert facts["tampered"]
    for uri in facts["tampered"]:
        v = vecs[row[uri_new[uri]]]
        assert np.array_equal(v, old_vecs[old_row[uri_old[uri]]])  # the bytes on disk of the previous run
        assert np.allclose(v, -fvecs[frow[uri_fresh[uri]]], atol=1e-5)  # not what embedding it again gives
    # the embed stage embedded only the new and the changed images
    embed = new.read_json("run.json")["stages"]["embed"]["stats"]
    assert embed["n_embedded"] == N_OLD + N_ADDED - 1
    inc = new.read_json("incremental/_SUCCESS")
    assert inc["n_reused_embeddings"] == N_OLD - 2
    assert inc["reused_whole_shards"] >= 1 and inc["reused_partial_shards"] >= 1


def test_embeddings_match_a_fresh_run_with_the_same_encoder(grown):
    _, _, _, new, fresh, facts = grown
    uri_of = {v: k for k, v in _by_uri(new).items()}
    for index, path in fresh.shards(schema.EMBEDDINGS_DIR).items():
        a, b = new.read_table(path), fresh.read_table(path)
        assert a.schema == b.schema and a["image_id"].to_pylist() == b["image_id"].to_pylist(), index
        dim = a.schema.field("embedding").type.list_size
        va = a["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        vb = b["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        sign = np.array([-1.0 if uri_of[i] in facts["tampered"] else 1.0 for i in a["image_id"].to_pylist()])
        assert np.allclose(va, sign[:, None] * vb, atol=1e-5), index
    assert set(new.shards(schema.EMBEDDINGS_DIR)) == set(fresh.shards(schema.EMBEDDINGS_DIR))
    assert not new.shards(f"{schema.EMBEDDINGS_DIR}/errors")


def test_ranking_holds_only_new_images_after_the_labelled_seeds(grown):
    _, _, old, new, _, facts = grown
    uri_new, uri_old = _by_uri(new), _by_uri(old)
    old_uri = {v: k for k, v in uri_old.items()}
    # the default labelled set: the previous ranking's replicate 0 up to its smallest budget (>= its seeds)
    prev = old.read_table("selection/ranking.parquet").filter(pc.equal(pc.field("replicate"), 0)).sort_by("rank")
    budget = min(b["n_images"] for b in old.read_json("selection/selection.json")["budgets"])
    count = max(budget, int(pc.sum(prev["is_seed"]).as_py()))
    labelled = [old_uri[i] for i in prev["image_id"].to_pylist()[:count]]
    seeds = {uri_new[u] for u in labelled if u in uri_new and u != facts["changed"]}
    states = new.read_table("incremental/images.parquet")
    fresh = set(states.filter(pc.is_in(states["state"], pa.array(["new", "changed"])))["image_id"].to_pylist())
    assert len(fresh) == N_ADDED + 1 and uri_new[facts["changed"]] in fresh
    ranking = new.read_table("selection/ranking.parquet")
    for r in (0, 1):
        rep = ranking.filter(pc.equal(ranking["replicate"], r)).sort_by("rank")
        is_seed = rep["is_seed"].to_pylist()
        ids = rep["image_id"].to_pylist()
        assert set(ids[: sum(is_seed)]) == seeds and all(is_seed[: len(seeds)]) and not any(is_seed[len(seeds) :])
        assert set(ids[len(seeds) :]) == fresh  # only new and changed images are ranked
    assert new.exists("report/index.html") and not new.is_done("evaluation")


def test_labelled_file_of_uris_seeds_the_ranking(grown, tmp_path):
    archive, config, old, _, _, facts = grown
    chosen = [str(archive / "img000.png"), str(archive / "img009.png"), facts["changed"], facts["removed"]]
    labelled = tmp_path / "labelled.txt"
    labelled.write_text("uri\n" + "\n".join(chosen) + "\n")
    out = RunDir(str(tmp_path / "run"))
    args = ["run", "--input", str(archive), "--output", out.uri, "--previous-run", old.uri, "--config", str(config),
            "--labelled", str(labelled)]
    assert main(args) == 0
    stats = out.read_json("incremental/_SUCCESS")
    assert stats["n_labelled"] == 2 and stats["n_labelled_dropped"] == 2  # changed and removed ones are not seeds
    uri_new = _by_uri(out)
    ranking = out.read_table("selection/ranking.parquet").filter(pc.equal(pc.field("replicate"), 0)).sort_by("rank")
    assert ranking["image_id"].to_pylist()[:2] == [uri_new[chosen[0]], uri_new[chosen[1]]]
    assert ranking.num_rows == 2 + N_ADDED + 1
    # the nightly export: the ranked images not yet labelled, in ranking order, with their uris
    import pyarrow.csv as pacsv

    nxt = pacsv.read_csv(out.path("export/next_to_label.csv"))
    assert nxt.column("image_id").to_pylist() == ranking["image_id"].to_pylist()[2:]
    by_id = {v: k for k, v in uri_new.items()}
    assert nxt.column("uri").to_pylist() == [by_id[i] for i in ranking["image_id"].to_pylist()[2:]]


def test_bad_inputs_name_the_run_dir_and_the_fix(grown, tmp_path, caplog):
    archive, config, old, _, _, _ = grown
    base = ["run", "--input", str(archive), "--config", str(config)]
    missing = str(tmp_path / "nowhere")
    assert main([*base, "--output", str(tmp_path / "a"), "--previous-run", missing]) == 3  # run-dir data
    assert f"--previous-run {missing} does not exist" in caplog.text and "drop --previous-run" in caplog.text
    caplog.clear()
    # a setting changed on purpose that the reused encoder was not trained with (defaults are inherited)
    assert main([*base, "--output", str(tmp_path / "b"), "--previous-run", old.uri, "--latent-dim", "8"]) == 2
    assert old.uri in caplog.text and "latent_dim 16 -> 8" in caplog.text and "--retrain-encoder" in caplog.text
    caplog.clear()
    assert main([*base, "--output", str(tmp_path / "c"), "--previous-run", old.uri, "--embedder", "pixels"]) == 2
    assert "holds embeddings from {'embedder': 'contrastive'}" in caplog.text
    caplog.clear()
    assert main([*base, "--output", str(tmp_path / "d"), "--labelled", "x.txt"]) == 2
    assert "add --previous-run" in caplog.text
    caplog.clear()
    bad = tmp_path / "bad.txt"
    bad.write_text("999999\n")
    assert main([*base, "--output", str(tmp_path / "e"), "--previous-run", old.uri, "--labelled", str(bad)]) == 3
    assert f"--labelled {bad}" in caplog.text and "999999" in caplog.text
    # a previous run made before fingerprints existed
    legacy = tmp_path / "legacy"
    shutil.copytree(old.uri, legacy)
    os.remove(legacy / FILES_PATH)
    caplog.clear()
    assert main([*base, "--output", str(tmp_path / "f"), "--previous-run", str(legacy)]) == 3
    assert f"--previous-run {legacy} has no file fingerprints" in caplog.text
    for name in "abcdf":  # nothing was computed for a refused run
        assert not (tmp_path / name / "embeddings").exists()


@pytest.mark.slow
def test_retrain_encoder_reuses_nothing(grown, tmp_path):
    archive, config, old, _, _, facts = grown
    out = RunDir(str(tmp_path / "retrained"))
    args = ["run", "--input", str(archive), "--output", out.uri, "--previous-run", old.uri, "--config", str(config),
            "--retrain-encoder"]
    assert main(args) == 0
    stats = out.read_json("incremental/_SUCCESS")
    assert stats["encoder"] == "retrained: nothing reused" and stats["n_reused_embeddings"] == 0
    assert stats["n_reused"] == 0 and stats["n_unchanged"] == N_OLD - 2
    assert "reused_from" not in out.read_json("encoder/_SUCCESS") and not out.exists("embeddings_meta/reused")
    # the tampered previous vectors are not in this run: every image was embedded with the new encoder
    assert out.read_bytes("encoder/contrastive.pt") != old.read_bytes("encoder/contrastive.pt")
    assert out.read_table(schema.EMBEDDINGS_DIR).num_rows == N_OLD + N_ADDED - 1
    ranking = out.read_table("selection/ranking.parquet").filter(pc.equal(pc.field("replicate"), 0))
    states = out.read_table("incremental/images.parquet")
    fresh = set(states.filter(pc.is_in(states["state"], pa.array(["new", "changed"])))["image_id"].to_pylist())
    assert set(ranking.filter(pc.invert(ranking["is_seed"]))["image_id"].to_pylist()) == fresh


@pytest.mark.slow
def test_nightly_s3_runs_build_on_the_latest_finished_night(ray_local, tmp_path):
    """Dated run dirs in a real S3 API (moto server on 127.0.0.1): ETags decide what changed."""
    import json

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="archive-inc")
        s3.create_bucket(Bucket="runs-inc")

        def put(i: int, seed: int) -> None:
            path = tmp_path / f"{i}.png"
            _image(str(path), seed)
            s3.put_object(Bucket="archive-inc", Key=f"echo/img{i:03d}.png", Body=path.read_bytes())

        for i in range(11):
            put(i, i)
        options = json.dumps({"endpoint_url": endpoint})
        config = tmp_path / "run.yaml"
        config.write_text(CONFIG)
        base = ["run", "--input", "s3://archive-inc/echo", "--config", str(config), "--storage-options", options]
        first = "s3://runs-inc/nightly/2026-01-01"
        # the first night has nothing to build on: a fresh run
        assert main([*base, "--output", first, "--previous-run", "latest"]) == 0
        put(11, 11)
        put(12, 12)
        put(3, 103)  # rewritten: new ETag
        s3.delete_object(Bucket="archive-inc", Key="echo/img007.png")
        second = "s3://runs-inc/nightly/2026-01-02"
        assert main([*base, "--output", second, "--previous-run", "latest"]) == 0
        run = RunDir(second, {"endpoint_url": endpoint})
        stats = run.read_json("incremental/_SUCCESS")
        assert stats["previous_run"] == first
        assert (stats["n_reused"], stats["n_new"], stats["n_changed"], stats["n_removed"]) == (9, 2, 1, 1)
        files = run.read_table(FILES_PATH)
        assert files["etag"].null_count == 0 and files["mtime_ns"].null_count == files.num_rows
        uri_new = _by_uri(run)
        ranking = run.read_table("selection/ranking.parquet").filter(pc.equal(pc.field("replicate"), 0))
        ranked = set(ranking.filter(pc.invert(ranking["is_seed"]))["image_id"].to_pylist())
        assert ranked == {uri_new[f"s3://archive-inc/echo/img{i:03d}.png"] for i in (3, 11, 12)}
        assert not RunDir(first, {"endpoint_url": endpoint}).exists("incremental")
    finally:
        server.stop()


def test_a_night_with_nothing_new_reuses_everything_and_ranks_nothing(grown, tmp_path):
    archive, config, _, new, _, _ = grown
    out = RunDir(str(tmp_path / "quiet"))
    args = ["run", "--input", str(archive), "--output", out.uri, "--previous-run", new.uri, "--config", str(config)]
    assert main(args) == 0
    stats = out.read_json("incremental/_SUCCESS")
    assert (stats["n_reused"], stats["n_new"], stats["n_changed"], stats["n_removed"]) == (N_OLD + N_ADDED - 1, 0, 0, 0)
    assert stats["n_to_rank"] == 0 and stats["reused_partial_shards"] == 0
    # the previous (incremental) run's seeds stay labelled: a chain of nights keeps them
    prev_seeds = new.read_bytes("incremental/labelled.csv")
    assert out.read_bytes("incremental/labelled.csv") == prev_seeds  # same archive, same ids
    assert out.read_table(schema.EMBEDDINGS_DIR).equals(new.read_table(schema.EMBEDDINGS_DIR))
    assert not out.is_done("selection") and out.exists("report/index.html")


def test_runs_made_before_the_kl_warmup_setting_read_as_trained_without_it(tmp_path):
    from enrich_dist.incremental import _encoder_config
    from enrich_dist.storage import RunDir

    old = RunDir(str(tmp_path / "old"))
    old.write_json("run.json", {"config": {"encoder": {"objective": "capacity", "beta": 4.0, "learning_rate": 0.002}}})
    # settings added later (KL warm-up, the contrastive encoder's) read as the values those runs trained with
    added = {"kl_warmup": 0.0, "temperature": 0.1, "contrastive_batch_size": 256, "clip_positives": 0.0, "clip_window": 2}
    assert _encoder_config(old) == {"objective": "capacity", "beta": 4.0, "learning_rate": 0.002, **added}
    new = RunDir(str(tmp_path / "new"))
    new.write_json("run.json", {"config": {"encoder": {"objective": "beta", "kl_warmup": 0.3}}})
    assert _encoder_config(new) == {**added, "objective": "beta", "kl_warmup": 0.3}
    assert _encoder_config(RunDir(str(tmp_path / "none"))) is None


def test_a_copied_archive_is_recognised_by_content_not_path(grown, tmp_path):
    """The archive copied elsewhere (new paths, new mtimes, same bytes) reuses every embedding and keeps the
    labelled seeds; a file edited in the copy is seen as changed."""
    archive, config, _, new, _, _ = grown
    moved = tmp_path / "mounted" / "echo"
    shutil.copytree(archive, moved, copy_function=shutil.copyfile)  # a plain copy: fresh mtimes
    _image(str(moved / "img002.png"), 2002)  # edited in the copy: other content
    out = RunDir(str(tmp_path / "moved"))
    args = ["run", "--input", str(moved), "--output", out.uri, "--previous-run", new.uri, "--config", str(config)]
    assert main(args) == 0
    stats = out.read_json("incremental/_SUCCESS")
    assert (stats["n_new"], stats["n_changed"], stats["n_removed"]) == (0, 1, 0), stats
    assert stats["n_reused"] + stats["n_retried"] == N_OLD + N_ADDED - 1 - 1
    seeds_before = new.read_bytes("incremental/labelled.csv").decode().split()[1:]
    assert stats["n_labelled"] + stats["n_labelled_dropped"] == len(seeds_before) and stats["n_labelled"] >= 1
    files = out.read_table(schema.MANIFEST_FILES).to_pylist()
    assert {f["rel"] for f in files} == {p.name for p in moved.iterdir()}
    assert all(f["digest"] and f["uri"].startswith(str(moved)) for f in files)


def test_fingerprint_identity_rules(tmp_path):
    """Files match by their path under the root; content by digest, else ETag, else mtime, always with the size."""
    from enrich_dist.fingerprints import Fingerprint, fingerprint_files, relative_to, sampled_digest

    assert relative_to("/data/echo/p1/a.png", "/data/echo") == "p1/a.png"
    assert relative_to("/data/echo2/a.png", "/data/echo") is None  # a sibling prefix is not under the root
    assert relative_to("s3://b/echo/a.png", "s3://b/echo/") == "a.png" and relative_to("s3://c/echo/a.png", "s3://b/echo") is None
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1024)  # 256 KiB: head and tail sampled, middle not
    first = sampled_digest(str(big), big.stat().st_size)
    data = bytearray(big.read_bytes())
    data[100_000] ^= 1  # the unsampled middle: the documented blind spot
    big.write_bytes(bytes(data))
    assert sampled_digest(str(big), big.stat().st_size) == first
    data[10] ^= 1
    big.write_bytes(bytes(data))
    assert sampled_digest(str(big), big.stat().st_size) != first
    table = fingerprint_files([str(big), str(tmp_path / "gone.png")], root=str(tmp_path))
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows[str(big)]["rel"] == "big.bin" and rows[str(tmp_path / "gone.png")]["size"] is None

    def fp(**kw):
        return Fingerprint({"uri": "u", "size": 10, **kw})

    assert fp(digest="a", mtime_ns=1).same_content(fp(digest="a", mtime_ns=2))  # a copy: new mtime, same bytes
    assert not fp(digest="a").same_content(fp(digest="b"))
    assert fp(etag="e").same_content(fp(etag="e")) and not fp(etag="e").same_content(fp(etag="f"))
    assert fp(mtime_ns=5).same_content(fp(mtime_ns=5)) and not fp(mtime_ns=5).same_content(fp(mtime_ns=6))
    assert not fp(digest="a").same_content(Fingerprint({"uri": "u", "size": 11, "digest": "a"}))
    assert not fp().same_content(fp())  # nothing to compare: changed, never silently reused
    assert fp(rel="p/a.png").key == "rel:p/a.png" and fp().key == "uri:u"


def test_reused_encoder_brings_its_settings(grown, tmp_path, caplog):
    """An incremental run whose config leaves the encoder at its defaults inherits the previous run's encoder
    settings (it reuses that encoder), says so, and records them; the caller's config is left as it was."""
    from enrich_dist.config import RunConfig
    from enrich_dist.incremental import plan_stages

    archive, config, _, new, _, _ = grown
    no_encoder = tmp_path / "run.yaml"
    no_encoder.write_text("\n".join(line for line in CONFIG.splitlines() if not line.startswith("encoder")))
    out = RunDir(str(tmp_path / "defaults"))
    caplog.set_level(logging.INFO, logger="enrich_dist")
    args = ["run", "--input", str(archive), "--output", out.uri, "--previous-run", new.uri, "--config", str(no_encoder)]
    assert main(args) == 0
    assert "its encoder is reused, so its encoder settings apply" in caplog.text and "epochs 1 (not 20)" in caplog.text
    recorded = out.read_json("run.json")["config"]["encoder"]
    assert (recorded["epochs"], recorded["latent_dim"], recorded["sample"]) == (1, 16, 20)
    cfg = RunConfig(input=str(archive), output=str(tmp_path / "plan"))
    cfg.incremental.previous_run = new.uri
    stages, planned = plan_stages(RunDir(cfg.output), cfg, ("manifest", "embed", "select"))
    assert stages == ("manifest", "incremental", "embed", "select")
    assert planned.encoder.epochs == 1 and cfg.encoder.epochs == 20  # a new config; the given one is untouched
    assert planned.select.seed_ids.endswith("incremental/labelled.csv") and cfg.select.seed_ids is None
