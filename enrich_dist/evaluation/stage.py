"""The evaluate stage: one Ray task per (method, budget, replicate) model, each committed as its own
Parquet file under ``evaluation/runs/``; then ``results.parquet`` and ``stats.json`` (the executor commits the stage)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import stages
from ..config import EvaluateConfig, RunConfig, check_section
from ..executor import Context, execute
from ..runtime import cluster_resources
from ..schema import EVALUATION_DIR, EVALUATION_RESULTS, EVALUATION_STATS, MANIFEST_DIR, RESULT, SELECTION_DIR
from ..storage import RunDir
from .models import CLASSIFIERS, DEFAULT_SIZES, SEGMENTERS
from .plan import TASKS, committed, config_hash_of, load_inputs, plan_jobs
from .stats import METHODS, summarize
from .tasks import task_options, train_jobs
from .train import TrainSpec

log = logging.getLogger("enrich_dist.evaluation")


def run_evaluate(run: RunDir, cfg: EvaluateConfig) -> dict:
    """Train and score every model of ``cfg.task`` not yet committed, then write results and stats."""
    return execute(stages.EVALUATE, run, Context(RunConfig(evaluate=cfg), run.storage_options)).stats


def evaluation_marker(run: RunDir, stats: dict) -> dict:
    """The done marker's content: the tasks evaluated so far and their model counts."""
    all_stats = _read_stats(run)
    return {"tasks": sorted(all_stats), "models": {t: s["models_trained"] + s["models_reused"] for t, s in all_stats.items()}}


def compute_evaluation(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor commits and checks; committed models are reused, never retrained)."""
    cfg = ctx.config.evaluate
    started = time.perf_counter()
    check_section("evaluate", cfg)
    run.require(MANIFEST_DIR, "manifest")
    run.require(SELECTION_DIR, "select")
    gpus = cluster_resources().gpus
    spec = _spec(cfg, gpus)
    options = task_options(gpus, cfg.gpu_fraction)
    inputs = load_inputs(run, cfg)
    jobs = plan_jobs(run, cfg, inputs.rankings, inputs.n_train)
    config_hash = config_hash_of(cfg, spec, inputs.split_info)
    done, pending = committed(run, cfg.task, jobs, config_hash)
    log.info(
        "evaluate %s: model %s at %dx%d, %d train / %d test images, %d models (%d committed, %d to train)",
        cfg.task,
        spec.model,
        spec.image_size,
        spec.image_size,
        inputs.n_train,
        len(inputs.test_rows),
        len(jobs),
        len(done),
        len(pending),
    )
    previous = _read_stats(run).get(cfg.task) or {}
    config = {**dataclasses.asdict(cfg), "budgets": None if cfg.budgets is None else list(cfg.budgets)}
    unchanged = previous.get("config_hash") == config_hash and previous.get("config") == config
    if not pending and unchanged:
        log.info("evaluation of %s already complete in %s; skipping", cfg.task, run.uri_of(EVALUATION_DIR))
        total = previous["models_trained"] + previous["models_reused"]
        return _brief(previous) | {"models_trained": 0, "models_reused": total}
    load_errors = previous.get("load_errors", 0)
    if pending:
        rows, load_errors = train_jobs(run, cfg, spec, inputs, pending, config_hash, options)
        done.update(rows)
    results = [done[job] for job in jobs]
    metric_name, default_seconds = TASKS[cfg.task]
    stats = {
        "task": cfg.task,
        "metric": metric_name,
        "model": spec.model,
        "image_size": spec.image_size,
        "config_hash": config_hash,
        "config": config,
        "n_train": inputs.n_train,
        "n_test": len(inputs.test_rows),
        "split": inputs.split_info,
        "load_errors": load_errors,
        "models_trained": len(pending),
        "models_reused": len(jobs) - len(pending),
        **summarize(results, cfg.alpha, cfg.seconds_per_image or default_seconds),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_outputs(run, cfg.task, results, stats)
    _log_summary(stats)
    return _brief(stats)


def _brief(stats: dict) -> dict:
    """The headline of a task's statistics (what run.json records; stats.json holds the rest)."""
    keys = (
        "task",
        "metric",
        "model",
        "n_train",
        "n_test",
        "split",
        "models_trained",
        "models_reused",
        "full",
    )
    labelling = {k: stats["labelling"].get(k) for k in ("seconds_per_image", *METHODS)}
    smallest = stats["smallest_budget_matching_full"]
    return {k: stats[k] for k in keys} | {
        "smallest_budget_matching_full": smallest,
        "labelling": labelling,
        "seconds": stats["seconds"],
    }


def _spec(cfg: EvaluateConfig, gpus: int) -> TrainSpec:
    """How every model of this evaluation is trained (the seed is set per replicate later)."""
    model = resolve_model(cfg, gpus)
    return TrainSpec(
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


def resolve_model(cfg: EvaluateConfig, gpus: int) -> str:
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


def _read_stats(run: RunDir) -> dict:
    return run.read_json(EVALUATION_STATS) if run.exists(EVALUATION_STATS) else {}


def _write_outputs(run: RunDir, task: str, rows: list[dict], stats: dict) -> None:
    """Replace ``task``'s rows in results.parquet and its entry in stats.json."""
    table = pa.Table.from_pylist(rows, schema=RESULT)
    if run.exists(EVALUATION_RESULTS):
        old = run.read_table(EVALUATION_RESULTS)
        table = pa.concat_tables([old.filter(pc.not_equal(old["task"], task)).cast(RESULT), table])
    run.write_table(EVALUATION_RESULTS, table)
    all_stats = {**_read_stats(run), task: stats}
    run.write_json(EVALUATION_STATS, all_stats)


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


def check_evaluate(run: RunDir) -> tuple[dict, list[str]]:
    """One result per (task, method, budget, replicate); NaN metrics (e.g. AUC of a one-class test set) counted."""
    if not run.exists(EVALUATION_RESULTS):
        return {"rows": 0}, [f"{EVALUATION_RESULTS} is missing"]
    table = run.read_table(EVALUATION_RESULTS, columns=["task", "method", "budget", "replicate", "metric"])
    keys = table.group_by(["task", "method", "budget", "replicate"]).aggregate([([], "count_all")])
    dup = table.num_rows - keys.num_rows
    undefined = int(np.count_nonzero(np.isnan(table["metric"].fill_null(math.nan).to_numpy(zero_copy_only=False))))
    problems = [f"{dup} repeated (task, method, budget, replicate) results"] if dup else []
    if table.num_rows == 0:
        problems.append("no results")
    return {"rows": table.num_rows, "duplicate_ids": dup, "undefined_metric": undefined, "nan": 0}, problems
