"""The generic stage executor: the one place that decides skip, run, commit, read back and roll back.

A stage (its record in ``stages.py``) only computes: it writes its artifacts and returns its stats. The
executor around it:

1. skips a stage whose folder holds ``_SUCCESS`` (after the stage's ``when_done`` hook, which refuses a
   completed stage that the request does not match, e.g. another input), unless the stage computes
   incrementally itself (``always_compute``: the evaluation skips its committed models);
2. runs ``compute``, then writes the done marker (``marker`` turns the stats into its content);
3. runs ``cleanup`` (scratch files such as checkpoints, removed only once the marker is down, so a crash
   in between loses nothing);
4. with ``verify``, reads the committed artifacts back (the stage's ``check``); a violated invariant
   clears the marker again and raises :class:`~enrich_dist.invariants.InvariantError`.

Entry points are ``"module:function"`` strings imported on first use, so the registry and this module
load in milliseconds (a wrong command fails before torch or numba is imported).
"""

from __future__ import annotations

import importlib
import json
import logging
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .invariants import InvariantError
from .storage import DONE_NAME, RunDir

log = logging.getLogger("enrich_dist.executor")


@dataclass(frozen=True)
class Stage:
    """One stage, declared once (the registry is ``stages.py``)."""

    name: str  # the command: enrich <name>
    folder: str | None  # the run-dir folder whose _SUCCESS marks it complete (None: always rerun)
    section: str | None  # the config section whose settings decide its artifacts
    compute: str  # "module:function" (run: RunDir, ctx: Context) -> stats; never touches _SUCCESS
    check: str | None = None  # "module:function" (run) -> (record, problems): the read-back invariants
    when_done: str | None = None  # "module:function" (run, ctx, stats): refuse a done stage that does not match
    marker: str | None = None  # "module:function" (run, stats) -> the _SUCCESS content (default: the stats)
    cleanup: str | None = None  # "module:function" (run): scratch to remove once the marker is down
    prepare: str | None = None  # "module:function" (ctx): slow set-up to start as soon as Ray is up (not waited on)
    operational: frozenset[str] = frozenset()  # settings of ``section`` that do not change its artifacts
    needs: tuple[str, ...] = ()  # stages whose artifacts it reads
    always_compute: bool = False  # compute even when done (the stage skips its committed work itself)
    rebuild: str = ""  # the command that rebuilds its artifacts, if not `enrich <name>`

    @property
    def command(self) -> str:
        return self.rebuild or self.name


@dataclass(frozen=True)
class Context:
    """What a stage computes from: the run's config, the storage options, and per-call extras."""

    config: RunConfig = field(default_factory=RunConfig)
    storage_options: dict | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    stats: dict
    computed: bool  # False: skipped, already complete
    invariants: dict | None  # the read-back record when verified


def resolve(entry: str) -> Callable:
    """The function named by a ``"module:function"`` entry point."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def done_record(run: RunDir, folder: str) -> dict:
    """What a stage's done marker recorded (its stats), or {} when the stage is not complete."""
    marker = posixpath.join(folder, DONE_NAME)
    return run.read_json(marker) if run.exists(marker) else {}


def recorded(run: RunDir, stage: Stage, key: str, default: Any) -> Any:
    """A setting that ``stage`` recorded when it finished (e.g. the manifest's NIfTI axis), else ``default``.

    Later stages that must read inputs exactly as an earlier stage did ask here, so only the
    executor reads done records.
    """
    return done_record(run, stage.folder).get(key, default) if stage.folder else default


def is_marker(rel: str) -> bool:
    """Whether a run-dir path is a done marker (copying a stage's files, the marker is the executor's)."""
    return posixpath.basename(rel) == DONE_NAME


def adopt(stage: Stage, run: RunDir, record: dict) -> None:
    """Commit ``stage`` in ``run`` as complete with ``record``: its files were copied whole from another run."""
    if stage.folder is None:
        raise ValueError(f"stage {stage.name} has no folder to commit")
    run.mark_done(stage.folder, record)


def prepare(stages: Sequence[Stage], run: RunDir, ctx: Context) -> None:
    """Start the set-up of every stage that will compute (its workers loading code while earlier work runs)."""
    for stage in stages:
        if stage.prepare and (stage.always_compute or not is_done(stage, run)):
            resolve(stage.prepare)(ctx)


def is_done(stage: Stage, run: RunDir) -> bool:
    return stage.folder is not None and run.is_done(stage.folder)


def verify(stage: Stage, run: RunDir) -> dict:
    """The stage's invariants record (``ok`` true); raises InvariantError naming the artifact and the fix."""
    if stage.check is None:
        return {"ok": True}
    record, problems = resolve(stage.check)(run)
    record["ok"] = not problems
    if problems:
        raise InvariantError(run, stage.name, problems, record, folder=stage.folder, command=stage.command)
    return record


def execute(stage: Stage, run: RunDir, ctx: Context, verify_after: bool = False) -> Outcome:
    """Skip, or compute and commit ``stage`` on ``run`` (see the module docstring)."""
    done = is_done(stage, run)
    if done and not stage.always_compute:
        stats = run.read_json(posixpath.join(stage.folder, DONE_NAME))
        if stage.when_done:
            resolve(stage.when_done)(run, ctx, stats)
        log.info("%s: already complete in %s, skipping", stage.name, run.uri_of(stage.folder))
    else:
        stats = resolve(stage.compute)(run, ctx)
        if stage.folder is not None:
            marker = resolve(stage.marker)(run, stats) if stage.marker else stats
            # a stage that computes while done (it found nothing new) leaves an equal marker untouched
            if not (done and done_record(run, stage.folder) == json.loads(json.dumps(marker))):
                run.mark_done(stage.folder, marker)
        if stage.cleanup:
            resolve(stage.cleanup)(run)
    invariants = None
    if verify_after:
        try:
            invariants = verify(stage, run)
        except InvariantError:  # what was committed is not a complete stage
            if stage.folder is not None:
                run.clear_done(stage.folder)
            raise
    return Outcome(stats, not done, invariants)
