"""Evaluation: metrics and statistics against brute force, subsets from training images only, real
models on tiny data, and the stage end to end on the shared local Ray (resumable, one file per model)."""

from __future__ import annotations

import io
import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image
from scipy.stats import mannwhitneyu

from enrich_dist import schema
from enrich_dist.config import EvaluateConfig, RunConfig
from enrich_dist.evaluation import run_evaluate
from enrich_dist.evaluation.data import (
    budget_counts,
    leaking_groups,
    load_pair,
    make_split,
    prefix_subset,
    ranking_rows,
    read_mask,
)
from enrich_dist.evaluation.metrics import auc, binary_auc, jaccard_counts, mean_jaccard
from enrich_dist.evaluation.models import ResNet18, UNet, build_model
from enrich_dist.evaluation.plan import Job
from enrich_dist.evaluation.stage import resolve_model
from enrich_dist.evaluation.stats import labelling_time, mean_std, min_p_value, summarize
from enrich_dist.evaluation.tasks import task_options
from enrich_dist.evaluation.train import TrainSpec, train_classifier, train_segmenter
from enrich_dist.storage import RunDir

SIDE = 24
PATIENTS = 10
FRAMES = 4
TEST_PATIENTS = ("p8", "p9")


# ---------------------------------------------------------------- metrics and statistics


def _brute_auc(positive: np.ndarray, score: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n", [2, 3, 17, 64])
def test_binary_auc_matches_pairwise_count_with_ties(n: int) -> None:
    rng = np.random.default_rng(n)
    positive = np.arange(n) % 2 == 0
    score = rng.integers(0, 4, n).astype(float)  # many ties
    assert binary_auc(positive, score) == pytest.approx(_brute_auc(positive, score))
    assert np.isnan(binary_auc(np.ones(n, bool), score))


def test_multiclass_auc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    proba = rng.dirichlet(np.ones(3), size=len(y))
    expected = np.mean([_brute_auc(y == k, proba[:, k]) for k in range(3)])
    assert auc(y, proba) == pytest.approx(expected)
    perfect = np.eye(2)[[0, 1, 1, 0]]
    assert auc(np.array([0, 1, 1, 0]), perfect) == 1.0


def test_jaccard_pools_over_images_and_skips_absent_classes() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=(3, 5, 5))
    pred = truth.copy()
    pred[0, 0, :] = 2
    inter, union = jaccard_counts(pred, truth, 5)
    for k in range(5):
        assert inter[k] == np.sum((pred == k) & (truth == k)) and union[k] == np.sum(
            (pred == k) | (truth == k)
        )
    expected = np.mean([inter[k] / union[k] for k in (1, 2)])  # classes 3, 4 appear nowhere
    assert mean_jaccard(inter, union) == pytest.approx(expected)
    assert np.isnan(mean_jaccard(*jaccard_counts(np.zeros(4, int), np.zeros(4, int), 3)))


def test_mann_whitney_and_smallest_p() -> None:
    assert min_p_value(3, 3) == pytest.approx(mannwhitneyu([1, 2, 3], [4, 5, 6]).pvalue)
    assert min_p_value(10, 10) == pytest.approx(mannwhitneyu(range(10), range(10, 20)).pvalue)
    assert mean_std([1.0, float("nan"), 3.0]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def _rows(values: dict[tuple[str, float], list[float]], n_full: int = 100) -> list[dict]:
    return [
        {
            "method": m,
            "budget": b,
            "replicate": r,
            "n_train": n_full if m == "full" else int(b * n_full),
            "metric": v,
        }
        for (m, b), vs in values.items()
        for r, v in enumerate(vs)
    ]


def test_summary_finds_the_smallest_budget_matching_the_full_set() -> None:
    full = [0.95, 0.96, 0.97, 0.95, 0.96, 0.97]
    low = [0.5, 0.51, 0.52, 0.53, 0.54, 0.55]
    values = {
        ("full", 1.0): full,
        ("enrich", 0.2): low,
        ("enrich", 0.4): [0.955, 0.96, 0.965, 0.95, 0.96, 0.97],  # indistinguishable
        ("enrich", 0.6): [0.96] * 6,
        ("random", 0.2): low,
        ("random", 0.4): [0.955, 0.96, 0.965, 0.95, 0.96, 0.97],  # looks fine by chance
        ("random", 0.6): [0.6, 0.61, 0.62, 0.63, 0.64, 0.65],  # but a larger budget is worse
    }
    s = summarize(_rows(values), alpha=0.05, seconds_per_image=300.0)
    assert s["replicates"] == 6 and s["full"]["n_train"] == 100
    enrich, random = (
        s["smallest_budget_matching_full"]["enrich"],
        s["smallest_budget_matching_full"]["random"],
    )
    assert enrich["budget"] == 0.4 and enrich["n_train"] == 40
    assert random is None  # 0.6 differs from the full set, so no budget from which on all match
    by_budget = {e["budget"]: e for e in s["budgets"]}
    assert by_budget[0.2]["p_enrich_vs_full"] < 0.05 and not by_budget[0.2]["enrich_matches_full"]
    assert by_budget[0.6]["p_enrich_vs_random"] < 0.05
    assert s["labelling"]["enrich"] == {"budget": 0.4, "images_saved": 60, "seconds_saved": 60 * 300.0}
    assert s["labelling"]["random"] is None and s["labelling"]["full_seconds"] == 100 * 300.0
    saved = {e["budget"]: e["seconds"] for e in s["labelling"]["saved_seconds_per_budget"]}
    assert saved == {0.2: 80 * 300.0, 0.4: 60 * 300.0, 0.6: 40 * 300.0}


def test_labelling_time_without_full_models() -> None:
    assert labelling_time({"enrich": None}, [], None, 1.0)["full_seconds"] is None


# ---------------------------------------------------------------- split, budgets, subsets


def test_made_split_is_group_disjoint_seeded_and_never_empty() -> None:
    groups = np.array([f"p{i % 7}" for i in range(50)], dtype=object)
    is_test = make_split(groups, 0.2, seed=3)
    assert leaking_groups(groups, is_test) == 0 and 0 < is_test.sum() < len(groups)
    assert np.array_equal(is_test, make_split(groups, 0.2, seed=3))
    assert make_split(np.array(["a", "b"], dtype=object), 0.9, 0).sum() == 1  # never all groups
    with pytest.raises(ValueError, match="at least two"):
        make_split(np.array(["a", "a"], dtype=object), 0.2, 0)
    assert leaking_groups(groups, np.arange(50) < 3) == 3  # rows 0-2 are p0-p2, which also have train rows


def test_budget_counts_and_prefix_subsets() -> None:
    assert budget_counts([0.1, 0.5, 1.0, 0.52], 10) == [
        (0.1, 1),
        (0.5, 5),
    ]  # 0.52 rounds to 5 too; 1.0 is the full set
    assert budget_counts([3], 10) == [(0.3, 3)]
    order = np.array([5, 0, 3, 1, 4, 2])
    eligible = np.array([True, False, True, True, False, True])
    assert prefix_subset(order, eligible, 3).tolist() == [5, 0, 3]
    assert prefix_subset(order, eligible, 10).tolist() == [5, 0, 3, 2]
    ranking = pa.table(
        {"replicate": [1, 0, 0, 1, 0], "rank": [0, 1, 0, 1, 2], "image_id": [7, 10, 30, 3, 99]}
    )
    assert ranking_rows(ranking, 0, np.array([3, 7, 10, 30])).tolist() == [3, 2]  # id 99 is not an ok image


def test_masks_follow_the_image_crop_and_resize(tmp_path: Path) -> None:
    img = np.zeros((30, 40), np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    img[5:25, 10:30] = 200  # content box: the crop keeps only this square
    mask[5:15, 10:20] = 1
    mask[15:25, 20:30] = 3
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    x, m = load_pair(str(tmp_path / "i.png"), str(tmp_path / "m.png"), 8)
    assert x.shape == m.shape == (8, 8) and set(np.unique(m)) == {0, 1, 3}
    assert (m[:4, :4] == 1).all() and (m[4:, 4:] == 3).all() and (x > 0.7).all()
    Image.fromarray(mask[:20]).save(tmp_path / "short.png")
    with pytest.raises(ValueError, match="is 40x20, image is 40x30"):
        load_pair(str(tmp_path / "i.png"), str(tmp_path / "short.png"), 8)
    buf = io.BytesIO()
    np.save(buf, np.full((2, 2), -1))
    with pytest.raises(ValueError, match="non-negative integer"):
        read_mask(buf.getvalue(), "m.npy")


# ---------------------------------------------------------------- models


def test_resnet18_and_unet_shapes() -> None:
    net = ResNet18(n_classes=3, width=8)
    assert net(torch.zeros(2, 1, 80, 80)).shape == (2, 3)
    assert (
        sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 1 + 16 + 3
    )  # stem, 8 blocks, 3 projections
    unet = UNet(n_classes=5, width=4)
    assert unet(torch.zeros(2, 1, 32, 32)).shape == (2, 5, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        unet(torch.zeros(1, 1, 20, 20))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vit", 2, 32)


def _shapes(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright disks (class 0) or bars (class 1) on noise, as uint8 images, labels and masks (1 disk, 2 bar)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images = np.zeros((n, side, side), np.uint8)
    masks = np.zeros((n, side, side), np.uint8)
    labels = np.arange(n) % 2
    for i in range(n):
        cy, cx = rng.integers(side // 3, 2 * side // 3, 2)
        if labels[i] == 0:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 5) ** 2
        else:
            shape = (np.abs(yy - cy) < side // 10) & (np.abs(xx - cx) < side // 3)
        masks[i][shape] = 1 + labels[i]
        images[i] = np.clip(rng.normal(40, 15, (side, side)) + 160 * shape, 0, 255)
    return images, labels, masks


@pytest.fixture
def one_thread():
    """Single-threaded torch, as inside a Ray task (and much faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model,size,width", [("linear", 24, None), ("cnn", 24, 4), ("resnet", 32, 8)])
def test_classifiers_learn_and_are_seeded(model: str, size: int, width: int | None, one_thread) -> None:
    x, y, _ = _shapes(48, size, seed=0)
    xt, yt, _ = _shapes(24, size, seed=1)
    spec = TrainSpec(model=model, image_size=size, width=width, epochs=1, min_steps=40, batch_size=16, seed=5)
    first = train_classifier(x, y, xt, yt, 2, spec)
    assert first == train_classifier(x, y, xt, yt, 2, spec)
    assert first > 0.8


def test_unet_learns_and_is_seeded(one_thread) -> None:
    x, _, m = _shapes(32, 16, seed=0)
    xt, _, mt = _shapes(8, 16, seed=1)
    spec = TrainSpec(
        model="unet", image_size=16, width=4, epochs=1, min_steps=20, batch_size=8, learning_rate=1e-2, seed=2
    )
    first = train_segmenter(x, m, xt, mt, 3, spec)
    assert first == train_segmenter(x, m, xt, mt, 3, spec)
    assert 0.2 < first <= 1.0


def test_model_choice_and_gpu_requests() -> None:
    cfg = EvaluateConfig()
    assert resolve_model(cfg, gpus=0) == "cnn" and resolve_model(cfg, gpus=2) == "resnet"
    assert resolve_model(EvaluateConfig(task="segmentation"), gpus=0) == "unet"
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        resolve_model(EvaluateConfig(task="segmentation", model="cnn"), gpus=0)
    assert task_options(gpus=0, gpu_fraction=0.25) == {}  # never ask for GPUs the cluster lacks
    assert task_options(gpus=1, gpu_fraction=0.25) == {"num_gpus": 0.25}
    with pytest.raises(ValueError, match="gpu_fraction"):
        task_options(gpus=1, gpu_fraction=2)


def test_config_section_round_trips() -> None:
    cfg = RunConfig.from_dict({"evaluate": {"task": "segmentation", "budgets": [0.1, 0.5], "replicates": 3}})
    assert cfg.evaluate.budgets == (0.1, 0.5) and cfg.evaluate.replicates == 3
    assert RunConfig.from_dict(cfg.to_dict()).evaluate == cfg.evaluate
    with pytest.raises(ValueError, match="unknown key .epoch.*did you mean .epochs."):
        RunConfig.from_dict({"evaluate": {"epoch": 3}})


# ---------------------------------------------------------------- the stage


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_run(root: Path, split: bool = True, labels: bool = True, replicates: int = 2) -> RunDir:
    """Manifest, rankings and selection stats of a tiny two-class archive (frames of patients p0..p9)."""
    run = RunDir(str(root / "run"))
    images, y, masks = _shapes(PATIENTS * FRAMES, SIDE, seed=7)
    rows = []
    (root / "img").mkdir(parents=True)
    for i in range(len(images)):
        patient = f"p{i // FRAMES}"
        uri, mask_uri = str(root / "img" / f"{i:03d}.png"), str(root / "img" / f"{i:03d}_mask.png")
        Path(uri).write_bytes(_png(images[i]))
        Path(mask_uri).write_bytes(_png(masks[i]))
        rows.append(
            {
                "image_id": i,
                "uri": uri,
                "patient_id": patient,
                "clip_id": f"{patient}-c{i % 2}",
                "frame": i % FRAMES,
                "label": ("disk", "bar")[y[i]] if labels else None,
                "split": ("test" if patient in TEST_PATIENTS else "train") if split else None,
                "mask_uri": mask_uri,
                "status": "ok",
                "error": None,
            }
        )
    rows.append(
        {**rows[0], "image_id": len(rows), "uri": str(root / "gone.png"), "status": "error", "error": "x"}
    )
    run.write_table("manifest/part-00000.parquet", pa.Table.from_pylist(rows, schema=schema.MANIFEST))
    run.mark_done("manifest", {"n_images": len(rows)})
    n = len(images)
    for name, offset in (("ranking", 0), ("random_ranking", 100)):
        parts = []
        for r in range(replicates):
            order = np.random.default_rng(offset + r).permutation(n)
            parts.append(
                pa.table(
                    {
                        "replicate": pa.array(np.full(n, r, np.int32)),
                        "rank": pa.array(np.arange(n, dtype=np.int64)),
                        "image_id": pa.array(order.astype(np.int64)),
                        "is_seed": pa.array(np.arange(n) < 2),
                        "round": pa.array(np.zeros(n, np.int32)),
                        "score": pa.array(np.zeros(n, np.float32)),
                    },
                    schema=schema.RANKING,
                )
            )
        run.write_table(f"selection/{name}.parquet", pa.concat_tables(parts))
    run.write_json("selection/selection.json", {"budgets": [{"budget": b} for b in (0.25, 0.5, 1.0)]})
    run.mark_done("selection", {})
    return run


def _fast(**kw) -> EvaluateConfig:
    return EvaluateConfig(**{"model": "linear", "image_size": SIDE, "epochs": 1, "min_steps": 5, **kw})


def _mtimes(folder: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_stage_trains_the_grid_on_training_images_and_resumes(ray_local, tmp_path: Path, caplog) -> None:
    run = _tiny_run(tmp_path)
    caplog.set_level(logging.INFO, logger="enrich_dist.evaluation")
    stats = run_evaluate(run, _fast())
    n_train = (PATIENTS - len(TEST_PATIENTS)) * FRAMES
    results = run.read_table(schema.EVALUATION_RESULTS)
    assert results.num_rows == 2 * 2 * 2 + 2  # (enrich, random) x budgets (0.25, 0.5) x 2 replicates + 2 full
    assert results.schema == schema.RESULT
    assert set(results["method"].to_pylist()) == {"enrich", "random", "full"}
    assert sorted(set(zip(results["budget"].to_pylist(), results["n_train"].to_pylist(), strict=True))) == [
        (0.25, 8),
        (0.5, 16),
        (1.0, n_train),
    ]
    assert set(results["n_test"].to_pylist()) == {len(TEST_PATIENTS) * FRAMES}
    assert pc.all(pc.greater(results["metric"], 0.5)).as_py()
    names = sorted(os.listdir(run.path("evaluation/runs")))
    assert names[0] == "classification-enrich-b0.250000-r000.parquet" and len(names) == 10
    saved = run.read_json(schema.EVALUATION_STATS)["classification"]
    assert saved["n_train"] == n_train and saved["split"]["source"] == "manifest"
    assert saved["min_p_value"] == pytest.approx(1 / 3) and saved["labelling"]["seconds_per_image"] == 1.0
    assert [e["budget"] for e in saved["budgets"]] == [0.25, 0.5]
    assert stats["models_trained"] == 10 and run.is_done("evaluation")
    assert not run.exists("evaluation/split.parquet")

    # a rerun trains nothing and rewrites nothing
    before = _mtimes(run.path("evaluation")) | _mtimes(run.path("evaluation/runs"))
    caplog.clear()
    assert run_evaluate(run, _fast())["models_reused"] == 10
    assert "already complete" in caplog.text
    assert _mtimes(run.path("evaluation")) | _mtimes(run.path("evaluation/runs")) == before

    # a lost result file (and no _SUCCESS) retrains only that model
    os.remove(run.path("evaluation/runs/classification-random-b0.500000-r001.parquet"))
    run.clear_done("evaluation")
    again = run_evaluate(run, _fast())
    assert again["models_trained"] == 1 and again["models_reused"] == 9
    kept = {k: v for k, v in _mtimes(run.path("evaluation/runs")).items() if "random-b0.500000-r001" not in k}
    assert kept == {k: v for k, v in before.items() if k in kept}

    # another setting retrains everything under the same names
    assert run_evaluate(run, _fast(epochs=2))["models_trained"] == 10


def test_stage_makes_a_patient_disjoint_split_when_the_manifest_has_none(ray_local, tmp_path: Path) -> None:
    run = _tiny_run(tmp_path, split=False, replicates=1)
    stats = run_evaluate(run, _fast(budgets=(0.5,), test_fraction=0.3))
    split = run.read_table("evaluation/split.parquet").to_pandas()
    assert set(split["split"]) == {"train", "test"}
    by_group = split.groupby("group")["split"].nunique()
    assert (by_group == 1).all() and set(split["group"]) == {f"p{i}" for i in range(PATIENTS)}
    assert stats["split"] == {
        "source": "evaluation/split.parquet",
        "group_by": "patient_id",
        "test_fraction": 0.3,
        "leaking_groups": 0,
    }
    assert stats["n_test"] == (split["split"] == "test").sum() == 3 * FRAMES
    assert run.read_table(schema.EVALUATION_RESULTS).num_rows == 3


def test_segmentation_runs_beside_classification(ray_local, tmp_path: Path) -> None:
    run = _tiny_run(tmp_path, replicates=1)
    run_evaluate(run, _fast(budgets=(0.5,)))
    cfg = EvaluateConfig(
        task="segmentation", image_size=16, width=4, epochs=1, min_steps=10, batch_size=8, budgets=(0.5,)
    )
    stats = run_evaluate(run, cfg)
    assert stats["model"] == "unet" and stats["metric"] == "mean_jaccard"
    assert stats["labelling"]["seconds_per_image"] == 300.0
    results = run.read_table(schema.EVALUATION_RESULTS)
    assert sorted(results["task"].to_pylist()) == ["classification"] * 3 + ["segmentation"] * 3
    seg = results.filter(pc.equal(results["task"], "segmentation"))
    assert all(0.0 <= v <= 1.0 for v in seg["metric"].to_pylist())
    assert set(run.read_json(schema.EVALUATION_STATS)) == {"classification", "segmentation"}


def test_stage_errors_name_the_fix(ray_local, tmp_path: Path) -> None:
    run = _tiny_run(tmp_path / "a", labels=False, replicates=1)
    with pytest.raises(ValueError, match="no 'label' values"):
        run_evaluate(run, _fast())
    run = _tiny_run(tmp_path / "b", replicates=1)
    with pytest.raises(ValueError, match="enrich select --replicates 3"):
        run_evaluate(run, _fast(replicates=3))
    with pytest.raises(ValueError, match=r"evaluate.task \(--task\) must be one of classification, segmentation"):
        run_evaluate(run, _fast(task="detection"))
    with pytest.raises(FileNotFoundError, match="enrich manifest"):
        run_evaluate(RunDir(str(tmp_path / "c")), _fast())


def test_every_combination_is_distinct() -> None:
    """Result file names never collide across task, method, budget and replicate."""
    names = {
        Job(m, b, 1, r).rel(t)
        for t, m, b, r in itertools.product(
            ("classification", "segmentation"), ("enrich", "random", "full"), (0.07, 0.0701, 1.0), range(12)
        )
    }
    assert len(names) == 2 * 3 * 3 * 12
