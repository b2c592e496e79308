"""Runs the stages in order on one run dir and records config, versions and timings in ``run.json``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Sequence

from . import schema
from .config import RunConfig, validate
from .errors import ConfigError
from .executor import Context, execute, is_done, prepare, verify
from .invariants import InvariantError
from .runtime import ray_session
from .stages import PIPELINE, REGISTRY
from .stages import stage as stage_record
from .storage import RunDir, redact_uri

log = logging.getLogger(__name__)

STAGES = tuple(s.name for s in PIPELINE)
# derived from the registry (stages.py), kept under these names for callers
STAGE_DIRS = {s.name: s.folder for s in PIPELINE if s.folder is not None}  # folder whose _SUCCESS marks it done
STAGE_CONFIG = {s.name: s.section for s in PIPELINE if s.section is not None}  # settings that decide its artifacts
RUN_JSON = schema.RUN_JSON
RUN_FORMAT = 1  # layout of the run dir; a run dir of another format is refused, never mixed
_URI_KEYS = ("input", "output", "seed_ids", "scope", "embeddings", "previous_run", "labelled")
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


def _stage_settings(cfg: RunConfig, name: str) -> dict | None:
    record = REGISTRY.get(name)
    if record is None or record.section is None:
        return None
    values = public_config(cfg)[record.section]
    # as JSON stores it (tuples become lists), so settings read back from run.json compare equal
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in record.operational}))


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
        needs = list(REGISTRY[stage].needs) if stage in REGISTRY else []
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
                f"{run.uri_of(STAGE_DIRS[stage])} was computed with other {REGISTRY[stage].section} settings ({shown}): "
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


def check_stage(run: RunDir, name: str) -> dict:
    """The read-back invariants record of stage ``name`` (``ok`` true), or :class:`InvariantError`."""
    return verify(stage_record(name), run)


def run_stages(cfg: RunConfig, stages: Sequence[str] = STAGES, storage_options: dict | None = None) -> dict:
    """Run ``stages`` in order on ``cfg.output`` inside one Ray session; returns stats per stage.

    Each stage goes through the executor (skip / compute / commit / read back); this loop adds only what
    concerns the whole run: the incremental plan, checks before Ray starts, the stages an archive cannot
    use (no encoder to train, no labels to evaluate, nothing new to rank), and the ``run.json`` record.
    """
    validate(cfg)  # every setting, before anything is read or started
    run = RunDir(cfg.output, storage_options)
    if cfg.incremental.previous_run:  # an incremental run: see enrich_dist/incremental.py
        from .incremental import plan_stages

        stages, cfg = plan_stages(run, cfg, stages)  # a new config: cfg itself is left as it was
    elif cfg.incremental.labelled or cfg.incremental.retrain_encoder:
        raise ConfigError("--labelled and --retrain-encoder belong to an incremental run: add --previous-run OLD_RUN")
    records = [stage_record(name) for name in stages]
    check_compatible(run, cfg, stages)
    preflight(run, cfg, stages, storage_options)
    ctx = Context(cfg, storage_options)
    results = {}
    with ray_session(cfg.ray_address, cfg.num_cpus):
        prepare(records, run, ctx)
        for record in records:
            name = record.name
            skipped = _not_applicable(run, cfg, name, results, len(records))
            if skipped:
                log.info("stage %s: skipped, %s", name, skipped)
                results[name] = {"skipped": skipped}
                if name not in (_read_state(run) or {}).get("stages", {}):  # say so once in run.json
                    now = _now()
                    _record(run, cfg, name, {"started": now, "ended": now, "seconds": 0.0, "stats": results[name],
                                             "invariants": {"skipped": skipped, "ok": True}})
                continue
            log.info("stage %s: %s on %s", name, "already complete" if is_done(record, run) else "starting", run.uri)
            started, t0 = _now(), time.monotonic()
            try:
                outcome = execute(record, run, ctx, verify_after=True)
            except InvariantError:
                raise
            except ValueError as exc:
                if name != "evaluate" or len(records) == 1:
                    raise
                # in a whole-pipeline run the evaluation is an extra: data it cannot use is reported, not fatal
                log.warning("stage evaluate: skipped, %s", exc)
                results[name] = {"skipped": str(exc)}
                continue
            if outcome.computed:  # a skipped stage keeps the record of the run that computed it
                entry = {"started": started, "ended": _now(), "seconds": round(time.monotonic() - t0, 3),
                         "stats": outcome.stats}
                _record(run, cfg, name, {**entry, "invariants": outcome.invariants})
                log.info("stage %s: finished in %.1fs", name, entry["seconds"])
            results[name] = outcome.stats
            if name == "select" and cfg.incremental.previous_run:  # nightly runs: what to send to annotators
                from .export import write_next_to_label

                results["export"] = write_next_to_label(run)
    return results


def _not_applicable(run: RunDir, cfg: RunConfig, name: str, results: dict, n_stages: int) -> str | None:
    """Why this run leaves stage ``name`` out (None: it runs)."""
    if name == "train-encoder" and cfg.embed.embedder not in ("vae", "contrastive"):
        return f"embedder {cfg.embed.embedder!r} needs no encoder"
    if name == "select" and results.get("incremental", {}).get("n_to_rank") == 0:
        return "the incremental run found no new or changed image to rank"
    if name == "evaluate" and n_stages > 1 and not _has_targets(run, cfg.evaluate.task):
        return f"the manifest has no {_TARGETS[cfg.evaluate.task]}"
    return None
