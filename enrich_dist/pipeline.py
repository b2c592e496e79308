"""Runs the stages in order on one run dir and records config, versions and timings in ``run.json``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence

from .config import RunConfig, validate
from .errors import ConfigError
from .invariants import InvariantError, check_stage
from .runtime import ray_session
from .storage import RunDir, redact_uri

log = logging.getLogger(__name__)

STAGES = ("manifest", "train-encoder", "embed", "similarity", "select", "evaluate", "report")
# the run-dir folder whose _SUCCESS marks each stage complete (the report is always rewritten)
STAGE_DIRS = {
    "manifest": "manifest", "train-encoder": "encoder", "embed": "embeddings", "similarity": "similarity",
    "select": "selection", "evaluate": "evaluation",
}
RUN_JSON = "run.json"
RUN_FORMAT = 1  # layout of the run dir; a run dir of another format is refused, never mixed
# config sections whose settings decide each completed stage's artifacts (operational knobs left out):
# rerunning a completed stage with other settings is refused rather than silently mixing two configs
STAGE_CONFIG = {"manifest": "manifest", "train-encoder": "encoder", "embed": "embed", "similarity": "similarity",
                "select": "select"}
_OPERATIONAL = {
    "manifest": {"shard_size"}, "encoder": {"device"}, "embed": {"batch_size", "num_actors", "decode_threads", "device"},
    "similarity": {"block_size", "max_memory", "device", "checkpoint_seconds"}, "select": {"workers", "checkpoint_seconds"},
}
_URI_KEYS = ("input", "output", "seed_ids", "embeddings", "previous_run", "labelled")
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
        from .encoder import ENCODER_MODELS, run_train_encoder

        if cfg.embed.embedder not in ENCODER_MODELS:
            return lambda run: {"skipped": f"embedder {cfg.embed.embedder!r} needs no encoder"}
        return lambda run: run_train_encoder(run, cfg.encoder, model=cfg.embed.embedder)
    if name == "embed":
        from .embed import run_embed

        return lambda run: run_embed(run, cfg.embed)
    if name == "similarity":
        from .similarity import run_similarity

        return lambda run: run_similarity(run, cfg.similarity)
    if name == "select":
        from .selection import run_select

        return lambda run: run_select(run, cfg.select)
    if name == "incremental":  # only in runs with --previous-run (enrich_dist/incremental.py)
        from .incremental import run_incremental

        return lambda run: run_incremental(run, cfg, storage_options)
    if name == "evaluate":
        from .evaluation import run_evaluate

        return lambda run: run_evaluate(run, cfg.evaluate)
    if name == "report":
        from .report import run_report

        return lambda run: run_report(run, images=cfg.report.images)
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


_TARGETS = {"classification": "label", "segmentation": "mask_uri"}


def _has_targets(run: RunDir, task: str) -> bool:
    """Whether the manifest has the column the evaluation task learns from (labels or masks)."""
    column = _TARGETS.get(task, "label")
    table = run.read_table("manifest", columns=[column])
    return table.num_rows > table.column(column).null_count


def public_config(cfg: RunConfig) -> dict:
    """The config as stored in run.json: URIs with any ``user:password@`` part removed."""
    out = cfg.to_dict()
    for section in (out, *[v for v in out.values() if isinstance(v, dict)]):
        for key in _URI_KEYS:
            if isinstance(section.get(key), str):
                section[key] = redact_uri(section[key])
    return out


def _stage_settings(cfg: RunConfig, stage: str) -> dict | None:
    section = STAGE_CONFIG.get(stage)
    if section is None:
        return None
    values = public_config(cfg)[section]
    # as JSON stores it (tuples become lists), so settings read back from run.json compare equal
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in _OPERATIONAL[section]}))


def _read_state(run: RunDir) -> dict | None:
    if not run.exists(RUN_JSON):
        return None
    try:
        state = run.read_json(RUN_JSON)
    except ValueError as exc:
        raise ValueError(
            f"{run.uri_of(RUN_JSON)} is not readable JSON ({exc}): start fresh with a new --output folder"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
        raise ValueError(f"{run.uri_of(RUN_JSON)} is not an enrich_dist run record: use a new --output folder")
    return state


# what each stage reads: the stage that must be complete (or run before it in the same command)
_NEEDS = {"train-encoder": ("manifest",), "embed": ("manifest",), "similarity": ("embed",), "select": ("embed",),
          "evaluate": ("select",)}


def preflight(run: RunDir, cfg: RunConfig, stages: Sequence[str], storage_options: dict | None) -> None:
    """Fail in a second, before Ray starts: a missing input, or a stage whose inputs no earlier stage made."""
    if "manifest" in stages and not run.is_done(STAGE_DIRS["manifest"]):
        if not cfg.input:
            raise ValueError("no --input: give the archive (a folder, URI prefix, or a .csv/.parquet table)")
        from .storage import filesystem

        fs, path = filesystem(cfg.input, storage_options)
        if "://" not in cfg.input and not fs.exists(path):
            raise FileNotFoundError(f"--input {cfg.input} does not exist: point --input at the archive")
    for i, stage in enumerate(stages):
        needs = list(_NEEDS.get(stage, ()))
        if stage == "embed" and cfg.embed.embedder in ("vae", "contrastive"):
            needs.append("train-encoder")
        for need in needs:
            if need not in stages[:i] and not run.is_done(STAGE_DIRS[need]):
                raise FileNotFoundError(
                    f"{run.uri} has no completed {need!r} stage, which {stage!r} reads: run "
                    f"`enrich {need} --output {run.uri}` first (or `enrich run`, which runs every stage)"
                )


def check_compatible(run: RunDir, cfg: RunConfig, stages: Sequence[str]) -> None:
    """Refuse a run dir of another format, or a completed stage computed with other settings than ``cfg``."""
    state = _read_state(run)
    if state is None:
        return
    fmt = state.get("format", RUN_FORMAT)
    if fmt != RUN_FORMAT:
        raise ValueError(
            f"{run.uri} was written by an incompatible enrich_dist (run dir format {fmt!r}, this version reads "
            f"{RUN_FORMAT}): start fresh with a new --output folder, or rerun with the enrich_dist that wrote it"
        )
    for stage in stages:
        held = state.get("stages", {}).get(stage, {}).get("settings")
        if stage not in STAGE_DIRS or held is None or not run.is_done(STAGE_DIRS[stage]):
            continue
        wanted = _stage_settings(cfg, stage)
        # a setting added after the stage ran counts as its default there (it did not exist, so it was off/default)
        held = {**{k: v for k, v in _stage_settings(RunConfig(), stage).items() if k not in held}, **held}
        diff = {k: (held.get(k), wanted.get(k)) for k in sorted(set(held) | set(wanted)) if held.get(k) != wanted.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{run.uri_of(STAGE_DIRS[stage])} was computed with other {STAGE_CONFIG[stage]} settings ({shown}): "
                f"refusing to mix them in one run dir. Start fresh with a new --output folder, or delete "
                f"{run.uri_of(STAGE_DIRS[stage])} and the stages after it to recompute"
            )


def _record(run: RunDir, cfg: RunConfig, stage: str, entry: dict) -> None:
    state = run.read_json(RUN_JSON) if run.exists(RUN_JSON) else {"created": _now(), "stages": {}}
    state.setdefault("format", RUN_FORMAT)
    state["config"] = public_config(cfg)
    settings = _stage_settings(cfg, stage)
    if settings is not None:
        entry = {**entry, "settings": settings}
    state["versions"] = versions()
    state["stages"][stage] = entry
    run.write_json(RUN_JSON, state)


def run_stages(cfg: RunConfig, stages: Sequence[str] = STAGES, storage_options: dict | None = None) -> dict:
    """Run ``stages`` in order on ``cfg.output`` inside one Ray session; returns stats per stage."""
    validate(cfg)  # every setting, before anything is read or started
    run = RunDir(cfg.output, storage_options)
    if cfg.incremental.previous_run:  # an incremental run: see enrich_dist/incremental.py
        from .incremental import plan_stages

        stages, cfg = plan_stages(run, cfg, stages)  # a new config: cfg itself is left as it was
    elif cfg.incremental.labelled or cfg.incremental.retrain_encoder:
        raise ConfigError("--labelled and --retrain-encoder belong to an incremental run: add --previous-run OLD_RUN")
    check_compatible(run, cfg, stages)
    preflight(run, cfg, stages, storage_options)
    fns = [(name, _stage_fn(name, cfg, storage_options)) for name in stages]  # imports torch: after the checks
    results = {}
    with ray_session(cfg.ray_address, cfg.num_cpus):
        for name, fn in fns:
            if name == "select" and results.get("incremental", {}).get("n_to_rank") == 0:
                log.info("stage select: skipped, the incremental run found no new or changed image to rank")
                results[name] = {"skipped": "incremental run: no new or changed images to rank"}
                continue
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
            try:  # read back what the stage committed; a violation means the stage is not complete
                if name == "incremental":
                    from .incremental import check_incremental

                    invariants = check_incremental(run)
                else:
                    invariants = check_stage(run, name)
            except InvariantError:
                if name in STAGE_DIRS:
                    run.clear_done(STAGE_DIRS[name])
                raise
            if not done_before:  # a skipped stage keeps the record of the run that computed it
                entry = {"started": started, "ended": _now(), "seconds": seconds, "stats": stats}
                _record(run, cfg, name, {**entry, "invariants": invariants})
                log.info("stage %s: finished in %.1fs", name, seconds)
            results[name] = stats
            if name == "select" and cfg.incremental.previous_run:  # nightly runs: what to send to annotators
                from .export import write_next_to_label

                results["export"] = write_next_to_label(run)
    return results
