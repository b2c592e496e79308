"""The contrastive encoder: views, loss, learning the invariance, determinism, checkpoints and the stage."""

from __future__ import annotations

import dataclasses
import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from enrich_dist.config import EmbedConfig, EncoderConfig, ManifestConfig
from enrich_dist.embed import run_embed
from enrich_dist.encoder import (
    CONTRASTIVE_CHECKPOINT,
    TRAIN_STATS,
    VIEWS,
    ContrastiveEncoder,
    embed_images,
    encoder_bytes,
    load_encoder,
    run_train_encoder,
    train_contrastive,
    train_encoder_model,
)
from enrich_dist.encoder.contrastive import augment, nt_xent
from enrich_dist.encoder.train import collapse_warning, contrastive_quality
from enrich_dist.manifest import run_manifest
from enrich_dist.schema import EMBEDDINGS_DIR
from enrich_dist.storage import RunDir

TINY = EncoderConfig(sample=1.0, epochs=2, latent_dim=32, contrastive_batch_size=32, learning_rate=1e-3, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapes(n: int, seed: int = 0) -> np.ndarray:
    """Distinct sources: a few bright rectangles and discs at random places on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    out = np.zeros((n, 64, 64), np.float32)
    for i in range(n):
        for _ in range(3):
            cy, cx, r = rng.uniform(12, 52), rng.uniform(12, 52), rng.uniform(4, 10)
            if rng.random() < 0.5:
                out[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.4, 1.0)
            else:
                out[i][int(cy - r) : int(cy + r), int(cx - r / 2) : int(cx + r / 2)] = rng.uniform(0.4, 1.0)
    return out


def jittered_clips(n_sources: int, frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sources that share one large template and differ by three small dots; each frame moved by up to 3 px,
    turned up to 4 degrees, regained and noised, so that pose, not source, dominates the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    base = np.zeros((64, 64), np.float32)
    base[(yy - 32) ** 2 + (xx - 32) ** 2 <= 22**2] = 0.3
    base[(yy - 32) ** 2 + (xx - 32) ** 2 <= 12**2] = 0.05
    src = np.repeat(base[None], n_sources, 0)
    for i in range(n_sources):
        for _ in range(3):
            cy, cx, r = rng.uniform(14, 50), rng.uniform(14, 50), rng.uniform(2, 4)
            src[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.6, 1.0)
    out, clip = [], []
    for i in range(n_sources):
        for _ in range(frames):
            a = math.radians(rng.uniform(-4, 4))
            dx, dy = rng.uniform(-3, 3, 2) / 32
            theta = torch.tensor([[[math.cos(a), -math.sin(a), dx], [math.sin(a), math.cos(a), dy]]], dtype=torch.float32)
            grid = F.affine_grid(theta, [1, 1, 64, 64], align_corners=False)
            x = F.grid_sample(torch.from_numpy(src[i])[None, None], grid, align_corners=False)[0, 0]
            x = (x * rng.uniform(0.85, 1.15) + torch.from_numpy(rng.normal(0, 0.05, (64, 64))).float()).clamp(0, 1)
            out.append(x.numpy())
            clip.append(i)
    return np.stack(out).astype(np.float32), np.asarray(clip)


def recall_at_1(embeddings: np.ndarray, clip: np.ndarray) -> float:
    """Brute force: share of images whose most similar other image (cosine) is of their own clip."""
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(clip[np.argmax(sims, axis=1)] == clip))


def test_views_are_seeded_bounded_and_differ_from_the_image():
    x = torch.from_numpy(shapes(6))
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # a view changes the pixels but keeps the image: closer to its own source than to the others
    flat = F.normalize((a - a.mean((1, 2), keepdim=True)).reshape(6, -1), dim=1)
    src = F.normalize((x - x.mean((1, 2), keepdim=True)).reshape(6, -1), dim=1)
    assert not torch.allclose(a, x, atol=1e-3)
    assert torch.equal((flat @ src.T).argmax(dim=1), torch.arange(6))


def test_nt_xent_equals_its_definition():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    z = torch.cat([z1, z2])
    t = 0.3
    expected = 0.0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        expected += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(math.exp(float(z[i] @ z[k]) / t) for k in others))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(expected / 10, rel=1e-5)


def test_training_makes_frames_of_a_clip_find_each_other():
    """On jittered clips the trained encoder's nearest neighbors are siblings far more often than untrained."""
    images, clip = jittered_clips(60, 4)
    cfg = dataclasses.replace(TINY, epochs=12, contrastive_batch_size=64, latent_dim=64)
    torch.manual_seed(cfg.seed)
    untrained = ContrastiveEncoder(cfg.latent_dim)
    untrained.fit_data_statistics(torch.from_numpy(images))
    model, history = train_contrastive(images, cfg)
    before = recall_at_1(embed_images(untrained, images), clip)
    after = recall_at_1(embed_images(model, images), clip)
    # measured: 0.64 untrained, 0.95 trained (pixels 16x16: 0.75)
    assert after >= before + 0.15 and after >= 0.85, (before, after)
    assert history["train_loss"][-1] < history["train_loss"][0]
    quality = contrastive_quality(model, images[:40])
    assert not quality["collapsed"] and quality["view_retrieval"] > quality["untrained_view_retrieval"]
    assert collapse_warning(quality) is None


def test_cpu_training_is_deterministic_for_a_seed():
    images = shapes(40)
    a, _ = train_encoder_model(images, TINY, model="contrastive")
    b, _ = train_encoder_model(images, TINY, model="contrastive")
    c, _ = train_encoder_model(images, dataclasses.replace(TINY, seed=1), model="contrastive")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights():
    """A state saved after epoch 2 of 4, passed back, ends where an uninterrupted run ends, bit for bit."""
    images, cfg = shapes(40), dataclasses.replace(TINY, epochs=4)
    whole, whole_history = train_contrastive(images, cfg)
    saved = []

    def stop_after_two(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as the stage persists it
        saved.append(buffer.getvalue())
        if state["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_contrastive(images, cfg, on_epoch=stop_after_two)
    state = torch.load(io.BytesIO(saved[-1]), weights_only=True)
    resumed, history = train_contrastive(images, cfg, resume=state)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history["epoch"] == [1, 2, 3, 4] and history["train_loss"] == whole_history["train_loss"]


def test_stage_resumes_an_interrupted_training(ray_local, tmp_path, monkeypatch):
    """train-encoder killed after epoch 2 continues from its saved state; a state of other settings is ignored."""
    from enrich_dist.encoder import contrastive, train

    folder = tmp_path / "archive"
    folder.mkdir()
    for i, image in enumerate(shapes(24, seed=3)):
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    cfg = dataclasses.replace(TINY, epochs=4)
    runs = {}
    for name in ("whole", "cut", "other"):
        runs[name] = RunDir(str(tmp_path / name))
        run_manifest(runs[name], str(folder), ManifestConfig(shard_size=10))
    run_train_encoder(runs["whole"], cfg, use_ray=False, model="contrastive")

    real_epoch, calls = contrastive.train_epoch, []

    def dies_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(contrastive, "train_epoch", dies_in_third_epoch)
    with pytest.raises(Interrupted):
        run_train_encoder(runs["cut"], cfg, use_ray=False, model="contrastive")
    assert runs["cut"].exists(train.TRAIN_STATE) and not runs["cut"].is_done("encoder")
    monkeypatch.setattr(contrastive, "train_epoch", real_epoch)
    run_train_encoder(runs["cut"], cfg, use_ray=False, model="contrastive")
    assert runs["cut"].read_bytes(CONTRASTIVE_CHECKPOINT) == runs["whole"].read_bytes(CONTRASTIVE_CHECKPOINT)
    assert not runs["cut"].exists(train.TRAIN_STATE)
    assert runs["cut"].read_json(TRAIN_STATS)["history"]["epoch"] == [1, 2, 3, 4]
    # a state left by other settings (or a damaged one) is not used: training starts over, same result
    runs["other"].write_bytes(train.TRAIN_STATE, runs["whole"].read_bytes(CONTRASTIVE_CHECKPOINT)[:100])
    run_train_encoder(runs["other"], cfg, use_ray=False, model="contrastive")
    assert runs["other"].read_bytes(CONTRASTIVE_CHECKPOINT) == runs["whole"].read_bytes(CONTRASTIVE_CHECKPOINT)


def test_clip_partners_equal_brute_force():
    """Partners: other images of the same clip at most ``window`` frames away; none without clip or frame."""
    from enrich_dist.encoder.contrastive import clip_partners

    rng = np.random.default_rng(4)
    clip_ids = np.array(rng.choice(["a", "b", "c", None], 61).tolist() + [float("nan"), "solo"], dtype=object)
    frames = np.array([int(f) for f in rng.integers(0, 9, 61)] + [3, 0], dtype=object)
    frames[5] = None
    for window in (1, 2, 5):
        got = clip_partners(clip_ids, frames, window)
        for i in range(len(clip_ids)):
            expected = sorted(
                j for j in range(len(clip_ids))
                if j != i and isinstance(clip_ids[i], str) and clip_ids[j] == clip_ids[i]
                and frames[i] is not None and frames[j] is not None and abs(frames[j] - frames[i]) <= window
            )
            assert got[i, : len(expected)].tolist() == expected
            assert (got[i, len(expected) :] == i).all()  # padded with itself
    assert clip_partners(np.array([None, None], dtype=object), np.array([0, 1], dtype=object), 2).tolist() == [[0], [1]]


def test_clip_positives_pair_frames_of_one_clip(monkeypatch):
    """With clip_positives 1 every second view of an image that has a partner comes from a nearby frame of its clip."""
    from enrich_dist.encoder import contrastive

    images = shapes(12)
    clip_ids = np.array(["p", "p", "q", "q", "q", "r", "s", "s", "s", None, "t", "t"], dtype=object)
    frames = np.array([0, 1, 0, 1, 9, 0, 4, 6, 5, 0, 2, None], dtype=object)
    # window 1: p0-p1, q0-q1 (q9 too far), s4-s5-s6 chain by distance (4-6 is 2 apart), None clip or frame: none
    partners = {0: [1], 1: [0], 2: [3], 3: [2], 6: [8], 7: [8], 8: [6, 7]}
    seen = []
    real_augment = contrastive.augment

    def record(batch, gen):
        seen.append(batch.clone())
        return real_augment(batch, gen)

    monkeypatch.setattr(contrastive, "augment", record)
    cfg = dataclasses.replace(TINY, epochs=10, contrastive_batch_size=12, clip_positives=1.0, clip_window=1)
    train_contrastive(images, cfg, clips=(clip_ids, frames))
    picked = {i: set() for i in range(12)}
    for first, second in zip(seen[0::2], seen[1::2], strict=True):
        for row in range(len(first)):
            (i,) = [j for j in range(12) if torch.equal(first[row], torch.from_numpy(images[j]))]
            (k,) = [j for j in range(12) if torch.equal(second[row], torch.from_numpy(images[j]))]
            picked[i].add(k)
    for i in range(12):
        assert picked[i] <= set(partners.get(i, [i])), (i, picked[i])
    assert picked[8] == {6, 7}  # both partners drawn over 10 epochs (seeded)
    with pytest.raises(ValueError, match="clip_positives is a share between 0 and 1"):
        train_contrastive(images, dataclasses.replace(cfg, clip_positives=1.5), clips=(clip_ids, frames))


def test_stage_uses_clip_positives_from_the_manifest(ray_local, tmp_path):
    """train-encoder reads clip ids and frames from the manifest for clip positives, and says how many had a partner."""
    from enrich_dist.datasets import make_echo_archive

    make_echo_archive(str(tmp_path / "archive"), 40, seed=2, workers=1, progress=False)
    run = RunDir(str(tmp_path / "run"))
    run_manifest(run, str(tmp_path / "archive" / "manifest.csv"), ManifestConfig())
    run_train_encoder(run, dataclasses.replace(TINY, clip_positives=0.5), use_ray=False, model="contrastive")
    history = run.read_json(TRAIN_STATS)["history"]
    n_train = run.read_json(TRAIN_STATS)["n_train"]
    assert history["clip_positives"] == 0.5 and 0 < history["n_with_clip_partner"] <= n_train


def test_folded_encoder_embeds_the_same():
    """BatchNorm folded into the convolutions (the embed stage's copy) gives the same embedding."""
    model, _ = train_contrastive(shapes(40), dataclasses.replace(TINY, epochs=1))
    folded = model.folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone)  # the original is untouched
    np.testing.assert_allclose(embed_images(folded, shapes(9, 4)), embed_images(model, shapes(9, 4)), atol=1e-5)


def test_a_collapsed_encoder_is_called_so():
    model = ContrastiveEncoder(16)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.zero_()
        model.backbone[-1].bias.fill_(1.0)  # every image maps to the same vector
    quality = contrastive_quality(model, shapes(20))
    assert quality["collapsed"] and quality["mean_pairwise_cosine"] > 0.99
    assert "contrastive encoder looks collapsed" in collapse_warning(quality)


def test_checkpoint_round_trip_and_refusals():
    model, _ = train_contrastive(shapes(20), dataclasses.replace(TINY, epochs=1))
    data = encoder_bytes(model, TINY)
    loaded = load_encoder(data, name=CONTRASTIVE_CHECKPOINT)
    assert isinstance(loaded, ContrastiveEncoder)
    np.testing.assert_array_equal(embed_images(loaded, shapes(5, 9)), embed_images(model, shapes(5, 9)))
    # a damaged checkpoint: refused with the file and the fix
    with pytest.raises(ValueError, match=r"encoder/contrastive.pt is not a loadable .*train-encoder"):
        load_encoder(data[: len(data) // 2], name=CONTRASTIVE_CHECKPOINT)
    # one that carries code: refused by weights_only loading
    buf = io.BytesIO()
    torch.save({"format": 2, "config": {"model": "contrastive"}, "payload": pickle.loads}, buf)
    with pytest.raises(ValueError, match=r"not a loadable encoder checkpoint"):
        load_encoder(buf.getvalue(), name=CONTRASTIVE_CHECKPOINT)
    # one whose tensors do not fit the network
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    del ckpt["state_dict"]["backbone.0.weight"]
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with pytest.raises(ValueError, match=r"does not match the encoder network"):
        load_encoder(buf.getvalue(), name=CONTRASTIVE_CHECKPOINT)
    ckpt["config"]["model"] = "resnet"
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with pytest.raises(ValueError, match=r"unknown encoder model 'resnet'"):
        load_encoder(buf.getvalue(), name=CONTRASTIVE_CHECKPOINT)


def test_stage_trains_embeds_and_refuses_to_mix_encoders(ray_local, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    for i, image in enumerate(shapes(24, seed=5)):
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    run = RunDir(str(tmp_path / "run"))
    run_manifest(run, str(folder), ManifestConfig(shard_size=10))
    stats = run_train_encoder(run, TINY, model="contrastive")
    assert stats["model"] == "contrastive" and stats["ray_task"] and stats["n_train"] + stats["n_val"] == 24
    assert run.exists(CONTRASTIVE_CHECKPOINT) and not run.exists("encoder/vae.pt")
    info = run.read_json(TRAIN_STATS)
    assert info["model"] == "contrastive" and len(info["history"]["train_loss"]) == 2
    assert {"view_retrieval", "effective_rank", "mean_pairwise_cosine", "collapsed"} <= set(info["quality"])
    with Image.open(io.BytesIO(run.read_bytes(VIEWS))) as grid:
        assert grid.size[1] == 2 * 64 + 6
    with pytest.raises(ValueError, match=r"holds a trained contrastive encoder, this run asks for vae"):
        run_train_encoder(run, TINY, model="vae")
    with pytest.raises(ValueError, match=r"holds a trained contrastive encoder, not vae"):
        run_embed(run, EmbedConfig(embedder="vae"))
    done = run_embed(run, EmbedConfig(embedder="contrastive", batch_size=8))
    assert done["n_embedded"] == 24 and done["embedder"] == "contrastive"
    vectors = np.stack(run.read_table(EMBEDDINGS_DIR).column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (24, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_report_shows_the_contrastive_encoder(tmp_path):
    """The report's encoder section names the encoder, plots its curves, shows its check and its views picture."""
    from enrich_dist.report.page import ReportPage
    from enrich_dist.report.sections import encoder as encoder_section
    from enrich_dist.report.sections import encoder_quality as report_rows

    run = RunDir(str(tmp_path / "run"))
    images = shapes(30)
    model, history = train_contrastive(images, TINY)
    quality = contrastive_quality(model, images[:10])
    run.write_json(TRAIN_STATS, {"model": "contrastive", "config": dataclasses.asdict(TINY), "quality": quality,
                                 "history": history})
    from enrich_dist.encoder.train import views_grid

    run.write_bytes(VIEWS, views_grid(images[:4]))
    page = ReportPage(run)
    html = "".join(str(part) for part in encoder_section(page))
    assert "contrastive encoder" in html and "held-out view retrieval" in html and "not found" not in html
    assert page.figures == ["encoder_loss.png", "views.png"]
    collapsed = {**quality, "collapsed": True}
    assert "Warning: the contrastive encoder looks collapsed" in "".join(str(p) for p in report_rows(collapsed))
