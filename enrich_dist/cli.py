"""The ``enrich`` command line: parses arguments and calls the pipeline, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import (
    CHOICES,
    SECTION_TYPES,
    SETTING_TYPES,
    RunConfig,
    load_config,
    parse_list,
    parse_size,
    validate,
)
from .errors import EXIT_BUG, EXIT_CONFIG, EXIT_DATA, EXIT_INFRA, ConfigError, exit_code
from .pipeline import STAGES, run_stages
from .schema import REPORT_INDEX
from .storage import join_uri

log = logging.getLogger("enrich_dist")
DEMO_EPOCHS = 30  # beta-VAE only: 30 epochs of the 2,700 demo training images (about 1,300 steps), where it starts to separate views
# The demo evaluates subsets with the small CNN at 16x16 pixels and 2 base channels: on the demo
# archive's A4C-vs-NT task it reaches AUC 0.97-0.99 on the whole training set and 0.92-0.94 on 7 %
# subsets (two patient splits), so the budgets differ. The linear probe stays near 0.64-0.66 at any size
# (too weak to show anything) and the CNN at 32 pixels with 8 channels reaches 0.98-1.0 from 7 % on
# (saturated).
DEMO_MODEL = ("cnn", 16, 2)  # model, image size, width

# the config sections each command takes options of (run and demo: every stage's)
SECTIONS = ("manifest", "encoder", "embed", "similarity", "select", "evaluate", "report", "incremental")
COMMAND_SECTIONS = {
    "demo": ("encoder", "embed", "similarity", "select", "evaluate", "report"),
    "run": SECTIONS,
    "manifest": ("manifest",),
    "train-encoder": ("encoder",),
    "embed": ("embed",),
    "similarity": ("similarity",),
    "select": ("select",),
    "evaluate": ("evaluate",),
    "report": ("report",),
}
# earlier spellings, accepted for one release with a warning: config key -> (old flag, the commands that take it)
DEPRECATED = {
    "embed.device": ("--device", ("demo", "run", "embed")),
    "evaluate.replicates": ("--replicates", ("evaluate",)),
    "evaluate.budgets": ("--budgets", ("evaluate",)),
    "evaluate.epochs": ("--epochs", ("evaluate",)),
}


def _settings(section: str) -> list[dataclasses.Field]:
    """The settings of a config section that have a command-line option (``config.option``)."""
    return [f for f in dataclasses.fields(SECTION_TYPES[section]) if "flag" in f.metadata]


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}"


# config key -> its option, for messages that name both
FLAGS = {f"{section}.{f.name}": f.metadata["flag"] for section in SECTIONS for f in _settings(section)}


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _help(f: dataclasses.Field) -> str:
    """The option's help: the field's, with its default appended unless the help words the default itself."""
    text = f.metadata["help"]
    if "default" in text or "action" in f.metadata or f.default is None:
        return text
    return f"{text} (default {_shown(f.default)})"


def _add_section_options(p: argparse.ArgumentParser, section: str) -> None:
    for f in _settings(section):
        kwargs: dict = {"dest": _dest(section, f.name), "help": _help(f)}
        if "action" in f.metadata:
            kwargs.update(action=f.metadata["action"], default=None)
        elif (section, f.name) in CHOICES:
            kwargs["choices"] = [str(c) for c in CHOICES[section, f.name]]
        else:
            kwargs["metavar"] = f.metadata["flag"].lstrip("-").replace("-", "_").upper()
        p.add_argument(f.metadata["flag"], **kwargs)


def _type_name(hint) -> str:
    """``int``, ``float | None``, ``tuple[float, ...]``: an annotation as written, without ``| None``."""
    name = hint.__name__ if isinstance(hint, type) else str(hint)
    return name.replace(" | None", "")


def _parse(section: str, f: dataclasses.Field, value):
    """A command-line value as the setting's type (from the dataclass annotation)."""
    if isinstance(value, bool):
        return value
    hint = _type_name(SETTING_TYPES[section][f.name])
    if f.metadata.get("none") and str(value).strip().lower() == "none":
        return () if hint.startswith("tuple") else None
    if hint.startswith("tuple[int | float | str"):
        return tuple(parse_size(b) for b in parse_list(value, str))
    if hint.startswith("tuple"):
        return tuple(parse_list(value))
    if hint == "int | float | str":
        return parse_size(value)
    if hint == "int":
        return int(value)
    if hint == "float":
        return float(value)
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="run directory: local folder or URI (s3://bucket/prefix)")
    p.add_argument("--config", help="YAML or JSON config file (sections: manifest, encoder, embed, similarity, select, evaluate)")
    p.add_argument("--ray-address", help="Ray cluster to attach to (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument(
        "--storage-options", type=json.loads, default=None,
        help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; credentials come from the environment',
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _deprecated_options(p: argparse.ArgumentParser, command: str) -> None:
    for key, (old, commands) in DEPRECATED.items():
        if command in commands:
            p.add_argument(old, dest=f"deprecated__{_dest(*key.split('.'))}", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``enrich`` command."""
    parser = argparse.ArgumentParser(prog="enrich", description="ENRICH redundancy analysis for image archives")
    parser.add_argument("--version", action="version", version=f"enrich {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="make a synthetic echo archive in RUN/archive, then run every stage")
    demo.add_argument("--images", type=int, default=3000, help="synthetic images (default 3000)")
    demo.add_argument(
        "--profile", choices=["uniform", "uneven"], default="uniform",
        help="synthetic redundancy: uniform (the paper's averages, default) or uneven (long and short clips, a rare view, "
        "as raw archives hold it)",
    )
    run = sub.add_parser("run", help="every stage in order")
    run.add_argument("--input", required=True, help="folder, URI prefix, or .csv/.parquet table with a uri column")
    man = sub.add_parser("manifest", help="list the archive's images")
    man.add_argument("--input", required=True, help="folder, URI prefix, or .csv/.parquet table with a uri column")
    enc = sub.add_parser("train-encoder", help="fit the encoder (beta-VAE or contrastive) on a sample")
    enc.add_argument(
        "--embedder", dest=_dest("embed", "embedder"), choices=["vae", "contrastive"],
        help="which encoder to train (default: the embed stage's embedder)",
    )
    emb = sub.add_parser("embed", help="embed every image")
    sim = sub.add_parser("similarity", help="all-pairs cosine similarity statistics")
    sel = sub.add_parser("select", help="rank images from least to most redundant")
    evl = sub.add_parser("evaluate", help="train models on ENRICH vs random subsets and compare them")
    rep = sub.add_parser("report", help="write report/index.html")
    pln = sub.add_parser("plan", help="the similarity and select stages' plans for N images on a cluster: tiles, "
                         "memory, bytes, products, projected time (calibrated by short runs here)")
    pln.add_argument("--images", type=int, required=True, help="archive size N")
    pln.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    pln.add_argument("--similarity-mode", choices=["exact", "approx"], default="exact", help="default exact")
    pln.add_argument("--nodes", type=int, default=1, help="worker nodes of the target cluster (default 1)")
    pln.add_argument("--cpus", type=int, help="CPUs per node (default: this machine's)")
    pln.add_argument("--gpus", type=int, default=0, help="GPUs per node (default 0)")
    pln.add_argument("--memory", help="memory per node, e.g. 64G (default: not checked)")
    pln.add_argument("--max-memory", default="2G", help="the similarity stage's --max-memory (default 2G)")
    pln.add_argument("--select-mode", choices=["exact", "batch", "cells"], default="exact", help="default exact")
    pln.add_argument("--cell-size", type=int, default=1024, help="cells mode: images per cell (default 1024)")
    pln.add_argument("--replicates", type=int, default=10, help="the select stage's replicates (default 10)")
    pln.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                     help="skip the short measured run (no CPU time projected)")
    pln.add_argument("--ray-address", help="calibrate on this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")
    pln.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    exp = sub.add_parser("export", help="the images to label first: csv, parquet, Label Studio tasks or a folder of links")
    exp.add_argument("--output", required=True, help="the run dir (local path or s3://...)")
    size = exp.add_mutually_exclusive_group(required=True)
    size.add_argument("--n", type=int, help="the first N images of the ranking")
    size.add_argument("--budget", type=float, help="the first fraction of the ranking, e.g. 0.07")
    exp.add_argument("--replicate", type=int, default=0, help="which replicate's ranking (default 0)")
    exp.add_argument("--format", dest="export_format", choices=["csv", "parquet", "labelstudio", "links"], default="csv",
                     help="csv/parquet: a table file; labelstudio: a folder with tasks.json; links: a folder of "
                     "symlinks (local) or copies (object stores), named by rank (default csv)")
    exp.add_argument("--to", required=True, help="the file (csv, parquet) or folder (labelstudio, links) to write")
    exp.add_argument("--presign", help="object-store uris: add presigned read URLs valid this long, e.g. 7d, 12h")
    exp.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options as JSON")
    exp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = {"demo": demo, "run": run, "manifest": man, "train-encoder": enc, "embed": emb, "similarity": sim,
                "select": sel, "evaluate": evl, "report": rep}
    for command, p in commands.items():
        _common(p)
        for section in COMMAND_SECTIONS[command]:
            _add_section_options(p, section)
        _deprecated_options(p, command)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: file (if any), then command-line options (generated from the config's settings)."""
    cfg = load_config(args.config)
    cfg.output = args.output
    cfg.input = getattr(args, "input", None) or cfg.input
    cfg.ray_address = args.ray_address or cfg.ray_address
    cfg.num_cpus = args.num_cpus or cfg.num_cpus
    for key, (old, _) in DEPRECATED.items():
        value = getattr(args, f"deprecated__{_dest(*key.split('.'))}", None)
        if value is not None:
            log.warning("%s is deprecated and will be removed in the next release: use %s", old, FLAGS[key])
            if getattr(args, _dest(*key.split(".")), None) is None:
                setattr(args, _dest(*key.split(".")), value)
    if getattr(args, _dest("embed", "embeddings"), None) and not getattr(args, _dest("embed", "embedder"), None):
        setattr(args, _dest("embed", "embedder"), "byo")
    for section in SECTIONS:
        for f in _settings(section):
            value = getattr(args, _dest(section, f.name), None)
            if value is None:
                continue
            try:
                setattr(getattr(cfg, section), f.name, _parse(section, f, value))
            except ValueError as exc:
                raise ConfigError(f"{f.metadata['flag']} {value!r}: {exc}") from None
    validate(cfg, FLAGS)
    return cfg


def _stages_for(command: str) -> tuple[str, ...]:
    if command in ("run", "demo"):
        return STAGES
    return (command,)


def _export(args: argparse.Namespace) -> int:
    """``enrich export``: no Ray, no config; a bad setting or a missing stage exits 2 with the fix."""
    from .export import export

    try:
        export(args.output, args.to, args.export_format, n=args.n, budget=args.budget, replicate=args.replicate,
               presign=args.presign, storage_options=args.storage_options)
    except Exception as exc:  # noqa: BLE001 - every failure leaves with its documented exit status
        return _failed(exc)
    return 0


def _failed(exc: Exception) -> int:
    """Log why a command failed and return its exit status (enrich_dist/errors.py): 2 config, 3 data, 4 infrastructure."""
    code = exit_code(exc)
    if code == EXIT_BUG:
        raise exc  # a defect: the traceback is the report
    kind = {EXIT_CONFIG: "configuration", EXIT_DATA: "input or run dir", EXIT_INFRA: "infrastructure"}[code]
    log.error("%s (exit %d: %s)", exc, code, kind)
    log.debug("details", exc_info=exc)
    return code


def _plan(args: argparse.Namespace) -> int:
    """``enrich plan``: print the similarity and select plans; Ray starts only for the similarity calibration."""
    from . import sizing
    from .config import SimilarityConfig, parse_memory

    try:
        cluster = sizing.Cluster(nodes=args.nodes, cpus=args.cpus or sizing.Cluster().cpus, gpus=args.gpus,
                                 memory=parse_memory(args.memory) if args.memory else 0)
        cfg = SimilarityConfig(mode=args.similarity_mode, max_memory=args.max_memory)
        if min(args.images, args.dim, args.nodes, cluster.cpus) < 1 or args.gpus < 0:
            raise ConfigError("--images, --dim, --nodes and --cpus must be >= 1, --gpus >= 0")
        plan = (sizing.exact_plan(args.images, args.dim, cluster, cfg) if args.similarity_mode == "exact"
                else sizing.approx_plan(args.images, args.dim, cfg))
        if min(args.cell_size, args.replicates) < 1:
            raise ConfigError("--cell-size and --replicates must be >= 1")
        select = sizing.select_plan(args.images, args.dim, args.select_mode, args.cell_size, args.replicates)
        calibration = select_calibration = None
        if args.calibrate:
            from .runtime import ray_session

            with ray_session(args.ray_address) as res:
                calibration = sizing.calibrate(res.cpus, args.similarity_mode)
            select_calibration = sizing.calibrate_select(sizing.Cluster().cpus, args.select_mode)
        projection = sizing.project(plan, cluster, calibration)
        select_projection = sizing.project_select(select, cluster, select_calibration)
    except Exception as exc:  # noqa: BLE001 - every failure leaves with its documented exit status
        return _failed(exc)
    if args.json:
        print(json.dumps({"plan": plan, "projection": projection, "select": select,
                          "select_projection": select_projection}, indent=1))
    else:
        print(sizing.describe(plan, projection, cluster))
        print(sizing.describe_select(select, select_projection))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``enrich`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "export":
        return _export(args)
    if args.command == "plan":
        return _plan(args)
    try:
        cfg = config_from_args(args)
        if args.command == "demo":
            from .datasets import make_echo_archive
            from .storage import RunDir

            archive = join_uri(cfg.output, "archive")
            if not RunDir(archive, args.storage_options).exists("manifest.csv"):
                make_echo_archive(
                    archive, args.images, int(getattr(args, _dest("select", "seed")) or 0), profile=args.profile, storage_options=args.storage_options
                )
            cfg.input = join_uri(archive, "manifest.csv")
            if args.config is None:
                if getattr(args, _dest("encoder", "epochs")) is None and cfg.embed.embedder == "vae":
                    cfg.encoder.epochs = DEMO_EPOCHS
                if getattr(args, _dest("evaluate", "model")) is None:
                    cfg.evaluate.model, size, width = DEMO_MODEL
                    cfg.evaluate.image_size = cfg.evaluate.image_size or size
                    cfg.evaluate.width = cfg.evaluate.width or width
        results = run_stages(cfg, _stages_for(args.command), args.storage_options)
    except Exception as exc:  # noqa: BLE001 - every failure leaves with its documented exit status
        # a bad setting, bad input, a lost cluster: the message names the file or key and the fix; the
        # traceback only with --log-level DEBUG (or for a defect, exit 1)
        return _failed(exc)
    if "report" in results:
        log.info("report: %s", join_uri(cfg.output, REPORT_INDEX))
    return 0
