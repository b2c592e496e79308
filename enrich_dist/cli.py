"""The ``enrich`` command line: parses arguments and calls the pipeline, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import RunConfig, load_config, parse_list, parse_size, validate
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

# option -> (config section, field, parser)
_OVERRIDES = {
    "nifti_axis": ("manifest", "nifti_axis", int),
    "pseudonymise": ("manifest", "pseudonymise", bool),
    "archive_root": ("manifest", "root", str),
    "sample": ("encoder", "sample", parse_size),
    "epochs": ("encoder", "epochs", int),
    "beta": ("encoder", "beta", float),
    "objective": ("encoder", "objective", str),
    "capacity": ("encoder", "capacity", float),
    "learning_rate": ("encoder", "learning_rate", float),
    "kl_warmup": ("encoder", "kl_warmup", float),
    "latent_dim": ("encoder", "latent_dim", int),
    "temperature": ("encoder", "temperature", float),
    "clip_positives": ("encoder", "clip_positives", float),
    "clip_window": ("encoder", "clip_window", int),
    "embed_batch_size": ("embed", "batch_size", int),
    "embedder": ("embed", "embedder", str),
    "embeddings": ("embed", "embeddings", str),
    "pixel_size": ("embed", "pixel_size", int),
    "embed_device": ("embed", "device", str),
    "block_size": ("similarity", "block_size", int),
    "top_k": ("similarity", "top_k", int),
    "thresholds": ("similarity", "thresholds", lambda v: tuple(parse_list(v))),
    "max_memory": ("similarity", "max_memory", str),
    "similarity_mode": ("similarity", "mode", str),
    "n_partitions": ("similarity", "n_partitions", int),
    "nprobe": ("similarity", "nprobe", int),
    "similarity_device": ("similarity", "device", str),
    "precision": ("similarity", "precision", str),
    "edge_threshold": ("similarity", "edge_threshold", lambda v: None if str(v).lower() == "none" else float(v)),
    "max_edge_pairs": ("similarity", "max_edges", int),
    "duplicate_thresholds": (
        "similarity", "duplicate_thresholds", lambda v: () if str(v).lower() == "none" else tuple(parse_list(v))
    ),
    "keep": ("similarity", "keep", str),
    "mode": ("select", "mode", str),
    "seed_size": ("select", "seed_size", parse_size),
    "batch_size": ("select", "batch_size", parse_size),
    "budgets": ("select", "budgets", lambda v: tuple(parse_size(b) for b in parse_list(v, str))),
    "replicates": ("select", "replicates", int),
    "aggregate": ("select", "aggregate", str),
    "seed": ("select", "seed", int),
    "seed_ids": ("select", "seed_ids", str),
    "max_per_clip": ("select", "max_per_clip", int),
    "max_per_patient": ("select", "max_per_patient", int),
    "balance_labels": ("select", "balance_labels", bool),
    "select_workers": ("select", "workers", int),
    "delta": ("select", "delta", float),
    "max_edges": ("select", "max_edges", int),
    "duplicate_threshold": ("select", "duplicate_threshold", float),
    "task": ("evaluate", "task", str),
    "model": ("evaluate", "model", str),
    "eval_replicates": ("evaluate", "replicates", int),
    "eval_budgets": ("evaluate", "budgets", lambda v: tuple(parse_size(b) for b in parse_list(v, str))),
    "eval_epochs": ("evaluate", "epochs", int),
    "image_size": ("evaluate", "image_size", int),
    "test_fraction": ("evaluate", "test_fraction", float),
    "seconds_per_image": ("evaluate", "seconds_per_image", float),
    "gpu_fraction": ("evaluate", "gpu_fraction", float),
    "alpha": ("evaluate", "alpha", float),
    "report_images": ("report", "images", str),
    "previous_run": ("incremental", "previous_run", str),
    "labelled": ("incremental", "labelled", str),
    "retrain_encoder": ("incremental", "retrain_encoder", bool),
}


# old option (its argparse dest after "deprecated_") -> the option that replaces it
DEPRECATED = {"device": "embed_device", "eval_replicates": "eval_replicates", "eval_budgets": "eval_budgets",
              "eval_epochs": "eval_epochs"}

# config key -> the flag that sets it, so a validation error names both
FLAGS = {f"{section}.{field}": "--" + opt.replace("_", "-") for opt, (section, field, _) in _OVERRIDES.items()}


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


def _manifest_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nifti-axis", choices=["0", "1", "2"], help="slice NIfTI volumes: 0 sagittal, 1 coronal, 2 axial (default)")
    p.add_argument(
        "--no-pseudonymise", dest="pseudonymise", action="store_false", default=None,
        help="copy PatientID and DICOM UIDs as they are (default: keyed hashes, key from ENRICH_PSEUDONYM_KEY)",
    )
    p.add_argument(
        "--archive-root",
        help="every image and mask path must lie under this folder or prefix (.., file:// and symlinks resolved); "
        "default: a folder input is its own root, a table's relative paths stay under the table's folder",
    )


def _encoder_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample", help="images to train on: count (5000) or fraction (0.1); default 5000")
    p.add_argument("--epochs", help="training epochs (default 20; the demo trains a beta-VAE for 30)")
    p.add_argument("--objective", choices=["beta", "capacity"], help="plain beta-VAE loss with KL warm-up (default) or capacity-annealed")
    p.add_argument("--learning-rate", help="Adam learning rate of the beta-VAE (default 0.001)")
    p.add_argument("--beta", help="KL weight of the beta-VAE (default 0.1, reached after the warm-up)")
    p.add_argument("--kl-warmup", help="share of the epochs over which beta rises from 0 (default 0.3; 0: none)")
    p.add_argument("--capacity", help="final KL target in nats of the capacity objective (default 25)")
    p.add_argument("--latent-dim", help="embedding size (default 128)")
    p.add_argument("--temperature", help="NT-Xent temperature of the contrastive encoder (default 0.1)")
    p.add_argument(
        "--clip-positives", help="contrastive encoder: share of pairs taken from two nearby frames of one clip when the "
        "manifest has clip_id and frame (default 0: images alone)",
    )
    p.add_argument("--clip-window", help="frames apart that still count as nearby for --clip-positives (default 2)")


def _embed_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedder", choices=["vae", "contrastive", "pixels", "byo"],
        help="contrastive (default): a self-supervised encoder trained on the archive to ignore frame-to-frame "
        "change; vae: the paper's beta-VAE; pixels: downsampled pixels (a baseline); byo: --embeddings FILE",
    )
    p.add_argument("--embeddings", help="bring-your-own embeddings: .parquet/.npz (embedding + image_id or uri) or .npy")
    p.add_argument("--pixel-size", help="side of the pixels embedder's grid (default 16: 256-d)")
    p.add_argument("--embed-batch-size", help="images per encoder batch (default 256)")
    p.add_argument("--embed-device", choices=["auto", "cpu", "cuda"],
                   help="embedding device (default auto: GPU if Ray has one)")
    p.add_argument("--device", dest="deprecated_device", choices=["auto", "cpu", "cuda"], help=argparse.SUPPRESS)


def _similarity_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", help="rows per similarity block (default: chosen from --max-memory)")
    p.add_argument("--top-k", help="neighbors kept per image (default 10)")
    p.add_argument("--thresholds", help="similarity thresholds (default 0.5,0.7,0.9)")
    p.add_argument("--max-memory", help="memory for the similarity stage's buffers, e.g. 4G, 512M (default 2G)")
    p.add_argument("--similarity-mode", choices=["exact", "approx"], help="all pairs (default) or k-means partitions")
    p.add_argument("--n-partitions", help="approx mode: k-means partitions (default about sqrt(N))")
    p.add_argument("--nprobe", help="approx mode: partitions compared with each partition, itself included (default 8)")
    p.add_argument("--similarity-device", choices=["auto", "cpu", "cuda"], help="tile kernel device (default auto)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="GPU product precision (default fp32, exact)")
    p.add_argument("--edge-threshold", help="keep every pair above this in similarity/edges/ (default 0.9; none: off)")
    p.add_argument("--max-edge-pairs", help="most pairs similarity/edges/ may hold before the stage fails (default 50000000)")
    p.add_argument("--duplicate-thresholds", help="near-duplicate groups and removal lists in duplicates/t=…/, "
                   "each >= --edge-threshold (default 0.9,0.98)")
    p.add_argument("--keep", choices=["lowest_id", "central"],
                   help="removal list: which near-duplicate to keep first (default lowest_id; central: most near-duplicates)")


def _select_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode", choices=["batch", "exact", "coverage", "herding"],
        help="exact farthest-first (the default: never behind random in the benchmarks), batch (the paper's rule), "
        "coverage (ProbCover: greedy coverage of delta-balls) or herding (facility location on the same graph)",
    )
    p.add_argument("--delta", help="coverage/herding: similarity above which two images cover each other "
                   "(default: ProbCover's label-free purity rule, recorded in selection.json)")
    p.add_argument("--max-edges", help="coverage/herding: most stored neighbor pairs of the graph (default 50000000)")
    p.add_argument("--duplicate-threshold", help="duplicate guard: no second image of a group of near-duplicates "
                   "(similarity above this) before every group has one (default: off)")
    p.add_argument("--seed-size", help="random seed set: count or fraction (default 0.022)")
    p.add_argument("--batch-size", help="images added per round in batch mode: count or fraction (default 0.11)")
    p.add_argument("--budgets", help="subset sizes to report, fractions or counts (default 0.07,...,1.0)")
    p.add_argument("--replicates", help="independent rankings from different seeds (default 10)")
    p.add_argument("--aggregate", choices=["max", "mean"], help="similarity to the chosen set (default max)")
    p.add_argument("--seed", help="random seed of the selection (and, for demo, of the synthetic archive; default 0)")
    p.add_argument("--seed-ids", help="file of already-labelled image ids or uris (CSV, Parquet or one per line) as the seed set")
    p.add_argument("--max-per-clip", help="at most N images per clip until no other image is left (default: no cap)")
    p.add_argument("--max-per-patient", help="at most N images per patient until no other image is left (default: no cap)")
    p.add_argument("--balance-labels", action="store_true", default=None, help="take labels in turn (round-robin)")
    p.add_argument("--select-workers", help="0: one process; k: k shard actors (default: by archive size)")


def _evaluate_opts(p: argparse.ArgumentParser, old_spellings: bool) -> None:
    p.add_argument("--task", choices=["classification", "segmentation"], help="what the models learn (default classification)")
    p.add_argument("--model", choices=["auto", "linear", "cnn", "resnet", "unet"], help="model per subset (default auto)")
    p.add_argument("--eval-replicates", help="selection replicates to evaluate (default: all)")
    p.add_argument("--eval-budgets", help="budgets to evaluate (default: the selection's)")
    p.add_argument("--eval-epochs", help="training epochs per model (default 5)")
    p.add_argument("--image-size", help="model input size (default: the model's)")
    p.add_argument("--test-fraction", help="test share when the tool makes a patient-disjoint split (default 0.2)")
    p.add_argument("--seconds-per-image", help="expert labelling time per image (default 1 s classification, 300 s segmentation)")
    p.add_argument("--gpu-fraction", help="GPU share per training task when the cluster has GPUs (default 0.25)")
    p.add_argument("--alpha", help="significance level of the Mann-Whitney U tests (default 0.05)")
    if old_spellings:  # `enrich evaluate` of earlier releases; in `run` these names set other stages' settings
        for old in ("replicates", "budgets", "epochs"):
            p.add_argument(f"--{old}", dest=f"deprecated_eval_{old}", help=argparse.SUPPRESS)


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
    run.add_argument(
        "--previous-run",
        help="incremental run: reuse this run dir's encoder and the embeddings of unchanged images, rank only new "
        "ones; 'latest': the newest finished run dir beside --output (dated run dirs; none: a fresh run)",
    )
    run.add_argument(
        "--labelled",
        help="with --previous-run: already-labelled images (uris, or image ids of the previous run) that seed the "
        "ranking (default: the previous run's first selected subset)",
    )
    run.add_argument(
        "--retrain-encoder", action="store_true", default=None,
        help="with --previous-run: train a new encoder and embed every image fresh (nothing is reused)",
    )
    man = sub.add_parser("manifest", help="list the archive's images")
    man.add_argument("--input", required=True, help="folder, URI prefix, or .csv/.parquet table with a uri column")
    enc = sub.add_parser("train-encoder", help="fit the encoder (beta-VAE or contrastive) on a sample")
    enc.add_argument(
        "--embedder", choices=["vae", "contrastive"], help="which encoder to train (default: the embed stage's embedder)"
    )
    emb = sub.add_parser("embed", help="embed every image")
    sim = sub.add_parser("similarity", help="all-pairs cosine similarity statistics")
    sel = sub.add_parser("select", help="rank images from least to most redundant")
    evl = sub.add_parser("evaluate", help="train models on ENRICH vs random subsets and compare them")
    _evaluate_opts(evl, old_spellings=True)
    for p in (demo, run):
        _evaluate_opts(p, old_spellings=False)
    rep = sub.add_parser("report", help="write report/index.html")
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
    for p in (demo, run, man, enc, emb, sim, sel, evl, rep):
        _common(p)
    for p in (run, man):
        _manifest_opts(p)
    for p in (demo, run, enc):
        _encoder_opts(p)
    for p in (demo, run, emb):
        _embed_opts(p)
    for p in (demo, run, sim):
        _similarity_opts(p)
    for p in (demo, run, sel):
        _select_opts(p)
    for p in (demo, run, rep):
        p.add_argument("--report-images", choices=["thumbnails", "none"],
                       help="thumbnails (default): archive images and their uris in the report; none: no image, "
                       "no path (a report to share)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: file (if any), then command-line overrides."""
    cfg = load_config(args.config)
    cfg.output = args.output
    cfg.input = getattr(args, "input", None) or cfg.input
    cfg.ray_address = args.ray_address or cfg.ray_address
    cfg.num_cpus = args.num_cpus or cfg.num_cpus
    if getattr(args, "embeddings", None) and not getattr(args, "embedder", None):
        args.embedder = "byo"
    for old, new in DEPRECATED.items():
        value = getattr(args, f"deprecated_{old}", None)
        if value is not None:
            old_flag, new_flag = "--" + old.removeprefix("eval_").replace("_", "-"), "--" + new.replace("_", "-")
            log.warning("%s is deprecated and will be removed in the next release: use %s", old_flag, new_flag)
            if getattr(args, new, None) is None:
                setattr(args, new, value)
    for opt, (section, field, parse) in _OVERRIDES.items():
        value = getattr(args, opt, None)
        if value is not None:
            try:
                setattr(getattr(cfg, section), field, parse(value))
            except ValueError as exc:
                raise ConfigError(f"--{opt.replace('_', '-')} {value!r}: {exc}") from None
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``enrich`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "export":
        return _export(args)
    try:
        cfg = config_from_args(args)
        if args.command == "demo":
            from .datasets import make_echo_archive
            from .storage import RunDir

            archive = join_uri(cfg.output, "archive")
            if not RunDir(archive, args.storage_options).exists("manifest.csv"):
                make_echo_archive(
                    archive, args.images, int(args.seed or 0), profile=args.profile, storage_options=args.storage_options
                )
            cfg.input = join_uri(archive, "manifest.csv")
            if args.config is None:
                if args.epochs is None and cfg.embed.embedder == "vae":
                    cfg.encoder.epochs = DEMO_EPOCHS
                if args.model is None:
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
