"""The evaluate stage: one Ray task per (method, budget, replicate) model, each committed as its own
Parquet file under ``evaluation/runs/``; then ``results.parquet``, ``stats.json`` and ``_SUCCESS``.

Subsets use training images only: the subset for (method, budget, replicate) is the prefix of that
replicate's ranking restricted to non-test images (with a label, or a mask for segmentation), sized
as budget x the number of such images. The ``full`` method trains on all of them, once per replicate.
The test split is the manifest's (rows with ``split == "test"``); without one, a seeded split that
keeps each patient (else clip, else image) on one side is made and written to ``evaluation/split.parquet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..config import EvaluateConfig
from ..runtime import as_completed, cluster_resources
from ..schema import EVALUATION_DIR, EVALUATION_RESULTS, EVALUATION_STATS, MANIFEST_DIR, RESULT, SELECTION_DIR
from ..storage import RunDir
from .data import (
    Images,
    budget_counts,
    leaking_groups,
    load_chunk,
    make_split,
    prefix_subset,
    ranking_rows,
    split_groups,
)
from .models import CLASSIFIERS, DEFAULT_SIZES, SEGMENTERS
from .stats import FULL, summarize
from .train import TrainSpec, train_classifier, train_segmenter

log = logging.getLogger("enrich_dist.evaluation")

TASKS = {"classification": ("auc", 1.0), "segmentation": ("mean_jaccard", 300.0)}
RUNS_DIR = posixpath.join(EVALUATION_DIR, "runs")
SPLIT_PATH = posixpath.join(EVALUATION_DIR, "split.parquet")
RANKINGS = {
    "enrich": posixpath.join(SELECTION_DIR, "ranking.parquet"),
    "random": posixpath.join(SELECTION_DIR, "random_ranking.parquet"),
}
SELECTION_STATS = posixpath.join(SELECTION_DIR, "selection.json")
LOAD_CHUNK = 256


@dataclass(frozen=True)
class Job:
    """One model to train: a method's subset at one budget in one replicate."""

    method: str
    budget: float
    count: int
    replicate: int

    def rel(self, task: str) -> str:
        """The fixed name of this model's result file."""
        return posixpath.join(
            RUNS_DIR, f"{task}-{self.method}-b{self.budget:.6f}-r{self.replicate:03d}.parquet"
        )


def run_evaluate(run: RunDir, cfg: EvaluateConfig) -> dict:
    """Train and score every model of ``cfg.task`` not yet committed, then write results and stats."""
    started = time.perf_counter()
    if cfg.task not in TASKS:
        raise ValueError(f"evaluate task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    run.require(MANIFEST_DIR, "manifest")
    run.require(SELECTION_DIR, "select")
    resources = cluster_resources()
    model = _resolve_model(cfg, resources.gpus)
    spec = TrainSpec(
        model=model,
        image_size=cfg.image_size or DEFAULT_SIZES[model],
        width=cfg.width,
        epochs=cfg.epochs,
        min_steps=cfg.min_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
    )
    images = Images.from_manifest(run.read_table(MANIFEST_DIR))
    is_test, split_info = _split(run, images, cfg)
    target_ok = _has_target(images, cfg.task, run)
    rankings = {m: run.read_table(p) for m, p in RANKINGS.items()}
    ranked = np.zeros(len(images), bool)
    ranked[ranking_rows(rankings["enrich"], 0, images.image_id)] = True
    train_ok = ranked & ~is_test & target_ok
    test_rows = np.flatnonzero(is_test & target_ok)
    n_train = int(train_ok.sum())
    if n_train < 2 or len(test_rows) == 0:
        raise ValueError(
            f"{cfg.task} needs training and test images: found {n_train} train and {len(test_rows)} test "
            f"images with {'a label' if cfg.task == 'classification' else 'a mask'} in {run.uri_of(MANIFEST_DIR)}"
        )
    if cfg.task == "classification":
        test_labels = sorted({str(v) for v in images.label[test_rows]})
        if len(test_labels) < 2:
            raise ValueError(
                f"the test split has only the label(s) {test_labels}: AUC needs at least two; "
                "give the manifest a 'split' column with both labels among the test rows"
            )
    jobs = _plan(run, cfg, rankings, n_train)
    config_hash = _config_hash(cfg, spec, split_info)
    done, pending = _committed(run, cfg.task, jobs, config_hash)
    log.info(
        "evaluate %s: model %s at %dx%d, %d train / %d test images, %d models (%d committed, %d to train)",
        cfg.task,
        model,
        spec.image_size,
        spec.image_size,
        n_train,
        len(test_rows),
        len(jobs),
        len(done),
        len(pending),
    )
    if (
        not pending
        and run.is_done(EVALUATION_DIR)
        and ((_read_stats(run).get(cfg.task) or {}).get("config_hash") == config_hash)
    ):
        log.info("evaluation of %s already complete in %s; skipping", cfg.task, run.uri_of(EVALUATION_DIR))
        return _read_stats(run)[cfg.task]
    load_errors = 0
    if pending:
        rows, load_errors = _train(
            run, cfg, spec, images, rankings, train_ok, test_rows, pending, config_hash, resources.gpus
        )
        done.update(rows)
    results = [done[job] for job in jobs]
    metric_name, default_seconds = TASKS[cfg.task]
    summary = summarize(results, cfg.alpha, cfg.seconds_per_image or default_seconds)
    stats = {
        "task": cfg.task,
        "metric": metric_name,
        "model": model,
        "image_size": spec.image_size,
        "config_hash": config_hash,
        "config": {**dataclasses.asdict(cfg), "budgets": None if cfg.budgets is None else list(cfg.budgets)},
        "n_train": n_train,
        "n_test": len(test_rows),
        "split": split_info,
        "load_errors": load_errors,
        "models_trained": len(pending),
        "models_reused": len(jobs) - len(pending),
        **summary,
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_outputs(run, cfg.task, results, stats)
    _log_summary(stats)
    return stats


def _resolve_model(cfg: EvaluateConfig, gpus: int) -> str:
    """The network for ``cfg.model`` "auto": ResNet with GPUs, the small CNN without; U-Net for masks."""
    allowed = CLASSIFIERS if cfg.task == "classification" else SEGMENTERS
    if cfg.model == "auto":
        if cfg.task == "segmentation":
            return "unet"
        return "resnet" if gpus > 0 else "cnn"
    if cfg.model not in allowed:
        raise ValueError(
            f"evaluate model for {cfg.task} must be 'auto' or one of {allowed}, got {cfg.model!r}"
        )
    return cfg.model


def _split(run: RunDir, images: Images, cfg: EvaluateConfig) -> tuple[np.ndarray, dict]:
    """Test mask over the ok images: the manifest's split if it has test rows, else a tool-made one."""
    groups, group_by = split_groups(images)
    manifest_test = np.asarray([s == "test" for s in images.split], dtype=bool)
    if manifest_test.any():
        leaks = leaking_groups(groups, manifest_test)
        if leaks:
            log.warning(
                "the manifest's split puts %d %s value(s) on both the train and the test side: "
                "test scores may be optimistic",
                leaks,
                group_by,
            )
        return manifest_test, {"source": "manifest", "group_by": group_by, "leaking_groups": leaks}
    is_test = make_split(groups, cfg.test_fraction, cfg.seed)
    table = pa.table(
        {
            "image_id": pa.array(images.image_id, pa.int64()),
            "split": pa.array(np.where(is_test, "test", "train").tolist(), pa.string()),
            "group": pa.array([str(g) for g in groups], pa.string()),
        }
    )
    if not run.exists(SPLIT_PATH) or not run.read_table(SPLIT_PATH).equals(table):
        run.write_table(SPLIT_PATH, table)
    log.info(
        "no test rows in the manifest's split: made a seeded %s-disjoint split (%d test of %d images) in %s",
        group_by,
        int(is_test.sum()),
        len(images),
        run.uri_of(SPLIT_PATH),
    )
    info = {
        "source": "evaluation/split.parquet",
        "group_by": group_by,
        "test_fraction": cfg.test_fraction,
        "leaking_groups": 0,
    }
    return is_test, info


def _has_target(images: Images, task: str, run: RunDir) -> np.ndarray:
    """Which images carry what the task learns: a label, or a mask URI."""
    column = "label" if task == "classification" else "mask_uri"
    if not images.has_values(column):
        what = "labels" if task == "classification" else "masks"
        raise ValueError(
            f"{task} needs {what}, but the manifest in {run.uri_of(MANIFEST_DIR)} has no {column!r} values: "
            f"give the input table a {column!r} column and rerun `enrich manifest`"
        )
    return np.asarray([v is not None for v in getattr(images, column)], dtype=bool)


def _plan(run: RunDir, cfg: EvaluateConfig, rankings: dict[str, pa.Table], n_train: int) -> list[Job]:
    """Every (method, budget, replicate) model below the full set, then the full set per replicate."""
    available = len(pc.unique(rankings["enrich"]["replicate"]))
    replicates = available if cfg.replicates is None else cfg.replicates
    if not 1 <= replicates <= available:
        raise ValueError(
            f"evaluate replicates {replicates} out of range: the selection in {run.uri_of(SELECTION_DIR)} has "
            f"{available}; rerun `enrich select --replicates {replicates}` in a new run dir or ask for fewer"
        )
    budgets = cfg.budgets
    if budgets is None:
        budgets = tuple(float(b["budget"]) for b in run.read_json(SELECTION_STATS)["budgets"])
    jobs = [
        Job(method, fraction, count, r)
        for fraction, count in budget_counts(list(budgets), n_train)
        for method in RANKINGS
        for r in range(replicates)
    ]
    return jobs + [Job(FULL, 1.0, n_train, r) for r in range(replicates)]


def _config_hash(cfg: EvaluateConfig, spec: TrainSpec, split_info: dict) -> str:
    """A short hash of what determines a model's score, so a changed setting retrains."""
    key = {"task": cfg.task, "spec": dataclasses.asdict(spec), "split": split_info}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _committed(
    run: RunDir, task: str, jobs: list[Job], config_hash: str
) -> tuple[dict[Job, dict], list[Job]]:
    """Result rows already committed with this config, and the jobs still to train."""
    existing = set(run.listdir(RUNS_DIR, suffix=".parquet"))
    done, pending, stale = {}, [], 0
    for job in jobs:
        rel = job.rel(task)
        if rel in existing:
            row = run.read_table(rel).to_pylist()[0]
            if row["config_hash"] == config_hash:
                done[job] = row
                continue
            stale += 1
        pending.append(job)
    if stale:
        log.info("%d committed %s models were trained with other settings: retraining them", stale, task)
    return done, pending


@ray.remote(num_cpus=1)
def _load(uris: list[str], mask_uris: list[str] | None, size: int, storage_options: dict) -> tuple:
    """Decode one chunk of images (and masks) at the model's input size."""
    return load_chunk(uris, mask_uris, size, storage_options)


@ray.remote(num_cpus=1)
def _train_one(
    run: RunDir,
    rel: str,
    meta: dict,
    images: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    n_classes: int,
    spec: TrainSpec,
) -> dict:
    """Train one model, commit its result row to ``rel`` and return the row."""
    import torch

    torch.set_num_threads(1)
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    spec = dataclasses.replace(spec, device=device)
    start = time.perf_counter()
    fit = train_classifier if meta["task"] == "classification" else train_segmenter
    metric = fit(images[train], targets[train], images[test], targets[test], n_classes, spec)
    row = {**meta, "n_train": len(train), "n_test": len(test), "metric": metric, "device": device}
    row["seconds"] = round(time.perf_counter() - start, 3)
    run.write_table(rel, pa.Table.from_pylist([row], schema=RESULT))
    return row


def _load_images(run: RunDir, cfg: EvaluateConfig, images: Images, rows: np.ndarray, size: int) -> tuple:
    """uint8 images (and masks) of ``rows`` decoded in Ray tasks, with each row's error."""
    masks = cfg.task == "segmentation"
    refs = []
    for start in range(0, len(rows), LOAD_CHUNK):
        chunk = rows[start : start + LOAD_CHUNK]
        mask_uris = [str(u) for u in images.mask_uri[chunk]] if masks else None
        refs.append(_load.remote([str(u) for u in images.uri[chunk]], mask_uris, size, run.storage_options))
    parts: dict[int, tuple] = {}
    for i, part in as_completed(refs, "evaluation: decoding images", log):
        parts[i] = part
    ordered = [parts[i] for i in range(len(refs))]
    x = np.concatenate([p[0] for p in ordered])
    m = np.concatenate([p[1] for p in ordered]) if masks else None
    errors = [e for p in ordered for e in p[2]]
    return x, m, errors


def _train(
    run: RunDir,
    cfg: EvaluateConfig,
    spec: TrainSpec,
    images: Images,
    rankings: dict[str, pa.Table],
    train_ok: np.ndarray,
    test_rows: np.ndarray,
    pending: list[Job],
    config_hash: str,
    gpus: int,
) -> tuple[dict[Job, dict], int]:
    """Decode the images once, then train every pending job as a Ray task; returns rows and decode errors."""
    needed = np.concatenate([np.flatnonzero(train_ok), test_rows])
    x, masks, errors = _load_images(run, cfg, images, needed, spec.image_size)
    failed = np.asarray([e is not None for e in errors], dtype=bool)
    if failed.any():
        first = int(np.flatnonzero(failed)[0])
        log.warning(
            "%d of %d images could not be decoded and are left out (e.g. %s: %s)",
            int(failed.sum()),
            len(needed),
            images.uri[needed[first]],
            errors[first],
        )
    at = np.full(len(images), -1, np.int64)  # manifest row -> position in x, for decoded rows
    at[needed[~failed]] = np.flatnonzero(~failed)
    usable = at >= 0
    test = at[test_rows[usable[test_rows]]]
    eligible = train_ok & usable
    if cfg.task == "classification":
        names = sorted({str(v) for v in images.label[needed[~failed]]})
        if len(names) < 2:
            raise ValueError(f"classification needs at least two labels, found {names}")
        codes = {name: i for i, name in enumerate(names)}
        targets = np.zeros(len(x), np.int64)
        targets[at[needed[~failed]]] = [codes[str(v)] for v in images.label[needed[~failed]]]
        n_classes = len(names)
    else:
        targets = masks
        n_classes = max(2, int(masks.max()) + 1)
    orders = {
        (method, r): ranking_rows(rankings[method], r, images.image_id)
        for method in RANKINGS
        for r in {job.replicate for job in pending}
    }
    x_ref, t_ref = ray.put(x), ray.put(targets)
    options = {"num_gpus": cfg.gpu_fraction} if gpus > 0 and cfg.gpu_fraction > 0 else {}
    refs = []
    for job in pending:
        if job.method == FULL:
            rows = np.flatnonzero(eligible)
        else:
            rows = prefix_subset(orders[(job.method, job.replicate)], eligible, job.count)
        meta = {
            "task": cfg.task,
            "method": job.method,
            "budget": job.budget,
            "replicate": job.replicate,
            "metric_name": TASKS[cfg.task][0],
            "model": spec.model,
            "config_hash": config_hash,
        }
        seed = int(np.random.SeedSequence([cfg.seed, job.replicate]).generate_state(1)[0])
        job_spec = dataclasses.replace(spec, seed=seed)
        refs.append(
            _train_one.options(**options).remote(
                run, job.rel(cfg.task), meta, x_ref, t_ref, at[rows], test, n_classes, job_spec
            )
        )
    out = {}
    for i, row in as_completed(refs, f"evaluation: {cfg.task} models", log):
        out[pending[i]] = row
    return out, int(failed.sum())


def _read_stats(run: RunDir) -> dict:
    return run.read_json(EVALUATION_STATS) if run.exists(EVALUATION_STATS) else {}


def _write_outputs(run: RunDir, task: str, rows: list[dict], stats: dict) -> None:
    """Replace ``task``'s rows in results.parquet and its entry in stats.json, then write ``_SUCCESS``."""
    table = pa.Table.from_pylist(rows, schema=RESULT)
    if run.exists(EVALUATION_RESULTS):
        old = run.read_table(EVALUATION_RESULTS)
        table = pa.concat_tables([old.filter(pc.not_equal(old["task"], task)).cast(RESULT), table])
    run.write_table(EVALUATION_RESULTS, table)
    all_stats = {**_read_stats(run), task: stats}
    run.write_json(EVALUATION_STATS, all_stats)
    run.mark_done(
        EVALUATION_DIR,
        {
            t: {"models": len(rows) if t == task else None, "seconds": s["seconds"]}
            for t, s in all_stats.items()
        },
    )


def _log_summary(stats: dict) -> None:
    """One line per budget, and the headline: smallest budget matching the full set per method."""
    metric = stats["metric"]
    full = stats["full"]
    if full["mean"] is not None:
        log.info(
            "full training set (%d images): %s %.4f ± %.4f",
            full["n_train"],
            metric,
            full["mean"],
            full["std"],
        )
    for e in stats["budgets"]:
        parts = [
            f"{m} {e[m]['mean']:.4f} ± {e[m]['std']:.4f}"
            for m in ("enrich", "random")
            if e[m]["mean"] is not None
        ]
        log.info(
            "budget %.3g (%d images): %s; p enrich vs random %s",
            e["budget"],
            e["n_train"],
            ", ".join(parts),
            _fmt_p(e["p_enrich_vs_random"]),
        )
    for method, entry in stats["smallest_budget_matching_full"].items():
        if entry is None:
            log.info("%s: no evaluated budget matches the full set", method)
        else:
            saved = stats["labelling"][method]["seconds_saved"]
            log.info(
                "%s: smallest budget matching the full set %.3g (%d images), saves %.1f h of labelling",
                method,
                entry["budget"],
                entry["n_train"],
                saved / 3600,
            )
    if stats["min_p_value"] is not None and stats["min_p_value"] > stats["alpha"]:
        log.warning(
            "with %d replicates the Mann-Whitney U test cannot reach p < %.3g (smallest possible p %.3g): "
            "every budget looks indistinguishable; use more replicates (the paper used 10)",
            stats["replicates"],
            stats["alpha"],
            stats["min_p_value"],
        )


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"
