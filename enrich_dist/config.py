"""Configuration: one dataclass per stage, a run config that holds them, sizes as counts or fractions."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

Size = int | float | str


def option(default: Any, flag: str, help: str, **extra: Any) -> Any:
    """A setting with its command-line option, declared once: the CLI is generated from these (``cli.py``).

    ``help`` leaves out the default (the CLI appends it from ``default``) unless it words the default
    itself; ``extra``: ``action`` (``store_true``/``store_false`` for switches), ``none`` (the word
    ``none`` sets None, or an empty list).
    """
    return field(default=default, metadata={"flag": flag, "help": help, **extra})


def parse_size(value: Size) -> int | float:
    """A size written with a decimal point is a fraction of the archive, an integer is a count."""
    if isinstance(value, bool):
        raise ValueError(f"size must be a number, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a fractional size must be in (0, 1], got {value}")
        return value
    text = str(value).strip()
    if "." in text or "e" in text.lower():
        return parse_size(float(text))
    try:
        return parse_size(int(text))
    except ValueError:
        raise ValueError(f"size {value!r} is neither a count (5000) nor a fraction (0.44)") from None


def resolve_size(value: Size, n: int) -> int:
    """A size as a count of images out of ``n`` (fractions round to nearest, at least 1 when n > 0)."""
    size = parse_size(value)
    if isinstance(size, float):
        return min(n, max(1 if n > 0 else 0, int(round(size * n))))
    return min(n, size)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(value: str | int) -> int:
    """Bytes from ``"4G"``, ``"512M"``, ``"1.5G"``, ``"300000"`` (binary units, optional ``B``/``iB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory must be > 0 bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match:
        raise ValueError(f"memory {value!r} is not a size like 4G, 512M or 1.5G")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"memory must be > 0 bytes, got {value!r}")
    return size


def parse_list(value: str | list | tuple, item=float) -> list:
    """``"0.5,0.7"`` or a list into a list of ``item``."""
    if isinstance(value, (list, tuple)):
        return [item(v) for v in value]
    return [item(v) for v in str(value).split(",") if v.strip()]


@dataclass
class ManifestConfig:
    """How the archive is scanned.

    ``sniff_dicom`` also keeps files of other extensions that carry the DICOM marker (``IM0001``,
    UID-named files). ``nifti_axis`` slices NIfTI volumes along 0 (sagittal), 1 (coronal) or 2
    (axial) of their closest RAS+ orientation. ``pseudonymise`` writes PatientID and DICOM UIDs as
    keyed hashes (key from ``ENRICH_PSEUDONYM_KEY``); False copies them as they are. ``root`` declares
    the archive root every image (and mask) must lie under (``..``, ``file://`` and symlinks resolved);
    a path outside it is refused. Without it, a folder input is its own root and a table's relative
    paths must stay under the table's folder; a table's absolute paths and URIs are confined only when
    ``root`` is declared (do so for tables from other hands).
    """

    extensions: tuple[str, ...] = (
        ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz",
    )
    shard_size: int = 4096
    sniff_dicom: bool = True
    nifti_axis: int = option(2, "--nifti-axis", "slice NIfTI volumes: 0 sagittal, 1 coronal, 2 axial")
    pseudonymise: bool = option(
        True, "--no-pseudonymise",
        "copy PatientID and DICOM UIDs as they are (default: keyed hashes, key from ENRICH_PSEUDONYM_KEY)",
        action="store_false",
    )
    root: str | None = option(
        None, "--archive-root",
        "every image and mask path must lie under this folder or prefix (.., file:// and symlinks "
        "resolved); default: a folder input is its own root, a table's relative paths stay under the "
        "table's folder",
    )


@dataclass
class EncoderConfig:
    """The beta-VAE and its training (Burgess et al. architecture, 64x64 inputs).

    ``objective`` "beta" (the default) is the plain recon + beta * KL, with beta raised linearly from 0
    over the first ``kl_warmup`` share of the epochs (KL warm-up, Bowman et al. 2016) so the encoder
    learns to tell images apart before the KL term pulls it towards the prior; "capacity" is Burgess
    et al.'s recon + gamma * |KL - C| with the KL target C raised linearly from 0 to ``capacity`` nats
    over the first 3/4 of training. Defaults come from runs on the 3,000-image demo archive (2,700
    training images, 3,000 steps of 64, CPU): beta 0.1 reached a held-out reconstruction of 694 nats
    against 771 for the mean image (floor about 667) and 0.73 agreement of the nearest other-patient
    image's view label (chance 0.55); beta 1 reached 739 and 0.65 after 1,500 steps, with 3-6 active
    dimensions; beta 4 and the capacity objective stayed within a few nats of the mean image (the
    capacity objective met its KL target by shrinking variances, with no dimension varying across
    images). ``device`` "auto" trains on a GPU when the Ray cluster (or, without Ray, torch) has one.

    The contrastive encoder (``--embedder contrastive``, see ``encoder/contrastive.py``) uses
    ``sample``, ``epochs``, ``learning_rate``, ``latent_dim``, ``seed`` and ``device`` as above, with
    ``contrastive_batch_size`` image pairs per step and the NT-Xent ``temperature``. When the manifest
    has ``clip_id`` and ``frame``, ``clip_positives`` is the share of pairs whose second view is taken
    from another frame of the same clip at most ``clip_window`` frames away (among the sampled images);
    0 trains on the images alone, as for loose frames.
    """

    sample: Size = option(5000, "--sample", "images to train on: count (5000) or fraction (0.1)")
    epochs: int = option(20, "--epochs", "training epochs (the demo trains a beta-VAE for 30)")
    objective: str = option(
        "beta", "--objective",
        "plain beta-VAE loss with KL warm-up, or capacity-annealed",
    )
    beta: float = option(0.1, "--beta", "KL weight of the beta-VAE, reached after the warm-up")
    capacity: float = option(25.0, "--capacity", "final KL target in nats of the capacity objective")
    gamma: float = 100.0
    latent_dim: int = option(128, "--latent-dim", "embedding size")
    batch_size: int = 64
    learning_rate: float = option(1e-3, "--learning-rate", "Adam learning rate of the encoder")
    kl_warmup: float = option(
        0.3, "--kl-warmup",
        "share of the epochs over which beta rises from 0 (0: none)",
    )
    temperature: float = option(0.1, "--temperature", "NT-Xent temperature of the contrastive encoder")
    contrastive_batch_size: int = 256
    clip_positives: float = option(
        0.0, "--clip-positives",
        "contrastive encoder: share of pairs taken from two nearby frames of one clip when the manifest "
        "has clip_id and frame (0: images alone)",
    )
    clip_window: int = option(
        2, "--clip-window",
        "frames apart that still count as nearby for --clip-positives",
    )
    image_size: int = 64
    seed: int = 0
    device: str = "auto"


@dataclass
class EmbedConfig:
    """The embedding stage: which embedder, and its actor pool.

    ``embedder`` is "contrastive" (default: a self-supervised encoder trained on the archive to ignore
    frame-to-frame change; chosen by sibling recall in ``benchmarks/redundancy.py``), "vae" (the
    trained beta-VAE's encoder mean, the paper's), "pixels" (the 64x64
    input block-averaged to ``pixel_size`` x ``pixel_size``, mean-centred per image: a baseline), or
    "byo" (vectors from ``embeddings``, a Parquet/.npy/.npz file made by any other model).
    ``decode_threads`` None gives each actor's decoding the CPUs it holds. ``precision`` "auto" encodes
    with bf16 autocast on GPU and fp32 on CPU; "fp32", "bf16" or "fp16" force one (mixed ones on GPU only).
    """

    embedder: str = option(
        "contrastive", "--embedder",
        "contrastive: a self-supervised encoder trained on the archive to ignore frame-to-frame change; "
        "vae: the paper's beta-VAE; pixels: downsampled pixels (a baseline); byo: --embeddings FILE",
    )
    pixel_size: int = option(16, "--pixel-size", "side of the pixels embedder's grid (16: 256-d)")
    embeddings: str | None = option(
        None, "--embeddings",
        "bring-your-own embeddings: .parquet/.npz (embedding + image_id or uri) or .npy",
    )
    batch_size: int = option(256, "--embed-batch-size", "images per encoder batch")
    num_actors: int | None = None
    decode_threads: int | None = None
    device: str = option("auto", "--embed-device", "embedding device (auto: GPU if Ray has one)")
    precision: str = "auto"

    def identity(self) -> dict:
        """What makes two runs' embeddings comparable: the embedder (and the pixel grid, or the imported file)."""
        ident: dict = {"embedder": self.embedder}
        if self.embedder == "pixels":
            ident["pixel_size"] = self.pixel_size
        if self.embedder == "byo":
            ident["embeddings"] = self.embeddings
        return ident


@dataclass
class SimilarityConfig:
    """Blocked all-pairs similarity.

    ``block_size`` None picks the block from ``max_memory`` (e.g. "4G", "512M"). ``mode`` "approx"
    compares each k-means partition only with its ``nprobe`` nearest (``n_partitions`` None: about
    sqrt(N)) and measures recall on ``sample_size`` images. ``device`` auto uses GPUs when Ray has
    them; ``precision`` fp16/bf16 (GPU only) is approximate. A checkpoint is committed every
    ``checkpoint_seconds``. ``kernel`` picks the tile kernel (auto: the fused Triton kernel on GPUs
    when triton is installed, torch otherwise; numba on CPUs). Every pair above ``edge_threshold``
    (None: none) is kept in
    ``similarity/edges/``, at most ``max_edges`` pairs (more fails with a message naming both settings).
    From it, ``duplicates/`` gets near-duplicate groups and a removal list per ``duplicate_thresholds``
    (each >= ``edge_threshold``; removal keeps images in ``keep`` order: "lowest_id" or "central").
    """

    block_size: int | None = option(
        None, "--block-size",
        "rows per similarity block (default: chosen from --max-memory)",
    )
    top_k: int = option(10, "--top-k", "neighbors kept per image")
    thresholds: tuple[float, ...] = option((0.5, 0.7, 0.9), "--thresholds", "similarity thresholds")
    bins: int = 200
    max_memory: str | int = option(
        "2G", "--max-memory",
        "memory for the similarity stage's buffers, e.g. 4G, 512M",
    )
    mode: str = option("exact", "--similarity-mode", "all pairs (exact) or k-means partitions (approx)")
    n_partitions: int | None = option(
        None, "--n-partitions",
        "approx mode: k-means partitions (default about sqrt(N))",
    )
    nprobe: int = option(
        8, "--nprobe",
        "approx mode: partitions compared with each partition, itself included",
    )
    sample_size: int = 1000
    device: str = option("auto", "--similarity-device", "tile kernel device")
    kernel: str = option(
        "auto", "--similarity-kernel",
        "tile kernel: auto (GPU: fused Triton kernel when triton is installed, else torch; CPU: compiled numba), "
        "torch, or triton (on the CPU only as Triton's interpreter: slow, for checking)",
    )
    precision: str = option("fp32", "--precision", "GPU product precision (fp32: exact)")
    checkpoint_seconds: float = 60.0
    seed: int = 0
    edge_threshold: float | None = option(
        0.9, "--edge-threshold",
        "keep every pair above this in similarity/edges/ (none: off)",
        none=True,
    )
    max_edges: int = option(
        50_000_000, "--max-edge-pairs",
        "most pairs similarity/edges/ may hold before the stage fails",
    )
    duplicate_thresholds: tuple[float, ...] = option(
        (0.9, 0.98), "--duplicate-thresholds",
        "near-duplicate groups and removal lists in duplicates/t=…/, each >= --edge-threshold (none: off)",
        none=True,
    )
    keep: str = option(
        "lowest_id", "--keep",
        "removal list: which near-duplicate to keep first (central: most near-duplicates)",
    )


@dataclass
class SelectConfig:
    """The ranking: farthest-first (``mode`` "exact", the default, chosen by ``benchmarks/selection_quality.py``).

    ``mode`` "batch" is the paper's rule (each round adds the ``batch_size`` least similar images).
    ``mode`` "cells" runs farthest-first within spherical k-means cells of about ``cell_size`` images
    and merges the cells by score (``selection/cells.py``): N x cell size products instead of N^2 / 2,
    for archives a complete ranking cannot reach; no caps, label balance or mean scores.

    ``seed_ids`` names a file of already-labelled images (ids or uris) used as every replicate's
    seed set instead of a random one. ``mode`` "coverage" (ProbCover's greedy coverage of delta-balls)
    and "herding" (facility location) rank on the exact graph of pairs above ``delta`` (None: ProbCover's
    label-free purity rule), holding at most ``max_edges`` stored edges. ``duplicate_threshold`` turns
    the duplicate guard on: no second image of a near-duplicate group (pairs above it) before every
    group has one. ``workers`` None picks one process for archives up to
    2e8 embedding floats and one shard actor per CPU above; 0 forces one process, k > 0 k actors.
    ``device`` "cuda" computes the exact and batch rankings' products on GPUs (``selection/device.py``).
    """

    mode: str = option(
        "exact", "--mode",
        "exact farthest-first (never behind random in the benchmarks), batch (the paper's rule), coverage"
        " (ProbCover: greedy coverage of delta-balls), herding (facility location on the same graph) or cells"
        " (farthest-first within k-means cells of --cell-size images: N x cell size products instead of N^2)",
    )
    seed_size: Size = option(0.022, "--seed-size", "random seed set: count or fraction")
    cell_size: int = option(
        1024, "--cell-size",
        "cells mode: about this many images per k-means cell (farthest-first runs within each cell)",
    )
    batch_size: Size = option(0.11, "--batch-size", "images added per round in batch mode: count or fraction")
    budgets: tuple[Size, ...] = option(
        (0.07, 0.11, 0.22, 0.33, 0.44, 0.55, 0.66, 0.77, 0.88, 1.0), "--budgets",
        "subset sizes to report, fractions or counts",
    )
    replicates: int = option(10, "--replicates", "independent rankings from different seeds")
    aggregate: str = option("max", "--aggregate", "similarity to the chosen set")
    seed: int = option(0, "--seed", "random seed of the selection (and, for demo, of the synthetic archive)")
    seed_ids: str | None = option(
        None, "--seed-ids",
        "file of already-labelled image ids or uris (CSV, Parquet or one per line) as the seed set",
    )
    scope: str | None = None  # a file of the image ids to rank (the others are left out); incremental runs set it
    max_per_clip: int | None = option(
        None, "--max-per-clip",
        "at most N images per clip until no other image is left (default: no cap)",
    )
    max_per_patient: int | None = option(
        None, "--max-per-patient",
        "at most N images per patient until no other image is left (default: no cap)",
    )
    balance_labels: bool = option(
        False, "--balance-labels",
        "take labels in turn (round-robin)",
        action="store_true",
    )
    workers: int | None = option(
        None, "--select-workers",
        "0: one process; k: k shard actors (default: by archive size)",
    )
    device: str = option(
        "cpu", "--select-device",
        "where exact and batch rankings compute their products: cpu, or cuda (one GPU per ranking task or "
        "shard actor; the rankings equal the CPU's bit for bit)",
    )
    bound_cells: int = option(
        256, "--bound-cells",
        "exact and batch rankings (max scores, on CPUs): k-means cells of about this many images; a fold skips "
        "every cell none of its picks can raise (exact bounds: the ranking is unchanged); 0: off; used from "
        "64 cells up",
    )
    checkpoint_seconds: float = 60.0
    delta: float | None = option(
        None, "--delta",
        "coverage/herding: similarity above which two images cover each other (default: ProbCover's "
        "label-free purity rule, recorded in selection.json)",
    )
    max_edges: int = option(
        50_000_000, "--max-edges",
        "coverage/herding: most stored neighbor pairs of the graph",
    )
    duplicate_threshold: float | None = option(
        None, "--duplicate-threshold",
        "duplicate guard: no second image of a group of near-duplicates (similarity above this) before "
        "every group has one (default: off)",
    )


@dataclass
class EvaluateConfig:
    """Models trained on ENRICH vs random subsets (and the full training set), and their statistics.

    ``model`` "auto" is the paper's ResNet-18 when the cluster has GPUs and the small CNN otherwise
    (classification), or the U-Net (segmentation). ``image_size`` None uses the model's default (ResNet
    80, CNN and linear probe 32, U-Net 64). ``budgets`` None takes the selection's budgets; a budget is
    a fraction (or count) of the training images. ``replicates`` None uses every selection replicate.
    ``seconds_per_image`` None is 1 s (classification) or 300 s (segmentation) of expert labelling.
    """

    task: str = option("classification", "--task", "what the models learn")
    model: str = option(
        "auto", "--model",
        "model per subset (auto: ResNet-18 with GPUs, the small CNN without; U-Net for masks)",
    )
    image_size: int | None = option(None, "--image-size", "model input size (default: the model's)")
    width: int | None = None
    budgets: tuple[Size, ...] | None = option(
        None, "--eval-budgets",
        "budgets to evaluate (default: the selection's)",
    )
    replicates: int | None = option(
        None, "--eval-replicates",
        "selection replicates to evaluate (default: all)",
    )
    epochs: int = option(5, "--eval-epochs", "training epochs per model")
    min_steps: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    test_fraction: float = option(
        0.2, "--test-fraction",
        "test share when the tool makes a patient-disjoint split",
    )
    alpha: float = option(0.05, "--alpha", "significance level of the Mann-Whitney U tests")
    seconds_per_image: float | None = option(
        None, "--seconds-per-image",
        "expert labelling time per image (default 1 s classification, 300 s segmentation)",
    )
    gpu_fraction: float = option(
        0.25, "--gpu-fraction",
        "GPU share per training task when the cluster has GPUs",
    )
    seed: int = 0


@dataclass
class IncrementalConfig:
    """An incremental run over a grown archive (see ``enrich_dist/incremental.py``).

    ``previous_run`` is the run dir to reuse: its encoder and the embeddings of unchanged images
    (same uri, size and mtime/ETag). ``labelled`` names a file of already-labelled images (uris, or
    image ids of the previous run) that seed the ranking of the new images; None takes the
    previous run's first selected subset. ``retrain_encoder`` trains a new encoder and reuses nothing.
    """

    previous_run: str | None = option(
        None, "--previous-run",
        "incremental run: reuse this run dir's encoder and the embeddings of unchanged images, rank only "
        "new ones; 'latest': the newest finished run dir beside --output (dated run dirs; none: a fresh "
        "run)",
    )
    labelled: str | None = option(
        None, "--labelled",
        "with --previous-run: already-labelled images (uris, or image ids of the previous run) that seed "
        "the ranking (default: the previous run's first selected subset)",
    )
    retrain_encoder: bool = option(
        False, "--retrain-encoder",
        "with --previous-run: train a new encoder and embed every image fresh (nothing is reused)",
        action="store_true",
    )


@dataclass
class ReportConfig:
    """``images`` "thumbnails" shows archive images and their uris; "none" leaves every pixel and path out (to share)."""

    images: str = option(
        "thumbnails", "--report-images",
        "thumbnails: archive images and their uris in the report; none: no image, no path (a report to "
        "share)",
    )


@dataclass
class RunConfig:
    """Everything one run needs; stored (without secrets) in ``run.json``."""

    input: str | None = None
    output: str = "run"
    ray_address: str | None = None
    num_cpus: int | None = None
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown keys are an error naming the key and the closest known one."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config is a mapping of sections, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in sections:
                raise ConfigError(f"unknown config key {key!r}{_closest(key, sections)}; known: {sorted(sections)}")
            sub = SECTION_TYPES.get(key)
            kwargs[key] = _build(sub, value, key) if sub else value
        cfg = cls(**kwargs)
        validate(cfg)
        return cfg


SECTION_TYPES = {
    "manifest": ManifestConfig,
    "encoder": EncoderConfig,
    "embed": EmbedConfig,
    "similarity": SimilarityConfig,
    "select": SelectConfig,
    "evaluate": EvaluateConfig,
    "incremental": IncrementalConfig,
    "report": ReportConfig,
}


# section -> setting -> its annotation (resolved), for the CLI's parsing
SETTING_TYPES = {section: typing.get_type_hints(cls, globalns={**globals(), "Size": Size})
                 for section, cls in SECTION_TYPES.items()}


def _closest(key: str, known) -> str:
    match = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _build(cls, value: dict[str, Any], where: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {where!r} must be a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in names:
            raise ConfigError(f"unknown key {key!r} in config section {where!r}{_closest(key, names)}; known: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


# the accepted values of every setting that names a choice (tests check them against the modules that use them)
CHOICES: dict[tuple[str, str], tuple[Any, ...]] = {
    ("manifest", "nifti_axis"): (0, 1, 2),
    ("encoder", "objective"): ("beta", "capacity"),
    ("encoder", "device"): ("auto", "cpu", "cuda"),
    ("embed", "embedder"): ("vae", "contrastive", "pixels", "byo"),
    ("embed", "device"): ("auto", "cpu", "cuda"),
    ("embed", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("similarity", "mode"): ("exact", "approx"),
    ("similarity", "device"): ("auto", "cpu", "cuda"),
    ("similarity", "kernel"): ("auto", "torch", "triton"),
    ("similarity", "precision"): ("fp32", "fp16", "bf16"),
    ("similarity", "keep"): ("lowest_id", "central"),
    ("select", "mode"): ("batch", "exact", "coverage", "herding", "cells"),
    ("select", "aggregate"): ("max", "mean"),
    ("select", "device"): ("cpu", "cuda"),
    ("evaluate", "task"): ("classification", "segmentation"),
    ("evaluate", "model"): ("auto", "linear", "cnn", "resnet", "unet"),
    ("report", "images"): ("thumbnails", "none"),
}
_POSITIVE = ">0"
_NON_NEGATIVE = ">=0"
_SIMILARITY = "[-1,1)"  # a cosine similarity used as a threshold
_SHARE = "[0,1]"
_OPEN_SHARE = "(0,1)"
_FRACTION = "(0,1]"
_RANGES: dict[str, tuple[str, ...]] = {
    _POSITIVE: (
        "manifest.shard_size", "encoder.epochs", "encoder.capacity", "encoder.latent_dim", "encoder.batch_size",
        "encoder.learning_rate", "encoder.temperature", "encoder.contrastive_batch_size", "encoder.image_size",
        "embed.pixel_size", "embed.batch_size", "embed.num_actors", "embed.decode_threads", "similarity.block_size",
        "similarity.top_k", "similarity.bins", "similarity.n_partitions", "similarity.nprobe", "similarity.sample_size",
        "select.replicates", "select.cell_size", "select.max_per_clip", "select.max_per_patient",
        "select.max_edges", "evaluate.image_size", "evaluate.width", "evaluate.replicates",
        "evaluate.epochs", "evaluate.batch_size", "evaluate.learning_rate", "evaluate.seconds_per_image",
    ),
    _NON_NEGATIVE: (
        "encoder.beta", "encoder.gamma", "encoder.clip_window", "encoder.seed", "similarity.seed", "similarity.max_edges",
        "similarity.checkpoint_seconds", "select.checkpoint_seconds",  # 0: a checkpoint after every unit of work
        "select.seed", "select.workers", "select.bound_cells", "evaluate.min_steps", "evaluate.weight_decay", "evaluate.seed",
    ),
    _SIMILARITY: (
        "similarity.thresholds", "similarity.edge_threshold", "similarity.duplicate_thresholds", "select.delta",
        "select.duplicate_threshold",
    ),
    _SHARE: ("encoder.kl_warmup", "encoder.clip_positives"),
    _OPEN_SHARE: ("evaluate.test_fraction", "evaluate.alpha"),
    _FRACTION: ("evaluate.gpu_fraction",),
}
_IN_RANGE = {
    _POSITIVE: lambda v: v > 0, _NON_NEGATIVE: lambda v: v >= 0, _SIMILARITY: lambda v: -1 <= v < 1,
    _SHARE: lambda v: 0 <= v <= 1, _OPEN_SHARE: lambda v: 0 < v < 1, _FRACTION: lambda v: 0 < v <= 1,
}
_RANGE_OF = {key: rule for rule, keys in _RANGES.items() for key in keys}
_SIZES = {"encoder.sample", "select.seed_size", "select.batch_size", "select.budgets", "evaluate.budgets"}


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` is not of the annotated type ``hint`` (None when it is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = [_type_error(value, a) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else errors[0]
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"must be a list, got {value!r}"
        for item in value:
            why = _type_error(item, args[0])
            if why:
                return f"each item {why}"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    return None


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns={**globals(), "Size": Size})


def validate(cfg: RunConfig, flags: dict[str, str] | None = None) -> None:
    """Check every setting's type, choice and range, and the settings that depend on each other.

    Raises one ``ConfigError`` listing every problem, each named ``section.key`` (and its command-line
    flag from ``flags`` when given), so a wrong config fails in a second, before Ray starts.
    """
    problems = [
        p for section in SECTION_TYPES for p in section_problems(section, getattr(cfg, section), flags)
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def check_section(section: str, settings: Any) -> None:
    """:func:`validate` for one section, as stages check the settings they are called with directly.

    The message names each key with the option that sets it (from the field's declaration).
    """
    flags = {
        f"{section}.{f.name}": f.metadata["flag"]
        for f in dataclasses.fields(settings)
        if "flag" in f.metadata
    }
    problems = section_problems(section, settings, flags)
    if problems:
        raise ConfigError("; ".join(problems))


def section_problems(section: str, settings: Any, flags: dict[str, str] | None = None) -> list[str]:
    """Every problem of one section's settings: types, choices, ranges, then the settings that depend on each other."""
    problems: list[str] = []
    for name, hint in _hints(type(settings)).items():
        key, value = f"{section}.{name}", getattr(settings, name)
        why = _type_error(value, hint)
        if why is None and key in _SIZES and value is not None:
            why = _size_error(value)
        if why is None and (section, name) in CHOICES and value not in CHOICES[section, name]:
            choices = ", ".join(map(str, CHOICES[section, name]))
            why = f"must be one of {choices}, got {value!r}{_closest(value, CHOICES[section, name])}"
        rule = _RANGE_OF.get(key)
        if why is None and rule and value is not None:
            values = value if isinstance(value, (tuple, list)) else (value,)
            bad = [v for v in values if not _IN_RANGE[rule](v)]
            if bad:
                why = f"must be in {rule}" if rule[0] in "[(" else f"must be {rule}"
                why += f", got {bad[0] if len(values) == 1 else list(values)!r}"
        if why is None and key == "similarity.max_memory":
            why = _memory_error(value)
        if why:
            flag = (flags or {}).get(key)
            problems.append(f"{key}{f' ({flag})' if flag else ''} {why}")
    if not problems and section in _DEPENDENT:
        problems += _DEPENDENT[section](settings)
    return problems


def _similarity_dependent(sim: SimilarityConfig) -> list[str]:
    low = (
        [] if sim.edge_threshold is None else [t for t in sim.duplicate_thresholds if t < sim.edge_threshold]
    )
    if not low:
        return []
    return [
        f"similarity.duplicate_thresholds {low} lie below similarity.edge_threshold {sim.edge_threshold}: "
        "the edge list holds only pairs above it; lower --edge-threshold or raise --duplicate-thresholds"
    ]


def _evaluate_dependent(ev: EvaluateConfig) -> list[str]:
    if ev.task == "segmentation" and ev.model not in ("auto", "unet"):
        return [f"evaluate.model {ev.model!r} cannot learn masks: segmentation uses unet (or auto)"]
    if ev.task == "classification" and ev.model == "unet":
        return ["evaluate.model 'unet' segments: classification uses auto, linear, cnn or resnet"]
    return []


def _select_dependent(sel: SelectConfig) -> list[str]:
    errors = []
    if sel.device != "cpu" and (sel.mode not in ("exact", "batch") or sel.aggregate != "max"):
        errors.append(
            f"select.device {sel.device!r} runs the exact and batch rankings with max scores only, not "
            f"--mode {sel.mode} --aggregate {sel.aggregate}: use --select-device cpu"
        )
    if sel.workers and sel.mode not in ("exact", "batch"):
        errors.append(
            f"select.workers (--select-workers) shards the exact and batch rankings; --mode {sel.mode} does not "
            "use it (cells: Ray tasks over groups of cells; coverage, herding: one process): leave it unset"
        )
    return errors + _cells_dependent(sel)


def _cells_dependent(sel: SelectConfig) -> list[str]:
    if sel.mode != "cells":
        return []
    unsupported = [
        flag for flag, on in (
            ("--aggregate mean", sel.aggregate != "max"),
            ("--max-per-clip", sel.max_per_clip is not None),
            ("--max-per-patient", sel.max_per_patient is not None),
            ("--balance-labels", sel.balance_labels),
        ) if on
    ]
    if not unsupported:
        return []
    return [
        f"select.mode 'cells' ranks each cell on its own, without {', '.join(unsupported)}: "
        "use --mode exact for caps, label balance or mean scores"
    ]


_DEPENDENT = {"similarity": _similarity_dependent, "evaluate": _evaluate_dependent, "select": _select_dependent}


def _size_error(value: Any) -> str | None:
    try:
        for item in value if isinstance(value, (tuple, list)) else (value,):
            parse_size(item)
    except ValueError as exc:
        return f"is not a size: {exc}"
    return None


def _memory_error(value: Any) -> str | None:
    try:
        parse_memory(value)
    except (ValueError, TypeError) as exc:
        return f"is not an amount of memory such as 2G or 512M: {exc}"
    return None


def load_config(path: str | None) -> RunConfig:
    """Read a YAML or JSON config file (or return defaults when ``path`` is None)."""
    if path is None:
        return RunConfig()
    from .storage import read_uri

    text = read_uri(path).decode("utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    try:
        return RunConfig.from_dict(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
