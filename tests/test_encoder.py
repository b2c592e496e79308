"""The beta-VAE: shapes, learning, determinism, checkpoints, embeddings and the train-encoder stage."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from enrich_dist import schema
from enrich_dist.config import EncoderConfig
from enrich_dist.datasets import render_clip
from enrich_dist.encoder import (
    CHECKPOINT,
    RECONSTRUCTIONS,
    TRAIN_STATS,
    BetaVAE,
    embed_images,
    encoder_bytes,
    load_encoder,
    run_train_encoder,
    train_vae,
    vae_loss,
)
from enrich_dist.encoder import train as train_module
from enrich_dist.encoder.train import capacity_schedule, collapse_warning, encoder_quality
from enrich_dist.storage import RunDir, shard_name

TINY = EncoderConfig(
    sample=1.0, epochs=2, beta=4.0, latent_dim=128, batch_size=16, learning_rate=1e-3, seed=0
)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: small models gain nothing from more, and a busy machine makes them spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def discs(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Bright discs of random radius at random positions on a black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        r = rng.uniform(size / 10, size / 4)
        cy, cx = rng.uniform(r, size - r, size=2)
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.6, 1.0)
    return out


def test_forward_backward_shapes_and_finite_loss():
    torch.manual_seed(0)
    model = BetaVAE(latent_dim=10, image_size=64)
    x = torch.from_numpy(discs(5))
    logits, mu, logvar = model(x)
    assert logits.shape == (5, 1, 64, 64)
    assert mu.shape == logvar.shape == (5, 10)
    total, recon, kl = vae_loss(logits, x, mu, logvar, beta=4.0)
    assert all(torch.isfinite(t) for t in (total, recon, kl))
    assert total.item() == pytest.approx(recon.item() + 4.0 * kl.item(), rel=1e-5)
    assert kl.item() >= 0
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.decode(mu).shape == (5, 1, 64, 64)


def test_architecture_follows_burgess():
    model = BetaVAE()
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == len(deconvs) == 4
    assert all(c.out_channels == 32 and c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    linears = [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert linears == [256, 256, 2 * 128]
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [256, 256, 32 * 4 * 4]


def test_bad_image_size_is_rejected():
    with pytest.raises(ValueError, match="power of two"):
        BetaVAE(image_size=48)
    with pytest.raises(ValueError, match=r"\(N, 64, 64\)"):
        train_vae(np.zeros((4, 32, 32), np.float32), TINY)


def test_capacity_objective_drives_kl_to_its_target():
    cfg = dataclasses.replace(TINY, epochs=4, latent_dim=16, objective="capacity", capacity=8.0)
    assert [capacity_schedule(cfg, e) for e in (1, 3, 4)] == [(0.0, 8 / 3), (16 / 3, 8.0), (8.0, 8.0)]
    cfg = dataclasses.replace(cfg, epochs=16, gamma=100.0)
    _, capacity = train_vae(discs(128), cfg)
    _, plain = train_vae(discs(128), dataclasses.replace(cfg, objective="beta", beta=4.0, kl_warmup=0.0))
    # the KL follows the rising target instead of collapsing as the plain beta-VAE at beta 4 does on this data
    assert capacity["train_kl"][0] < 2.0 and 6.0 < np.mean(capacity["train_kl"][-4:]) < 10.0
    assert plain["train_kl"][-1] < 1.0
    # the best model is picked only once the target has stopped rising (epoch 12 of 16)
    assert capacity["best_epoch"] >= 12


def test_kl_warmup_raises_beta_from_zero():
    cfg = dataclasses.replace(TINY, epochs=10, objective="beta", beta=2.0, kl_warmup=0.3)
    weights = [train_module._weight(cfg, p) for p in (0.0, 1.5, 3.0, 7.0)]
    assert weights == [0.0, 1.0, 2.0, 2.0]
    assert train_module._weight(dataclasses.replace(cfg, kl_warmup=0.0), 0.0) == 2.0
    assert train_module._weight(dataclasses.replace(cfg, objective="capacity"), 0.0) == cfg.gamma
    with pytest.raises(ValueError, match="kl_warmup"):
        train_vae(discs(8), dataclasses.replace(cfg, kl_warmup=1.5))


def test_decoder_starts_at_the_mean_image_and_encoder_input_is_standardised():
    images = discs(40, seed=4)
    model = BetaVAE(latent_dim=8, image_size=64)
    model.fit_data_statistics(torch.from_numpy(images))
    assert float(model.input_mean) == pytest.approx(float(images.mean()), rel=1e-5)
    assert float(model.input_std) == pytest.approx(float(images.std()), rel=1e-3)
    with torch.no_grad():
        torch.nn.init.zeros_(model.decoder[-1].weight)  # the network's own output is 0 ...
        torch.nn.init.zeros_(model.decoder[-1].bias)
        out = torch.sigmoid(model.decode(torch.randn(2, 8)))[:, 0].numpy()
    # ... so the decoder gives the per-pixel offset: the mean training image (clamped away from 0 and 1)
    np.testing.assert_allclose(out, np.broadcast_to(images.mean(axis=0).clip(1e-3, 1 - 1e-3), out.shape), atol=1e-6)
    # a constant image gives a finite standardisation (std 1), not a division by zero
    flat = BetaVAE(latent_dim=8, image_size=64)
    flat.fit_data_statistics(torch.full((3, 64, 64), 0.5))
    assert float(flat.input_std) == 1.0 and torch.isfinite(flat.encode(torch.full((2, 64, 64), 0.5))[0]).all()


def test_loss_decreases_on_discs():
    images = discs(64)
    cfg = dataclasses.replace(TINY, epochs=6, latent_dim=16, beta=1.0, objective="beta", kl_warmup=0.0)
    model, history = train_vae(images, cfg)
    assert history["n_train"] == 58 and history["n_val"] == 6
    assert len(history["epoch"]) == 6 and len(history["seconds"]) == 6
    assert history["train_recon"][-1] < history["train_recon"][0]
    assert history["best_epoch"] == 1 + int(np.argmin(history["val_total"]))
    # the decoder starts at the mean image; training takes the reconstruction below it
    train_idx, val_idx = train_module.validation_split(len(images), cfg.seed)
    quality = encoder_quality(model, images[val_idx], images[train_idx].mean(axis=0))
    assert quality["recon_bce"] < quality["mean_image_bce"]


def test_training_is_deterministic():
    images = discs(32, seed=1)
    a, hist_a = train_vae(images, TINY)
    b, hist_b = train_vae(images, TINY)
    c, _ = train_vae(images, dataclasses.replace(TINY, seed=1))
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert hist_a["train_total"] == hist_b["train_total"]
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not torch.are_deterministic_algorithms_enabled()


def test_checkpoint_round_trip_gives_identical_embeddings():
    images = discs(24, seed=2)
    model, _ = train_vae(images, dataclasses.replace(TINY, epochs=1))
    data = encoder_bytes(model, TINY)
    raw = torch.load(io.BytesIO(data), weights_only=True)
    assert raw["config"]["latent_dim"] == 128 and raw["config"]["beta"] == 4.0
    loaded = load_encoder(data)
    np.testing.assert_array_equal(embed_images(model, images), embed_images(loaded, images))
    np.testing.assert_allclose(
        embed_images(loaded, images, batch_size=7), embed_images(model, images), atol=1e-6
    )


def test_format_1_checkpoints_still_load_as_the_network_they_were():
    torch.manual_seed(0)
    old = BetaVAE(latent_dim=8, image_size=64).eval()
    state = {k: v for k, v in old.state_dict().items() if k not in ("input_mean", "input_std", "pixel_bias")}
    buf = io.BytesIO()
    torch.save({"format": 1, "config": {"latent_dim": 8, "image_size": 64}, "state_dict": state}, buf)
    images = discs(6, seed=5)
    np.testing.assert_array_equal(embed_images(load_encoder(buf.getvalue()), images), embed_images(old, images))
    del state["encoder.0.weight"]
    buf = io.BytesIO()
    torch.save({"format": 1, "config": {"latent_dim": 8, "image_size": 64}, "state_dict": state}, buf)
    with pytest.raises(ValueError, match="does not match the encoder network"):
        load_encoder(buf.getvalue())
    # a current checkpoint missing a tensor, or holding one of the wrong shape, is refused the same way
    model = BetaVAE(latent_dim=8, image_size=64)
    for change in ("drop", "reshape"):
        state = dict(model.state_dict())
        if change == "drop":
            del state["pixel_bias"]
        else:
            state["pixel_bias"] = torch.zeros(1, 1, 32, 32)
        buf = io.BytesIO()
        torch.save({"format": 2, "config": {"latent_dim": 8, "image_size": 64}, "state_dict": state}, buf)
        with pytest.raises(ValueError, match="does not match the encoder network"):
            load_encoder(buf.getvalue())


def test_load_encoder_rejects_other_files():
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buf)
    with pytest.raises(ValueError, match="not an enrich_dist encoder checkpoint"):
        load_encoder(buf.getvalue())


def test_embeddings_are_unit_norm_float32():
    torch.manual_seed(0)
    model = BetaVAE()
    emb = embed_images(model, discs(10), batch_size=4)
    assert emb.shape == (10, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_zero_norm_embedding_is_an_error():
    model = BetaVAE(latent_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="3 of 3 embeddings"):
        embed_images(model, discs(3))


def write_archive(tmp_path, n: int) -> RunDir:
    """A run dir whose manifest lists ``n`` disc PNGs, one unreadable file and one status=error row."""
    images = discs(n, size=80, seed=3)
    folder = tmp_path / "archive"
    folder.mkdir()
    uris = []
    for i, img in enumerate(images):
        path = folder / f"img{i:03d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        uris.append(str(path))
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    uris += [str(broken), str(folder / "missing.png")]
    status = ["ok"] * (n + 1) + ["error"]
    rows = {name: [None] * len(uris) for name in schema.MANIFEST.names}
    rows.update(image_id=list(range(len(uris))), uri=uris, status=status)
    run = RunDir(str(tmp_path / "run"))
    run.write_table(
        f"{schema.MANIFEST_DIR}/{shard_name(0)}", pa.Table.from_pydict(rows, schema=schema.MANIFEST)
    )
    return run


def test_run_train_encoder_writes_artifacts_and_skips_when_done(tmp_path, monkeypatch):
    run = write_archive(tmp_path, 24)
    cfg = dataclasses.replace(TINY, epochs=1)
    stats = run_train_encoder(run, cfg)
    assert stats["n_sampled"] == 25 and stats["n_failed"] == 1
    assert stats["n_train"] + stats["n_val"] == 24 and stats["n_val"] == 2
    assert run.is_done("encoder")
    model = load_encoder(run.read_bytes(CHECKPOINT))
    assert model.latent_dim == 128
    info = run.read_json(TRAIN_STATS)
    assert info["config"]["epochs"] == 1 and len(info["history"]["train_total"]) == 1
    assert info["failures"][0]["uri"].endswith("broken.png")
    with Image.open(io.BytesIO(run.read_bytes(RECONSTRUCTIONS))) as grid:
        assert grid.size[1] == 2 * 64 + 6

    def fail(*args, **kwargs):
        raise AssertionError("a done stage must not train again")

    monkeypatch.setattr(train_module, "train_vae", fail)
    assert run_train_encoder(run, cfg) == stats


def test_run_train_encoder_samples_a_seeded_subset(tmp_path):
    run = write_archive(tmp_path, 12)
    ids, uris, _ = train_module.sample_manifest(run, dataclasses.replace(TINY, sample=5))
    again, _, _ = train_module.sample_manifest(run, dataclasses.replace(TINY, sample=5))
    assert len(ids) == 5 and list(ids) == sorted(ids) and np.array_equal(ids, again)
    assert 13 not in ids
    assert all(u.endswith(".png") for u in uris)


def test_run_train_encoder_without_manifest_says_what_to_run(tmp_path):
    run = RunDir(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"run `enrich manifest` first") as err:
        run_train_encoder(run, TINY)
    assert str(tmp_path / "empty") in str(err.value)


def test_train_encoder_runs_as_a_deterministic_ray_task(ray_local, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=1, device="auto")
    for name in "abc":
        (tmp_path / name).mkdir()
    runs = [write_archive(tmp_path / name, 24) for name in "ab"]
    stats = [run_train_encoder(run, cfg) for run in runs]
    assert all(s["ray_task"] and s["device"] == "cpu" for s in stats)
    assert stats[0]["quality"] == stats[1]["quality"] and "collapsed" in stats[0]["quality"]
    a, b = (load_encoder(run.read_bytes(CHECKPOINT)).state_dict() for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = runs[0].read_json(TRAIN_STATS)
    assert len(info["quality"]["kl_per_dim"]) == 128 and len(info["quality"]["mu_variance_per_dim"]) == 128
    with pytest.raises(ValueError, match="no GPUs"):
        run_train_encoder(write_archive(tmp_path / "c", 4), dataclasses.replace(cfg, device="cuda"))


def test_quality_tells_a_collapsed_encoder_from_one_that_learned():
    images = discs(240, size=16, seed=3)  # 16x16: small enough to train to a useful model in seconds
    mean = images[:200].mean(axis=0)
    cfg = dataclasses.replace(TINY, epochs=15, latent_dim=8, image_size=16, objective="beta", beta=1.0, learning_rate=3e-3)
    learned, _ = train_vae(images[:200], cfg)
    good = encoder_quality(learned, images[200:], mean)
    torch.manual_seed(0)
    prior = BetaVAE(latent_dim=8, image_size=16)
    for layer in (prior.encoder[-1], prior.decoder[0]):
        torch.nn.init.zeros_(layer.weight)  # mu = logvar = 0 for every image: the posterior is the prior
        torch.nn.init.zeros_(layer.bias)
    bad = encoder_quality(prior, images[140:], mean)
    assert bad["active_dims"] == 0 and bad["kl_nats"] == pytest.approx(0.0, abs=1e-9) and bad["collapsed"]
    assert collapse_warning(bad) is not None and "collapsed" in collapse_warning(bad)
    assert good["active_dims"] >= 2 and good["recon_to_mean_ratio"] < 0.9 and not good["collapsed"]
    assert good["recon_bce"] < good["mean_image_bce"] <= bad["recon_bce"] + 1e-6
    assert collapse_warning(good) is None


def test_report_shows_the_encoder_check_and_warns_when_collapsed():
    from enrich_dist.report.sections import encoder_quality as report_rows

    quality = {"active_dims": 0, "kl_nats": 0.04, "recon_to_mean_ratio": 1.3, "collapsed": True,
               "mu_variance_per_dim": [0.0] * 128}
    html = "".join(str(part) for part in report_rows(quality))
    assert "0 of 128" in html and "1.30" in html and "Warning: the encoder looks collapsed" in html
    fine = "".join(str(p) for p in report_rows({**quality, "active_dims": 9, "recon_to_mean_ratio": 0.4, "collapsed": False}))
    assert "9 of 128" in fine and "Warning" not in fine
    assert report_rows({}) == []  # train.json from before the check: nothing shown


def test_default_encoder_learns_more_than_the_mean_echo_frame():
    """The shipped defaults (beta 0.1 with KL warm-up, standardised input, mean-image offset) on echo frames.

    The old defaults stayed at the mean image on this archive; this guards the property the report's
    encoder check shows a user: held-out reconstructions beat the mean image, with latents that vary.
    """
    from enrich_dist import imaging
    from enrich_dist.datasets.echo import plan_archive

    frames = []
    for plan in plan_archive(800, seed=0):
        clip, _ = render_clip(plan.patient, plan.clip, plan.n_frames, plan.rng_seed)
        frames += [imaging.preprocess(frame, 64) for frame in clip]
    images = np.stack(frames).astype(np.float32)
    cfg = dataclasses.replace(EncoderConfig(), sample=1.0, epochs=30, device="cpu")
    model, history = train_vae(images, cfg)
    train_idx, val_idx = train_module.validation_split(len(images), cfg.seed)
    quality = encoder_quality(model, images[val_idx], images[train_idx].mean(axis=0))
    assert history["best_epoch"] >= 10  # chosen after the warm-up (30 % of 30 epochs)
    assert quality["recon_bce"] < quality["mean_image_bce"] - 5.0, quality
    # 800 clips, not 400: since frames carry 40 % fresh speckle (unpredictable by any encoder) 400 clips left the
    # held-out MSE at 0.92 of the mean image's (collapsed at 0.9); with 800 it passes.
    assert quality["active_dims"] >= 2 and not quality["collapsed"], quality


def test_encoder_options_reach_the_config():
    from enrich_dist.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train-encoder", "--output", "r", "--objective", "capacity", "--beta", "2", "--kl-warmup", "0.5",
         "--learning-rate", "0.003", "--capacity", "30", "--epochs", "7"]
    )
    cfg = config_from_args(args).encoder
    assert (cfg.objective, cfg.beta, cfg.kl_warmup, cfg.learning_rate, cfg.capacity, cfg.epochs) == (
        "capacity", 2.0, 0.5, 0.003, 30.0, 7
    )
    defaults = config_from_args(build_parser().parse_args(["train-encoder", "--output", "r"])).encoder
    assert (defaults.objective, defaults.beta, defaults.kl_warmup, defaults.learning_rate) == ("beta", 0.1, 0.3, 1e-3)
