"""Incremental runs: a run over a grown archive that reuses a previous run's encoder and embeddings.

The nightly use case: ``enrich run --input SRC --output NEW --previous-run OLD [--labelled FILE]``.

* Every manifest stage records each file's identity in ``manifest_files/files.parquet``
  (``fingerprints.py``): its path under the archive root, size, and a sampled content digest (local) or
  ETag (object stores). Files match across runs by that path, so a copied or re-mounted archive matches.
* An image (file, ``frame``) is **unchanged** when its file's content identity equals the previous run's.
  Unchanged images that the previous run embedded are **reused**; **changed** files (same uri, other
  fingerprint) and **new** files are embedded fresh; images of files no longer in the archive are
  **removed** (they drop out). Unchanged images the previous run could not embed are **retried**.
* The previous run's encoder is copied (its done record gains ``reused_from``), so the
  embeddings stay comparable; with ``retrain_encoder`` a new encoder is trained and nothing is reused.
* The reused vectors are copied byte for byte: whole embedding shards are written here, shards that
  mix reused and fresh rows get ``embeddings_meta/reused/part-NNNNN.parquet`` and the embed stage embeds
  only their other rows (see the hook in ``embed.py``).
* Selection ranks only the new, changed and retried images, seeded with the already-labelled images:
  ``incremental/scope.parquet`` restricts the select stage's images (``selection/inputs.py``) and
  ``incremental/labelled.csv`` is its ``seed_ids`` file.

The labelled set is ``--labelled FILE`` (uris, or image ids *of the previous run*), else the previous
run's first selected subset: replicate 0 of its ranking up to its smallest budget (and at least all
its seeds, so that a chain of incremental runs never forgets what was labelled; a previous incremental
run that had nothing new to rank passes its own labelled set on). Labelled images whose
file changed or was removed are no longer seeds. Everything is recorded in the stage's done record
and in ``run.json`` under ``stages.incremental``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import schema, stages
from .config import EncoderConfig, RunConfig
from .errors import ConfigError
from .executor import Context, adopt, done_record, execute, is_marker
from .fingerprints import read_fingerprints
from .idlists import read_id_list
from .storage import RunDir, filesystem, split_uri, with_retries

log = logging.getLogger(__name__)

FILES_PATH = schema.MANIFEST_FILES
INCREMENTAL_DIR = schema.INCREMENTAL_DIR
LATEST = "latest"  # --previous-run latest: the newest finished sibling run dir (see resolve_previous)
SCOPE_PATH = schema.SCOPE_PATH
LABELLED_PATH = f"{INCREMENTAL_DIR}/labelled.csv"
IMAGES_PATH = f"{INCREMENTAL_DIR}/images.parquet"
IMAGES = pa.schema([("image_id", pa.int64()), ("state", pa.string()), ("previous_image_id", pa.int64())])
STATES = ("reused", "new", "changed", "retried")  # "unchanged" too when retraining


# ---------------------------------------------------------------------------------------------
# checking the previous run


# encoder settings added after runs were made, with the value that reproduces how those runs trained
_ENCODER_SETTINGS_BEFORE = {
    "kl_warmup": 0.0, "temperature": 0.1, "contrastive_batch_size": 256, "clip_positives": 0.0, "clip_window": 2,
}
_TRAINED = ("vae", "contrastive")  # embedders with an encoder trained on the archive


def _encoder_config(prev: RunDir) -> dict | None:
    """The previous run's encoder settings; ones it predates read as the behaviour it had (no KL warm-up)."""
    if prev.exists("run.json"):
        config = prev.read_json("run.json").get("config") or {}
        if config.get("encoder"):
            return {**_ENCODER_SETTINGS_BEFORE, **config["encoder"]}
    return None


def inherit_encoder_settings(prev: RunDir, cfg: RunConfig) -> RunConfig:
    """``cfg`` with the previous run's encoder settings (its encoder is reused); the device stays this run's."""
    previous = _encoder_config(prev)
    if previous is None:
        return cfg
    known = {f.name for f in dataclasses.fields(EncoderConfig)} - {"device"}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in previous.items() if k in known}
    inherited = dataclasses.replace(cfg.encoder, **settings)
    ours, default = dataclasses.asdict(cfg.encoder), dataclasses.asdict(EncoderConfig())
    chosen = {k: (settings[k], v) for k, v in ours.items()
              if k in settings and _comparable(v) != _comparable(default[k]) and _comparable(v) != _comparable(settings[k])}
    if chosen:  # a setting changed from its default on purpose, and the reused encoder was trained otherwise
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(chosen.items()))
        raise ConfigError(
            f"--previous-run {prev.uri} trained its encoder with other settings ({shown}): an incremental run reuses "
            "that encoder, so leave these at their defaults (they are inherited) or pass --retrain-encoder to "
            "train a new encoder and embed everything fresh"
        )
    diffs = {k: (ours[k], v) for k, v in dataclasses.asdict(inherited).items() if _comparable(ours[k]) != _comparable(v)}
    if diffs:
        shown = ", ".join(f"{k} {b!r} (not {a!r})" for k, (a, b) in sorted(diffs.items()))
        log.info(
            "--previous-run %s: its encoder is reused, so its encoder settings apply: %s (--retrain-encoder trains "
            "a new encoder with this run's settings)", prev.uri, shown,
        )
    return dataclasses.replace(cfg, encoder=inherited)


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def check_previous(prev: RunDir, cfg: RunConfig) -> None:
    """Raise a clear error (naming the previous run dir and the fix) when ``prev`` cannot seed this run."""
    inc = cfg.incremental
    fresh = "or drop --previous-run for a fresh run"
    if prev.uri == RunDir(cfg.output, prev.storage_options).uri:
        raise ConfigError(f"--previous-run {prev.uri} is this run's --output: give the new run its own --output folder")
    if not prev.is_done(schema.MANIFEST_DIR):
        what = "does not exist" if not prev.exists("") else "has no completed manifest stage"
        raise FileNotFoundError(f"--previous-run {prev.uri} {what}: point it at a finished run dir, {fresh}")
    if not prev.exists(schema.located(prev, FILES_PATH)):
        raise ValueError(
            f"--previous-run {prev.uri} has no file fingerprints ({FILES_PATH}; it was made before incremental "
            "runs existed): make one fresh `enrich run` and use that as the previous run"
        )
    if cfg.embed.embedder == "byo":
        raise ConfigError(
            "incremental runs reuse embeddings the tool computed; with --embedder byo import the grown "
            f"embeddings file in a fresh run instead ({fresh})"
        )
    prev_axis = done_record(prev, schema.MANIFEST_DIR).get("nifti_axis", cfg.manifest.nifti_axis)
    if prev_axis != cfg.manifest.nifti_axis:
        raise ConfigError(
            f"--previous-run {prev.uri} sliced NIfTI volumes along axis {prev_axis}, this run asks for "
            f"{cfg.manifest.nifti_axis}: use --nifti-axis {prev_axis}, {fresh}"
        )
    if inc.retrain_encoder:
        return
    for stage, command in ((schema.ENCODER_DIR, "train-encoder"), (schema.EMBEDDINGS_DIR, "embed")):
        if stage == schema.ENCODER_DIR and cfg.embed.embedder not in _TRAINED:
            continue
        if not prev.is_done(stage):
            raise FileNotFoundError(
                f"--previous-run {prev.uri} has no completed {stage!r} stage: finish it with "
                f"`enrich {command} --output {prev.uri}`, or pass --retrain-encoder to embed everything fresh"
            )
    ident_path = schema.located(prev, schema.EMBEDDER_IDENTITY)
    held = prev.read_json(ident_path) if prev.exists(ident_path) else {"embedder": "vae"}
    held = {k: v for k, v in held.items() if k in ("embedder", "pixel_size")}
    if held != cfg.embed.identity():
        raise ConfigError(
            f"--previous-run {prev.uri} holds embeddings from {held}, this run asks for {cfg.embed.identity()}: "
            "embeddings of different embedders are not comparable; use the previous run's embedder options, "
            "or pass --retrain-encoder to embed everything fresh"
        )
    if cfg.embed.embedder in _TRAINED:
        previous = _encoder_config(prev)
        if previous is not None:
            ours = cfg.to_dict()["encoder"]
            diffs = {k: (previous.get(k), v) for k, v in ours.items() if _comparable(previous.get(k)) != _comparable(v)}
            if diffs:
                shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diffs.items()))
                raise ValueError(
                    f"--previous-run {prev.uri} trained its encoder with other settings ({shown}): an incremental "
                    "run reuses that encoder, so use the previous run's encoder options (or its --config), or "
                    "pass --retrain-encoder to train a new encoder and embed everything fresh"
                )


# ---------------------------------------------------------------------------------------------
# what changed


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    frames = table["frame"].fill_null(-1).to_pylist()
    return list(zip(table["uri"].to_pylist(), frames, strict=True))


def _fingerprints(run: RunDir) -> dict:
    """uri -> Fingerprint of the files a run's manifest recorded (fingerprints.py)."""
    return {f.uri: f for f in read_fingerprints(run.read_table(schema.located(run, FILES_PATH)))}


def match_files(new_fp: dict, old_fp: dict) -> dict[str, tuple[str, bool]]:
    """new uri -> (the previous run's uri of the same file, whether its content is unchanged).

    Files match by their path under the archive root (so a copied or re-mounted archive matches), else
    by uri when either run lacks that path. A new uri absent from the result is a new file.
    """
    old_by_key = {f.key: f for f in old_fp.values()}
    out = {}
    for uri, f in new_fp.items():
        old = old_by_key.get(f.key) or old_fp.get(uri)
        if old is not None:
            out[uri] = (old.uri, f.same_content(old))
    return out


def diff_manifests(run: RunDir, prev: RunDir) -> tuple[pa.Table, dict]:
    """Per ok image of ``run``: its state and the previous run's id when reused; and the counts."""
    cols = ["image_id", "uri", "frame", "status"]
    new, old = run.read_table(schema.MANIFEST_DIR, columns=cols), prev.read_table(schema.MANIFEST_DIR, columns=cols)
    new_fp, old_fp = _fingerprints(run), _fingerprints(prev)
    embedded = (
        set(prev.read_table(schema.EMBEDDINGS_DIR, columns=["image_id"])["image_id"].to_pylist())
        if prev.shards(schema.EMBEDDINGS_DIR)
        else set()
    )
    old_id = dict(zip(_keys(old), old["image_id"].to_pylist(), strict=True))
    matched = match_files(new_fp, old_fp)
    ids, states, previous = [], [], []
    for image_id, key, status in zip(new["image_id"].to_pylist(), _keys(new), new["status"].to_pylist(), strict=True):
        if status != "ok":
            continue
        old_uri, same = matched.get(key[0], (None, False))
        old_key = (old_uri, key[1])
        if old_uri is None:
            state, before = "new", None
        elif not same:
            state, before = "changed", None
        elif old_id.get(old_key) in embedded:
            state, before = "reused", old_id[old_key]
        else:
            state, before = "retried", None
        ids.append(image_id)
        states.append(state)
        previous.append(before)
    table = pa.table({"image_id": ids, "state": states, "previous_image_id": previous}, schema=IMAGES)
    still_there = {old_uri for old_uri, _ in matched.values()}
    counts = {f"n_{s}": states.count(s) for s in STATES}
    counts["n_removed"] = sum(1 for u in old["uri"].to_pylist() if u not in still_there)
    counts["n_images"] = new.num_rows
    counts["n_previous_images"] = old.num_rows
    return table, counts


# ---------------------------------------------------------------------------------------------
# reuse: encoder and embeddings


def copy_encoder(run: RunDir, prev: RunDir) -> dict:
    """Copy ``encoder/`` from the previous run (done marker last, with ``reused_from``)."""
    run.remove(schema.ENCODER_DIR)
    for rel in prev.listdir(schema.ENCODER_DIR):
        if not is_marker(rel):
            run.write_bytes(rel, prev.read_bytes(rel))
    adopt(stages.TRAIN_ENCODER, run, {**done_record(prev, schema.ENCODER_DIR), "reused_from": prev.uri})
    return {"encoder": "reused", "encoder_from": prev.uri}


def _shard_of_ids(run: RunDir) -> tuple[dict[int, int], dict[int, int]]:
    """New image id -> manifest shard index, and each shard's number of ok rows."""
    shard_of, ok_rows = {}, {}
    for index, path in run.shards(schema.MANIFEST_DIR).items():
        part = run.read_table(path, columns=["image_id", "status"])
        for i in part["image_id"].to_pylist():
            shard_of[i] = index
        ok_rows[index] = int(pc.sum(pc.equal(part["status"], "ok")).as_py() or 0)
    return shard_of, ok_rows


def copy_embeddings(run: RunDir, prev: RunDir, images: pa.Table) -> dict:
    """Write the reused vectors: whole shards where every ok row is reused, else ``embeddings_meta/reused/``."""
    reused = images.filter(pc.equal(images["state"], "reused"))
    new_of_old = dict(zip(reused["previous_image_id"].to_pylist(), reused["image_id"].to_pylist(), strict=True))
    shard_of, ok_rows = _shard_of_ids(run)
    pieces: dict[int, list[pa.Table]] = defaultdict(list)
    dim = None
    for path in prev.shards(schema.EMBEDDINGS_DIR).values():
        table = prev.read_table(path, columns=["image_id", "embedding"])
        dim = table.schema.field("embedding").type.list_size
        old_ids = table["image_id"].to_pylist()
        take = [i for i, o in enumerate(old_ids) if o in new_of_old]
        if not take:
            continue
        rows = table.take(pa.array(take, pa.int64()))
        new_ids = [new_of_old[old_ids[i]] for i in take]
        rows = rows.set_column(0, "image_id", pa.array(new_ids, pa.int64()))
        shards = np.array([shard_of[i] for i in new_ids])
        for s in np.unique(shards):
            pieces[int(s)].append(rows.take(pa.array(np.flatnonzero(shards == s))))
    run.remove(schema.EMBED_REUSED_DIR)  # the embed stage merges the rows copied there
    whole = partial = 0
    for s, parts in sorted(pieces.items()):
        table = pa.concat_tables(parts).sort_by("image_id").cast(schema.embeddings_schema(dim))
        if table.num_rows == ok_rows[s]:
            run.write_table(f"{schema.EMBEDDINGS_DIR}/part-{s:05d}.parquet", table)
            whole += 1
        else:
            run.write_table(f"{schema.EMBED_REUSED_DIR}/part-{s:05d}.parquet", table)
            partial += 1
    return {"n_reused_embeddings": reused.num_rows, "reused_whole_shards": whole, "reused_partial_shards": partial}


# ---------------------------------------------------------------------------------------------
# the labelled seed set and the selection scope


def _seed_entries(path: str, storage_options: dict | None) -> list[int | str]:
    from .storage import read_uri

    try:
        data = read_uri(path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"--labelled {path} not found: give a file of uris or previous-run image ids") from None
    try:
        return read_id_list(path, data)
    except ValueError as exc:
        raise ValueError(f"--labelled {path}: {exc}") from None


def _default_labelled(prev: RunDir) -> tuple[list[int], str]:
    """Replicate 0 of the previous ranking up to its smallest budget (and at least all its seeds)."""
    if not prev.is_done(schema.SELECTION_DIR) and prev.exists(LABELLED_PATH):
        # an incremental run that had nothing new to rank: its own labelled set carries over
        ids = [int(v) for v in prev.read_bytes(LABELLED_PATH).decode().split()[1:]]
        return ids, prev.uri_of(LABELLED_PATH)
    if not prev.is_done(schema.SELECTION_DIR):
        raise FileNotFoundError(
            f"--previous-run {prev.uri} has no completed selection to take the labelled images from: pass "
            "--labelled FILE (uris or the previous run's image ids of the images already labelled)"
        )
    ranking = prev.read_table(schema.RANKING_PATH).filter(pc.equal(pc.field("replicate"), 0)).sort_by("rank")
    budgets = [b["n_images"] for b in prev.read_json(schema.SELECTION_STATS).get("budgets", [])]
    n_seeds = int(pc.sum(ranking["is_seed"]).as_py() or 0)
    count = max(n_seeds, min(budgets) if budgets else n_seeds)
    source = f"{prev.uri_of(schema.RANKING_PATH)} replicate 0, first {count} images"
    return ranking["image_id"].to_pylist()[:count], source


def labelled_ids(run: RunDir, prev: RunDir, cfg: RunConfig, images: pa.Table) -> tuple[list[int], dict]:
    """This run's image ids of the labelled images that stay seeds (unchanged files), and counts."""
    cols = ["image_id", "uri", "frame"]
    new, old = run.read_table(schema.MANIFEST_DIR, columns=cols), prev.read_table(schema.MANIFEST_DIR, columns=cols)
    path = cfg.incremental.labelled
    if path:
        entries, source = _seed_entries(path, run.storage_options), path
    else:
        entries, source = _default_labelled(prev)
    # the previous run's files under this run's uris (a copied or re-mounted archive has other uris)
    now_at = {old_uri: uri for uri, (old_uri, _) in match_files(_fingerprints(run), _fingerprints(prev)).items()}
    old_key = {i: (now_at.get(uri, uri), frame)
               for i, (uri, frame) in zip(old["image_id"].to_pylist(), _keys(old), strict=True)}
    new_id = dict(zip(_keys(new), new["image_id"].to_pylist(), strict=True))
    by_uri: dict[str, list[int]] = defaultdict(list)
    for (uri, _frame), i in new_id.items():
        by_uri[uri].append(i)
    for old_uri, uri in now_at.items():  # labelled uris may name the files where the previous run saw them
        if old_uri not in by_uri and uri in by_uri:
            by_uri[old_uri] = by_uri[uri]
    old_uris = set(old["uri"].to_pylist())
    state = dict(zip(images["image_id"].to_pylist(), images["state"].to_pylist(), strict=True))
    wanted, unknown, removed = [], [], 0
    for e in entries:
        if isinstance(e, int):
            if e not in old_key:
                unknown.append(e)
            elif old_key[e] in new_id:
                wanted.append(new_id[old_key[e]])
            else:
                removed += 1
        elif e in by_uri:
            wanted += by_uri[e]
        elif e in old_uris:
            removed += 1
        else:
            unknown.append(e)
    if unknown:
        shown = ", ".join(map(str, unknown[:5]))
        raise ValueError(
            f"--labelled {source}: {len(unknown)} entries are neither uris of the archive nor image ids of "
            f"--previous-run {prev.uri}: {shown}; list uris, or image ids as the previous run numbered them"
        )
    wanted = list(dict.fromkeys(wanted))
    # new labels count as labelled; a changed or removed file is no longer what was labelled
    keep = [i for i in wanted if state.get(i) in ("reused", "unchanged", "retried", "new")]
    dropped = removed + len(wanted) - len(keep)
    if dropped:
        log.info("incremental: %d labelled entries are changed, removed or not embeddable and are not seeds", dropped)
    return keep, {"labelled_source": source, "n_labelled": len(keep), "n_labelled_dropped": dropped}


def write_scope(run: RunDir, images: pa.Table, labelled: list[int]) -> dict:
    """The images the selection ranks (labelled + new + changed + retried) and the seed id file."""
    fresh = images.filter(pc.is_in(images["state"], pa.array(["new", "changed", "retried"])))["image_id"].to_pylist()
    scope = sorted(set(fresh) | set(labelled))
    run.write_table(SCOPE_PATH, pa.table({"image_id": pa.array(scope, pa.int64())}))
    run.write_bytes(LABELLED_PATH, ("image_id\n" + "".join(f"{i}\n" for i in labelled)).encode())
    return {"n_to_rank": len(set(fresh) - set(labelled)), "n_scope": len(scope)}


def check_incremental(run: RunDir) -> tuple[dict, list[str]]:
    """Invariants of the stage's artifacts: scope and seeds are ok manifest rows, seeds inside the scope."""
    ok = run.read_table(schema.MANIFEST_DIR, columns=["image_id", "status"])
    ok_ids = set(ok.filter(pc.equal(ok["status"], "ok"))["image_id"].to_pylist())
    scope = run.read_table(SCOPE_PATH)["image_id"].to_pylist()
    seeds = [int(v) for v in run.read_bytes(LABELLED_PATH).decode().split()[1:]]
    problems = []
    if not set(scope) <= ok_ids:
        problems.append("scope.parquet lists images that are not ok manifest rows")
    if not set(seeds) <= set(scope):
        problems.append("labelled.csv lists images outside scope.parquet")
    if len(set(scope)) != len(scope):
        problems.append("scope.parquet repeats image ids")
    return {"rows": len(scope), "seeds": len(seeds)}, problems


def resolve_previous(run: RunDir, value: str) -> str | None:
    """``latest``: the newest sibling of ``run`` (same parent, name sorting before it) holding a finished run.

    Made for dated run dirs (``OUTPUT/YYYY-MM-DD``): each night builds on the last night that finished.
    None when there is no such sibling. Any other value is returned as it is.
    """
    if value != LATEST:
        return value
    protocol, path = split_uri(run.uri)
    parent, own = posixpath.split(path.rstrip("/")) if protocol != "file" else os.path.split(path)
    fs, _ = filesystem(run.uri, run.storage_options)
    try:
        entries = with_retries(lambda: fs.ls(parent, detail=True), run.uri)
    except FileNotFoundError:
        entries = []
    names = sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
    )
    for name in reversed([n for n in names if n < own]):
        uri = os.path.join(parent, name) if protocol == "file" else f"{protocol}://{parent}/{name}"
        candidate = RunDir(uri, run.storage_options)
        finished = candidate.is_done(schema.SELECTION_DIR) or candidate.is_done(INCREMENTAL_DIR)
        if finished and candidate.is_done(schema.EMBEDDINGS_DIR) and candidate.exists(
            schema.located(candidate, FILES_PATH)
        ):
            return candidate.uri
    return None


def plan_stages(run: RunDir, cfg: RunConfig, stages: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], RunConfig]:
    """The stages of an incremental run (``incremental`` after the manifest, no evaluation) and its config.

    The config is a new one, ``cfg`` is left as it was: the previous run resolved, the labelled file as
    the selection's seeds, and, when the previous run's encoder is reused, that encoder's settings (a
    run may not claim settings its reused encoder was not trained with; the differences are logged).
    With ``previous_run`` "latest" and no finished sibling run (the first night), the run is a fresh one.
    """
    previous = resolve_previous(run, cfg.incremental.previous_run)
    if previous is None:
        log.warning(
            "--previous-run latest: no finished run dir beside %s to build on; this is a fresh run", run.uri
        )
        return tuple(stages), dataclasses.replace(cfg, incremental=type(cfg.incremental)())
    if cfg.select.seed_ids:
        raise ConfigError(
            "--seed-ids cannot be combined with --previous-run: list the already-labelled images with --labelled FILE"
        )
    cfg = dataclasses.replace(
        cfg,
        incremental=dataclasses.replace(cfg.incremental, previous_run=previous),
        select=dataclasses.replace(cfg.select, seed_ids=run.uri_of(LABELLED_PATH), scope=run.uri_of(SCOPE_PATH)),
    )
    prev = RunDir(previous, run.storage_options)
    if not cfg.incremental.retrain_encoder and cfg.embed.embedder in _TRAINED:
        cfg = inherit_encoder_settings(prev, cfg)
    if not run.is_done(INCREMENTAL_DIR):
        check_previous(prev, cfg)  # fail before any work
    out: list[str] = []
    for name in stages:
        if name == "evaluate":
            log.info("stage evaluate: skipped in an incremental run (it ranks new images; run fresh to evaluate)")
            continue
        out.append(name)
        if name == "manifest":
            out.append("incremental")
    if "incremental" not in out and not run.is_done(INCREMENTAL_DIR):
        raise ValueError(
            f"{run.uri} has no completed incremental stage: run `enrich run --input SRC --output {run.uri} "
            "--previous-run OLD` first"
        )
    return tuple(out), cfg


# ---------------------------------------------------------------------------------------------
# the stage


def run_incremental(run: RunDir, cfg: RunConfig, storage_options: dict | None = None) -> dict:
    """Compare with the previous run, copy what stays valid, write the selection's scope and seeds."""
    return execute(stages.INCREMENTAL, run, Context(cfg, storage_options)).stats


def incremental_matches(run: RunDir, ctx: Context, stats: dict) -> None:
    """A completed incremental stage was made from this run's previous run, or the run is refused."""
    prev = RunDir(ctx.config.incremental.previous_run, ctx.storage_options)
    if stats.get("previous_run") != prev.uri:
        raise ConfigError(
            f"{run.uri} was made incrementally from {stats.get('previous_run')!r}, not {prev.uri!r}: "
            "use a new --output folder"
        )


def compute_incremental(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): what changed, what is reused, what to rank."""
    cfg = ctx.config
    prev = RunDir(cfg.incremental.previous_run, ctx.storage_options)
    run.require(schema.MANIFEST_DIR, "manifest --input SRC")
    check_previous(prev, cfg)
    start = time.monotonic()
    images, stats = diff_manifests(run, prev)
    stats = {"previous_run": prev.uri, "retrain_encoder": cfg.incremental.retrain_encoder, **stats}
    if cfg.incremental.retrain_encoder:
        # nothing is reused: every image is embedded fresh with the new encoder; unchanged ones are not ranked
        states = ["unchanged" if s == "reused" else s for s in images["state"].to_pylist()]
        images = images.set_column(1, "state", pa.array(states, pa.string()))
        stats.update(encoder="retrained: nothing reused", n_unchanged=stats["n_reused"], n_reused=0)
        stats["n_reused_embeddings"] = 0
        log.info("incremental: --retrain-encoder given, training a new encoder and embedding every image fresh")
    else:
        if cfg.embed.embedder in _TRAINED and not run.is_done(schema.ENCODER_DIR):
            stats.update(copy_encoder(run, prev))
        elif cfg.embed.embedder not in _TRAINED:
            stats["encoder"] = f"none ({cfg.embed.embedder} embedder)"
        if not run.is_done(schema.EMBEDDINGS_DIR):
            stats.update(copy_embeddings(run, prev, images))
    run.write_table(IMAGES_PATH, images)
    labelled, lab_stats = labelled_ids(run, prev, cfg, images)
    if not labelled:
        raise ValueError(
            f"none of the labelled images ({lab_stats['labelled_source']}) is still in the archive unchanged, so "
            "there is nothing to rank the new images against: pass --labelled FILE with current images, or "
            "drop --previous-run for a fresh run"
        )
    stats.update(lab_stats)
    stats.update(write_scope(run, images, labelled))
    stats["seconds"] = round(time.monotonic() - start, 3)
    log.info(
        "incremental: %d images reused, %d new, %d changed, %d retried, %d removed; ranking %d against %d labelled",
        stats["n_reused"], stats["n_new"], stats["n_changed"], stats["n_retried"], stats["n_removed"],
        stats["n_to_rank"], stats["n_labelled"],
    )
    return stats
