"""Runs the stages in order on one run dir and records config, versions and timings in ``run.json``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Sequence

from .config import RunConfig
from .runtime import ray_session
from .storage import RunDir

log = logging.getLogger(__name__)

STAGES = ("manifest", "train-encoder", "embed", "similarity", "select", "evaluate", "report")
# the run-dir folder whose _SUCCESS marks each stage complete (the report is always rewritten)
STAGE_DIRS = {
    "manifest": "manifest", "train-encoder": "encoder", "embed": "embeddings", "similarity": "similarity",
    "select": "selection", "evaluate": "evaluation",
}
RUN_JSON = "run.json"
_PACKAGES = ("enrich-dist", "ray", "torch", "numpy", "pyarrow", "faiss-cpu", "faiss-gpu", "fsspec", "s3fs", "pillow")


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _stage_fn(name: str, cfg: RunConfig, storage_options: dict | None) -> Callable[[RunDir], dict]:
    if name == "manifest":
        from .manifest import run_manifest

        if not cfg.input:
            raise ValueError("the manifest stage needs --input (a folder, URI prefix or table of URIs)")
        return lambda run: run_manifest(run, cfg.input, cfg.manifest, storage_options)
    if name == "train-encoder":
        from .encoder import run_train_encoder

        if cfg.embed.embedder != "vae":
            return lambda run: {"skipped": f"embedder {cfg.embed.embedder!r} needs no encoder"}
        return lambda run: run_train_encoder(run, cfg.encoder)
    if name == "embed":
        from .embed import run_embed

        return lambda run: run_embed(run, cfg.embed)
    if name == "similarity":
        from .similarity import run_similarity

        return lambda run: run_similarity(run, cfg.similarity)
    if name == "select":
        from .selection import run_select

        return lambda run: run_select(run, cfg.select)
    if name == "evaluate":
        from .evaluation import run_evaluate

        return lambda run: run_evaluate(run, cfg.evaluate)
    if name == "report":
        from .report import run_report

        return run_report
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


_TARGETS = {"classification": "label", "segmentation": "mask_uri"}


def _has_targets(run: RunDir, task: str) -> bool:
    """Whether the manifest has the column the evaluation task learns from (labels or masks)."""
    column = _TARGETS.get(task, "label")
    table = run.read_table("manifest", columns=[column])
    return table.num_rows > table.column(column).null_count


def _record(run: RunDir, cfg: RunConfig, stage: str, entry: dict) -> None:
    state = run.read_json(RUN_JSON) if run.exists(RUN_JSON) else {"created": _now(), "stages": {}}
    state["config"] = cfg.to_dict()
    state["versions"] = versions()
    state["stages"][stage] = entry
    run.write_json(RUN_JSON, state)


def run_stages(cfg: RunConfig, stages: Sequence[str] = STAGES, storage_options: dict | None = None) -> dict:
    """Run ``stages`` in order on ``cfg.output`` inside one Ray session; returns stats per stage."""
    run = RunDir(cfg.output, storage_options)
    fns = [(name, _stage_fn(name, cfg, storage_options)) for name in stages]
    results = {}
    with ray_session(cfg.ray_address, cfg.num_cpus):
        for name, fn in fns:
            if name == "evaluate" and len(fns) > 1 and not _has_targets(run, cfg.evaluate.task):
                log.info("stage evaluate: skipped, the manifest has no %s", _TARGETS[cfg.evaluate.task])
                results[name] = {"skipped": f"no {_TARGETS[cfg.evaluate.task]} in the manifest"}
                continue
            done_before = name in STAGE_DIRS and run.is_done(STAGE_DIRS[name])
            log.info("stage %s: %s on %s", name, "already complete" if done_before else "starting", run.uri)
            started, t0 = _now(), time.monotonic()
            try:
                stats = fn(run)
            except ValueError as exc:
                if name != "evaluate" or len(fns) == 1:
                    raise
                # in a whole-pipeline run the evaluation is an extra: data it cannot use is reported, not fatal
                log.warning("stage evaluate: skipped, %s", exc)
                results[name] = {"skipped": str(exc)}
                continue
            seconds = round(time.monotonic() - t0, 3)
            if not done_before:  # a skipped stage keeps the record of the run that computed it
                _record(run, cfg, name, {"started": started, "ended": _now(), "seconds": seconds, "stats": stats})
                log.info("stage %s: finished in %.1fs", name, seconds)
            results[name] = stats
    return results
