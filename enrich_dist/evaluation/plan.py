"""What the evaluation trains: the split, the images each task can use, and one job per model.

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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import EvaluateConfig
from ..schema import (
    EVALUATION_DIR,
    MANIFEST_DIR,
    RANDOM_RANKING_PATH,
    RANKING_PATH,
    SELECTION_DIR,
    SELECTION_STATS,
)
from ..storage import RunDir
from .data import Images, budget_counts, leaking_groups, make_split, ranking_rows, split_groups
from .stats import FULL
from .train import TrainSpec

log = logging.getLogger("enrich_dist.evaluation")

TASKS = {"classification": ("auc", 1.0), "segmentation": ("mean_jaccard", 300.0)}
RUNS_DIR = posixpath.join(EVALUATION_DIR, "runs")
SPLIT_PATH = posixpath.join(EVALUATION_DIR, "split.parquet")
RANKINGS = {
    "enrich": RANKING_PATH,
    "random": RANDOM_RANKING_PATH,
}


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


@dataclass
class Inputs:
    """The ok images, their split, which can train or test, and both methods' rankings."""

    images: Images
    split_info: dict
    train_ok: np.ndarray
    test_rows: np.ndarray
    rankings: dict[str, pa.Table]

    @property
    def n_train(self) -> int:
        return int(self.train_ok.sum())


def load_inputs(run: RunDir, cfg: EvaluateConfig) -> Inputs:
    """Manifest, split and rankings, checked: both sides non-empty, two labels among the test images."""
    images = Images.from_manifest(run.read_table(MANIFEST_DIR))
    is_test, split_info = _split(run, images, cfg)
    target_ok = _has_target(images, cfg.task, run)
    rankings = {m: run.read_table(p) for m, p in RANKINGS.items()}
    ranked = np.zeros(len(images), bool)
    ranked[ranking_rows(rankings["enrich"], 0, images.image_id)] = True
    inputs = Inputs(
        images, split_info, ranked & ~is_test & target_ok, np.flatnonzero(is_test & target_ok), rankings
    )
    if inputs.n_train < 2 or len(inputs.test_rows) == 0:
        raise ValueError(
            f"{cfg.task} needs training and test images: found {inputs.n_train} train and "
            f"{len(inputs.test_rows)} test images with {'a label' if cfg.task == 'classification' else 'a mask'} "
            f"in {run.uri_of(MANIFEST_DIR)}"
        )
    if cfg.task == "classification":
        test_labels = sorted({str(v) for v in images.label[inputs.test_rows]})
        if len(test_labels) < 2:
            raise ValueError(
                f"the test split has only the label(s) {test_labels}: AUC needs at least two; "
                "give the manifest a 'split' column with both labels among the test rows"
            )
    return inputs


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


def plan_jobs(run: RunDir, cfg: EvaluateConfig, rankings: dict[str, pa.Table], n_train: int) -> list[Job]:
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


def config_hash_of(cfg: EvaluateConfig, spec: TrainSpec, split_info: dict) -> str:
    """A short hash of what determines a model's score, so a changed setting retrains."""
    key = {"task": cfg.task, "spec": dataclasses.asdict(spec), "split": split_info}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def committed(run: RunDir, task: str, jobs: list[Job], config_hash: str) -> tuple[dict[Job, dict], list[Job]]:
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
