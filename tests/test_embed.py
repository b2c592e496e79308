"""Embedding stage on a real local Ray: unit norm, every image once, errors recorded, resume."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from enrich_dist import imaging, schema
from enrich_dist.config import EmbedConfig, EncoderConfig, ManifestConfig
from enrich_dist.embed import ERRORS_DIR, actor_threads, autocast_dtype, plan_actors, run_embed
from enrich_dist.encoder import BetaVAE, embed_images, encoder_bytes, load_encoder
from enrich_dist.manifest import run_manifest
from enrich_dist.runtime import Resources


def make_run(run_dir, tmp_path, n=23, shard_size=7):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        arr = np.zeros((40, 50), np.uint8)
        r, c = rng.integers(0, 30), rng.integers(0, 40)
        arr[r : r + 10, c : c + 10] = rng.integers(60, 255)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        (root / f"{i:03d}.png").write_bytes(buf.getvalue())
    run_manifest(run_dir, str(root), ManifestConfig(shard_size=shard_size))
    import torch

    torch.manual_seed(0)
    run_dir.write_bytes("encoder/vae.pt", encoder_bytes(BetaVAE(latent_dim=16), EncoderConfig(latent_dim=16)))
    run_dir.mark_done("encoder", {})
    return root


def test_plan_actors_never_waits_for_absent_gpus():
    assert plan_actors(Resources(cpus=2, gpus=0), EmbedConfig()) == (1, 2.0, 0.0, "cpu")
    assert plan_actors(Resources(cpus=16, gpus=0), EmbedConfig()) == (4, 4.0, 0.0, "cpu")
    assert plan_actors(Resources(cpus=16, gpus=0), EmbedConfig(num_actors=16)) == (16, 1.0, 0.0, "cpu")
    # actors never wider than the largest node: two 1-CPU nodes get two 1-CPU actors, not one of 2
    assert plan_actors(Resources(cpus=2, gpus=0), EmbedConfig(), node_cpus=1) == (2, 1.0, 0.0, "cpu")
    assert plan_actors(Resources(cpus=12, gpus=0), EmbedConfig(), node_cpus=3) == (4, 3.0, 0.0, "cpu")
    assert plan_actors(Resources(cpus=16, gpus=0), EmbedConfig(num_actors=2), node_cpus=4) == (2, 4.0, 0.0, "cpu")
    assert plan_actors(Resources(cpus=16, gpus=4), EmbedConfig()) == (4, 4.0, 1.0, "cuda")
    assert plan_actors(Resources(cpus=64, gpus=4), EmbedConfig(), cpus_per_gpu=8) == (4, 8.0, 1.0, "cuda")
    # torch threads, decode threads: CPU actors use every CPU they hold for both, GPU actors decode with theirs
    assert actor_threads(2.0, "cpu", EmbedConfig()) == (1, 2)
    assert actor_threads(4.0, "cpu", EmbedConfig()) == (1, 4)
    assert actor_threads(8.0, "cuda", EmbedConfig()) == (1, 8)
    assert actor_threads(8.0, "cuda", EmbedConfig(decode_threads=3)) == (1, 3)
    assert plan_actors(Resources(cpus=16, gpus=4), EmbedConfig(device="cpu"))[3] == "cpu"
    with pytest.raises(ValueError, match="no GPUs"):
        plan_actors(Resources(cpus=2, gpus=0), EmbedConfig(device="cuda"))


def test_embed_matches_direct_encoding_and_resumes(ray_local, run_dir, tmp_path):
    root = make_run(run_dir, tmp_path)
    # a file that passed the manifest check but is corrupt by embed time: recorded, not fatal
    (root / "005.png").write_bytes(b"garbage now")
    stats = run_embed(run_dir, EmbedConfig(embedder="vae", batch_size=4))
    assert stats["n_embedded"] == 22 and stats["n_errors"] == 1
    emb = run_dir.read_table(schema.EMBEDDINGS_DIR)
    assert emb.schema == schema.embeddings_schema(16)
    ids = emb.column("image_id").to_numpy()
    assert sorted(ids) == [i for i in range(23) if i != 5]
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    errs = run_dir.read_table(ERRORS_DIR).to_pylist()
    assert errs[0]["image_id"] == 5 and "recognised" in errs[0]["error"]

    model = load_encoder(run_dir.read_bytes("encoder/vae.pt"))
    uris = [str(root / f"{i:03d}.png") for i in ids]
    images, errors = imaging.load_images(uris, 64)
    assert not any(errors)
    np.testing.assert_allclose(vecs, embed_images(model, images), atol=1e-5)

    # resume: drop one shard, rerun; the others are not rewritten, the redone one is byte-identical
    shards = run_dir.shards(schema.EMBEDDINGS_DIR)
    assert list(shards) == [0, 1, 2, 3]
    before = {i: (os.stat(run_dir.path(p)).st_mtime_ns, run_dir.read_bytes(p)) for i, p in shards.items()}
    os.remove(run_dir.path(shards[2]))
    run_dir.clear_done(schema.EMBEDDINGS_DIR)
    run_embed(run_dir, EmbedConfig(embedder="vae", batch_size=4))
    after = {i: (os.stat(run_dir.path(p)).st_mtime_ns, run_dir.read_bytes(p)) for i, p in run_dir.shards(schema.EMBEDDINGS_DIR).items()}
    for i in (0, 1, 3):
        assert after[i] == before[i]
    assert after[2][1] == before[2][1] and after[2][0] != before[2][0]


def test_precision_is_fp32_on_cpu_and_mixed_only_on_gpu(monkeypatch):
    import torch

    from enrich_dist import embed

    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="needs a GPU"):
        autocast_dtype("fp16", "cpu")
    monkeypatch.setattr(embed, "cpu_bf16", lambda: True)
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16  # CPUs with native bfloat16 may ask for it
    monkeypatch.setattr(embed, "cpu_bf16", lambda: False)
    with pytest.raises(ValueError, match="native bfloat16"):
        autocast_dtype("bf16", "cpu")
    with pytest.raises(ValueError, match="auto, fp32, bf16 or fp16"):
        autocast_dtype("int8", "cuda")


def test_embed_requires_earlier_stages(ray_local, run_dir):
    with pytest.raises(FileNotFoundError, match="enrich manifest"):
        run_embed(run_dir, EmbedConfig())
    run_dir.write_table("manifest/part-00000.parquet", pa.table({"image_id": [0]}))
    run_dir.mark_done("manifest", {})
    with pytest.raises(FileNotFoundError, match="enrich train-encoder"):
        run_embed(run_dir, EmbedConfig())


def test_pixel_embedder_is_block_mean_centred():
    from enrich_dist.embed import PixelEmbedder

    rng = np.random.default_rng(3)
    images = rng.random((5, 64, 64)).astype(np.float32)
    out = PixelEmbedder(16)(images)
    expected = np.array([[images[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].mean() for r in range(16) for c in range(16)] for b in range(5)])
    np.testing.assert_allclose(out, expected - expected.mean(axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="must divide 64"):
        PixelEmbedder(10)


def test_pixels_embedder_end_to_end_without_encoder(ray_local, run_dir, tmp_path):
    root = make_run(run_dir, tmp_path, n=9, shard_size=4)
    run_dir.remove("encoder")
    rng = np.random.default_rng(9)
    for i in range(8):  # textured images; image 8 stays a flat square, constant after cropping
        Image.fromarray((rng.random((40, 50)) * 200 + 50).astype(np.uint8)).save(root / f"{i:03d}.png")
    stats = run_embed(run_dir, EmbedConfig(embedder="pixels", pixel_size=8))
    assert stats["embedder"] == "pixels" and stats["n_embedded"] == 8
    assert run_dir.read_table(ERRORS_DIR).to_pylist()[0]["error"] == "zero-norm embedding"
    emb = run_dir.read_table(schema.EMBEDDINGS_DIR)
    assert emb.schema == schema.embeddings_schema(64)
    images, _ = imaging.load_images([str(root / f"{i:03d}.png") for i in range(8)], 64)
    small = images.reshape(8, 8, 8, 8, 8).mean(axis=(2, 4)).reshape(8, -1)
    small -= small.mean(axis=1, keepdims=True)
    vecs = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vecs, small / np.linalg.norm(small, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="already holds embeddings from"):
        run_embed(run_dir, EmbedConfig(embedder="vae"))


@pytest.mark.parametrize("fmt", ["parquet-id", "parquet-id-spilled", "npz-uri", "npy"])
def test_bring_your_own_embeddings_round_trip(ray_local, run_dir, tmp_path, fmt, monkeypatch, caplog):
    import tempfile

    import pyarrow.parquet as pq

    from enrich_dist import embed

    caplog.set_level("INFO")
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    if fmt == "parquet-id-spilled":  # every matrix above the in-memory limit: held in a memory-mapped file
        monkeypatch.setattr(embed, "BYO_IN_MEMORY", 0)
    root = make_run(run_dir, tmp_path, n=10, shard_size=3)
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(10, 7))
    vecs[4] = 0.0  # a zero vector: recorded as an error, never normalised into NaN
    path = tmp_path / f"mine.{fmt.split('-')[0]}"
    keep = [i for i in range(10) if i != 8]  # image 8 has no embedding in the parquet/npz files
    if fmt.startswith("parquet-id"):
        pq.write_table(pa.table({"image_id": keep, "embedding": [list(vecs[i]) for i in keep]}), path)
    elif fmt == "npz-uri":
        np.savez(path, uri=np.array([str(root / f"{i:03d}.png") for i in keep]), embedding=vecs[keep])
    else:
        np.save(path, vecs)
    stats = run_embed(run_dir, EmbedConfig(embedder="byo", embeddings=str(path)))
    emb = run_dir.read_table(schema.EMBEDDINGS_DIR)
    ids = emb.column("image_id").to_pylist()
    missing = {4} if fmt == "npy" else {4, 8}
    assert ids == [i for i in range(10) if i not in missing] and stats["dim"] == 7
    got = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, vecs[ids] / np.linalg.norm(vecs[ids], axis=1, keepdims=True), atol=1e-6)
    errors = {r["image_id"]: r["error"] for r in run_dir.read_table(ERRORS_DIR).to_pylist()}
    assert errors[4] == "zero-norm embedding"
    if fmt != "npy":
        assert "no embedding in" in errors[8]
    assert ("imported matrix in" in caplog.text) == (fmt == "parquet-id-spilled")
    assert not list(spill.iterdir())  # the temporary file is gone


def test_bring_your_own_bad_files_are_named(ray_local, run_dir, tmp_path):
    make_run(run_dir, tmp_path, n=4, shard_size=4)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones(4))
    with pytest.raises(ValueError, match=r"bad.npy: embeddings must be a numeric 2-D array"):
        run_embed(run_dir, EmbedConfig(embedder="byo", embeddings=str(bad)))
    short = tmp_path / "short.npy"
    np.save(short, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"short.npy: 3 rows but the manifest has 4"):
        run_embed(run_dir, EmbedConfig(embedder="byo", embeddings=str(short)))
    other = tmp_path / "other.npz"
    np.savez(other, image_id=np.array([0, 99]), embedding=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"other.npz: 1 image_ids are not in the manifest, e.g. \[99\]"):
        run_embed(run_dir, EmbedConfig(embedder="byo", embeddings=str(other)))
    with pytest.raises(ValueError, match="needs --embeddings"):
        run_embed(run_dir, EmbedConfig(embedder="byo"))


def test_byo_parquet_is_read_column_wise(tmp_path):
    """Fixed-size lists (what the embed stage writes) and plain lists, float32 kept, null rows named."""
    import pyarrow.parquet as pq

    from enrich_dist.embed import read_byo

    vecs = np.arange(12, dtype=np.float32).reshape(4, 3)
    fixed = tmp_path / "fixed.parquet"
    pq.write_table(
        pa.table({"image_id": [5, 6, 7, 8], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 3)}),
        fixed,
    )
    key, keys, matrix = read_byo(str(fixed))
    assert key == "image_id" and keys.tolist() == [5, 6, 7, 8] and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, vecs)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"uri": ["a", "b"], "embedding": [[1.0, 2.0], None]}), nulls)
    with pytest.raises(ValueError, match=r"nulls.parquet: embedding rows have different lengths \[2\] or are null"):
        read_byo(str(nulls))
    holes = tmp_path / "holes.parquet"  # a missing value inside a vector becomes NaN: the image is reported
    pq.write_table(pa.table({"image_id": [1, 2], "embedding": [[1.0, None], [0.0, 1.0]]}), holes)
    assert np.isnan(read_byo(str(holes))[2][0, 1])


@pytest.mark.parametrize("model", ["vae", "contrastive"])
def test_cpu_fp32_embedding_runs_a_frozen_graph_equal_to_the_eager_network(run_dir, model):
    import torch

    from enrich_dist.embed import EncoderEmbedder
    from enrich_dist.encoder import CHECKPOINTS, ContrastiveEncoder

    torch.manual_seed(1)
    net = BetaVAE(latent_dim=16) if model == "vae" else ContrastiveEncoder(latent_dim=16)
    if model == "contrastive":  # running statistics that are not the identity, so the fold matters
        net.train()
        net.backbone(torch.rand(64, 1, 64, 64))
    run_dir.write_bytes(CHECKPOINTS[model], encoder_bytes(net, EncoderConfig(latent_dim=16)))
    images = np.random.default_rng(2).random((13, 64, 64), dtype=np.float32)  # an odd batch, not the traced one
    fast = EncoderEmbedder(run_dir, "cpu", "fp32", model=model)
    assert fast.frozen is not None
    eager = EncoderEmbedder(run_dir, "cpu", "fp32", model=model)
    eager.frozen = None
    got, want = fast(images), eager(images)
    assert got.shape == (13, 16) and np.allclose(got, want, rtol=0, atol=1e-5)
    with torch.inference_mode():
        assert np.allclose(want, net.eval().encode(torch.from_numpy(images))[0].numpy(), rtol=0, atol=1e-5)
