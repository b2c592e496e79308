"""The evaluation's Ray work: decode the images once in chunks, then one task per model to train."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from ..config import EvaluateConfig
from ..imaging import manifest_nifti_axis
from ..runtime import as_completed
from ..schema import RESULT
from ..storage import RunDir
from .data import Images, load_chunk, prefix_subset, ranking_rows
from .plan import RANKINGS, TASKS, Inputs, Job
from .stats import FULL
from .train import TrainSpec, train_classifier, train_segmenter

log = logging.getLogger("enrich_dist.evaluation")

LOAD_CHUNK = 256


def task_options(gpus: int, gpu_fraction: float) -> dict:
    """Ray options of a training task: a GPU fraction only when the cluster has GPUs."""
    if gpu_fraction < 0 or gpu_fraction > 1:
        raise ValueError(f"evaluate gpu_fraction must be in [0, 1], got {gpu_fraction}")
    return {"num_gpus": gpu_fraction} if gpus > 0 and gpu_fraction > 0 else {}


@ray.remote(num_cpus=1)
def _load(
    uris: list[str], mask_uris: list[str] | None, size: int, storage_options: dict, frames: list, nifti_axis: int
) -> tuple:
    """Decode one chunk of images (and masks) at the model's input size."""
    return load_chunk(uris, mask_uris, size, storage_options, frames, nifti_axis)


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
    axis = manifest_nifti_axis(run)
    refs = []
    for start in range(0, len(rows), LOAD_CHUNK):
        chunk = rows[start : start + LOAD_CHUNK]
        mask_uris = [str(u) for u in images.mask_uri[chunk]] if masks else None
        frames = [None if f is None else int(f) for f in images.frame[chunk]]
        uris = [str(u) for u in images.uri[chunk]]
        refs.append(_load.remote(uris, mask_uris, size, run.storage_options, frames, axis))
    parts: dict[int, tuple] = {}
    for i, part in as_completed(refs, "evaluation: decoding images", log):
        parts[i] = part
    ordered = [parts[i] for i in range(len(refs))]
    x = np.concatenate([p[0] for p in ordered])
    m = np.concatenate([p[1] for p in ordered]) if masks else None
    errors = [e for p in ordered for e in p[2]]
    return x, m, errors


@dataclass
class Decoded:
    """The images every pending model needs, decoded once, and what each model learns from them."""

    x: np.ndarray  # uint8 (M, S, S)
    targets: np.ndarray  # label codes (M,) or uint8 masks (M, S, S)
    n_classes: int
    at: np.ndarray  # manifest row -> position in x, -1 when not decoded
    n_failed: int


def _decode(run: RunDir, cfg: EvaluateConfig, size: int, inputs: Inputs) -> Decoded:
    """Decode the training and test images (and masks) in Ray tasks; undecodable ones are left out."""
    images = inputs.images
    needed = np.concatenate([np.flatnonzero(inputs.train_ok), inputs.test_rows])
    x, masks, errors = _load_images(run, cfg, images, needed, size)
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
    at = np.full(len(images), -1, np.int64)
    at[needed[~failed]] = np.flatnonzero(~failed)
    if cfg.task == "segmentation":
        return Decoded(x, masks, max(2, int(masks.max()) + 1), at, int(failed.sum()))
    labels = [str(v) for v in images.label[needed]]
    names = sorted(set(labels))
    codes = np.asarray([names.index(v) for v in labels], dtype=np.int64)
    return Decoded(x, codes, len(names), at, int(failed.sum()))


def train_jobs(
    run: RunDir,
    cfg: EvaluateConfig,
    spec: TrainSpec,
    inputs: Inputs,
    pending: list[Job],
    config_hash: str,
    options: dict,
) -> tuple[dict[Job, dict], int]:
    """Train every pending job as a Ray task on images decoded once; returns rows and decode errors."""
    data = _decode(run, cfg, spec.image_size, inputs)
    usable = data.at >= 0
    test = data.at[inputs.test_rows[usable[inputs.test_rows]]]
    eligible = inputs.train_ok & usable
    orders = {
        (method, r): ranking_rows(inputs.rankings[method], r, inputs.images.image_id)
        for method in RANKINGS
        for r in {job.replicate for job in pending}
    }
    x_ref, t_ref = ray.put(data.x), ray.put(data.targets)
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
        refs.append(
            _train_one.options(**options).remote(
                run,
                job.rel(cfg.task),
                meta,
                x_ref,
                t_ref,
                data.at[rows],
                test,
                data.n_classes,
                dataclasses.replace(spec, seed=seed),
            )
        )
    out = {}
    for i, row in as_completed(refs, f"evaluation: {cfg.task} models", log):
        out[pending[i]] = row
    return out, data.n_failed
