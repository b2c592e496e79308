"""Embedding stage: Ray Data over manifest shards, an actor pool of encoder replicas, one Parquet shard each."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import imaging, schema, stages
from .config import EmbedConfig, RunConfig
from .executor import Context, execute
from .invariants import NORM_TOLERANCE, count_duplicates, ids_of, manifest_ok_ids
from .runtime import Resources, cluster_resources, quiet_ray_data  # ray is imported inside their bodies
from .storage import RunDir, filesystem, read_uri, shard_name, with_retries

log = logging.getLogger(__name__)
ERRORS_DIR = schema.EMBED_ERRORS_DIR


CPU_ACTOR_CPUS = 4  # CPUs per CPU actor: few, wide actors keep every core busy to the last manifest shard


def plan_actors(
    res: Resources, cfg: EmbedConfig, cpus_per_gpu: int | None = None, node_cpus: int | None = None
) -> tuple[int, float, float, str]:
    """(actors, cpus per actor, gpus per actor, device) for the cluster; never asks for absent GPUs.

    GPU: one actor per GPU, each holding the CPUs that go with its GPU (``cpus_per_gpu``, by default
    an equal share of the cluster's) to decode while the GPU encodes. CPU: one actor per
    ``CPU_ACTOR_CPUS`` CPUs (or ``num_actors``), each holding its share of the CPUs but never more than
    the largest node has (``node_cpus``: an actor wider than every node would wait forever). A
    manifest shard is one unit of work, so wide actors keep every core busy when there are few shards
    left.
    """
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"embed device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and res.gpus == 0:
        raise ValueError("embed device 'cuda' requested but the Ray cluster has no GPUs: use --device auto or cpu")
    if res.gpus > 0 and cfg.device != "cpu":
        n = min(cfg.num_actors or res.gpus, res.gpus)
        per_gpu = cpus_per_gpu if cpus_per_gpu is not None else res.cpus // res.gpus
        return n, float(max(1, per_gpu)), 1.0, "cuda"
    cpus = max(1, res.cpus)
    width = max(1, min(CPU_ACTOR_CPUS, node_cpus or cpus))
    n = max(1, min(cfg.num_actors or -(-cpus // width), cpus))
    return n, float(max(1, min(width, cpus // n))), 0.0, "cpu"


def actor_threads(cpus: float, device: str, cfg: EmbedConfig) -> tuple[int, int]:
    """(torch threads, decode threads) of one actor holding ``cpus`` CPUs.

    On CPU the encoder costs about a quarter of the CPU time of decoding a PNG (about 0.6 ms against
    2.7 ms an image here), and a second torch thread spends more CPU than it saves on this small
    network, so torch gets one thread per 4 CPUs and the decode pool every CPU the actor holds (the
    OS interleaves them); on GPU one thread feeds the device. ``decode_threads`` overrides the pool.
    """
    held = max(1, int(cpus))
    return (max(1, held // 4) if device == "cpu" else 1), max(1, cfg.decode_threads or held)


PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: str):
    """The torch dtype to autocast the encoder to (None: fp32) for a precision setting on a device.

    ``auto``: bf16 on GPUs, fp32 on CPUs. ``bf16`` on a CPU needs native bfloat16 (AVX512-BF16 or
    AMX); fp16 only on GPUs.
    """
    import torch

    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"embed precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    if not device.startswith("cuda") and precision == "fp16":
        raise ValueError("embed precision 'fp16' needs a GPU: use --device cuda or precision fp32, bf16 or auto")
    if not device.startswith("cuda") and precision == "bf16" and not cpu_bf16():
        raise ValueError(
            "embed precision 'bf16' on a CPU needs native bfloat16 (AVX512-BF16 or AMX), which this CPU lacks: "
            "use precision fp32 or auto"
        )
    name = PRECISIONS[precision]
    return None if name is None else getattr(torch, name)


def frozen_embedding(model, image_size: int):
    """``model.encode(x)[0]`` as a frozen, inference-optimised TorchScript graph for (B, 1, S, S) channels-last input.

    Traced once on a small batch (the graph holds no batch size); shape checks are Python and not traced,
    which is why the stage calls it only with images it resized itself. TorchScript is deprecated in
    favour of ``torch.compile`` (which needs a C++ compiler on every worker and compiles for longer than a
    shard takes); where a torch no longer has it, None: the eager network, the same embedding.
    """
    import warnings

    import torch

    if not all(hasattr(torch.jit, name) for name in ("trace", "freeze", "optimize_for_inference")):
        return None

    class Mean(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.encode(x)[0]

    example = torch.zeros(2, 1, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(Mean(model).eval(), example)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


class EncoderEmbedder:
    """A trained encoder's embedding: the beta-VAE's encoder mean or the contrastive backbone (bf16 autocast on GPU by default)."""

    def __init__(self, run: RunDir, device: str, precision: str = "auto", model: str = "vae"):
        import torch

        from .encoder import CHECKPOINTS, load_encoder

        self.name, self.device = model, device
        self.dtype = autocast_dtype(precision, device)
        path = CHECKPOINTS[model]
        model = load_encoder(run.read_bytes(path), name=path).eval()
        if hasattr(model, "folded"):  # the contrastive encoder: BatchNorm folded into its convolutions
            model = model.folded()
        model = model.to(device)
        # channels-last convolutions run about twice as fast on CPU for this small network
        self.model = model.to(memory_format=torch.channels_last)
        self.image_size, self.dim = self.model.image_size, self.model.latent_dim
        # fp32 on CPU: a frozen TorchScript graph of the embedding, which fuses each convolution with its
        # ReLU (about 12 % off the forward pass; the same embedding to within 1e-7)
        self.frozen = frozen_embedding(self.model, self.image_size) if device == "cpu" and self.dtype is None else None

    def forward(self, x):
        """Embeddings of a (B, S, S) float tensor already on the device (what the stage times as the model)."""
        import torch

        with torch.inference_mode():
            x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
            if self.frozen is not None:
                return self.frozen(x)
            device_type = "cuda" if self.device.startswith("cuda") else "cpu"
            with torch.autocast(device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                mu, _ = self.model.encode(x)
            return mu.float()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(images)
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self.forward(x).cpu().numpy()


class PixelEmbedder:
    """Block-averaged pixels, mean-centred per image (so cosine similarity is pixel correlation)."""

    name = "pixels"
    image_size = 64

    def __init__(self, size: int):
        if size < 1 or self.image_size % size:
            raise ValueError(f"pixel_size must divide {self.image_size}, got {size}")
        self.size, self.dim = size, size * size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        f = self.image_size // self.size
        small = images.reshape(len(images), self.size, f, self.size, f).mean(axis=(2, 4)).reshape(len(images), -1)
        return small - small.mean(axis=1, keepdims=True)


EMBEDDERS = ("vae", "contrastive", "pixels", "byo")


def make_embedder(run: RunDir, cfg: EmbedConfig, device: str) -> EncoderEmbedder | PixelEmbedder:
    """The embedder named by the config."""
    if cfg.embedder in ("vae", "contrastive"):
        return EncoderEmbedder(run, device, cfg.precision, cfg.embedder)
    if cfg.embedder == "pixels":
        return PixelEmbedder(cfg.pixel_size)
    raise ValueError(f"embedder {cfg.embedder!r} has no image model; known: {', '.join(EMBEDDERS)}")


class ShardEmbedder:
    """A Ray Data actor holding one embedder replica; embeds whole manifest shards and commits them."""

    def __init__(self, run: RunDir, cfg: EmbedConfig, device: str, threads: int, decode_threads: int | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.run, self.cfg = run, cfg
        self.embedder = make_embedder(run, cfg, device)
        self.nifti_axis = imaging.manifest_nifti_axis(run)
        self.decode_threads = max(1, decode_threads or cfg.decode_threads or threads)
        self.pool = ThreadPoolExecutor(max_workers=1)

    def _decode(self, uris: list[str], frames: list[int | None]) -> tuple[np.ndarray, list[str | None]]:
        size = self.embedder.image_size
        return imaging.load_images(
            uris, size, self.run.storage_options, self.decode_threads, frames=frames, nifti_axis=self.nifti_axis
        )

    def embed_shard(self, shard: int, ids: list[int], uris: list[str], frames: list[int | None] | None = None) -> dict:
        """Decode (the next batch in a thread while this one encodes), embed, commit the shard."""
        start = time.monotonic()
        bs = self.cfg.batch_size
        frames = frames if frames is not None else [None] * len(ids)
        batches = [(ids[i : i + bs], uris[i : i + bs], frames[i : i + bs]) for i in range(0, len(ids), bs)]
        ok_ids, ok_uris, vecs, errors = [], [], [], []
        pending = self.pool.submit(self._decode, *batches[0][1:]) if batches else None
        for b, (bids, buris, _) in enumerate(batches):
            images, errs = pending.result()
            if b + 1 < len(batches):
                pending = self.pool.submit(self._decode, *batches[b + 1][1:])
            ok = np.array([e is None for e in errs], dtype=bool)
            errors += [(bids[i], buris[i], errs[i]) for i in np.flatnonzero(~ok)]
            if ok.any():
                vecs.append(self.embedder(images[ok]))
                ok_ids += [bids[i] for i in np.flatnonzero(ok)]
                ok_uris += [buris[i] for i in np.flatnonzero(ok)]
        matrix = np.concatenate(vecs) if vecs else np.zeros((0, self.embedder.dim), np.float32)
        stats = commit_shard(self.run, shard, np.asarray(ok_ids, np.int64), matrix, ok_uris, errors)
        return {**stats, "seconds": time.monotonic() - start}

    def __call__(self, batch: dict) -> dict:
        stats = [
            self.embed_shard(int(s), list(i), list(u), [None if f < 0 else int(f) for f in fr])
            for s, i, u, fr in zip(batch["shard"], batch["ids"], batch["uris"], batch["frames"], strict=True)
        ]
        return {key: np.array([s[key] for s in stats]) for key in ("shard", "n", "n_errors", "seconds")}


def commit_shard(
    run: RunDir, shard: int, ids: np.ndarray, vectors: np.ndarray, uris: list[str], errors: list[tuple[int, str, str]]
) -> dict:
    """L2-normalise rows, record zero or non-finite ones as errors, write the errors then the shard."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    good = np.isfinite(norms) & (norms > 0)
    errors = list(errors) + [
        (int(ids[i]), uris[i], "zero-norm embedding" if np.isfinite(norms[i]) else "non-finite embedding")
        for i in np.flatnonzero(~good)
    ]
    dim = vectors.shape[1]
    unit = (vectors[good] / norms[good, None]).astype(np.float32)
    if errors:
        err_ids, err_uris, err_msgs = zip(*sorted(errors), strict=True)
        run.write_table(
            f"{ERRORS_DIR}/{shard_name(shard)}",
            pa.table({"image_id": err_ids, "uri": err_uris, "error": err_msgs}, schema=schema.EMBED_ERRORS),
        )
    table = pa.table(
        {
            "image_id": pa.array(ids[good], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1), pa.float32()), dim),
        },
        schema=schema.embeddings_schema(dim),
    )
    reused = reused_rows(run, shard)  # incremental hook: add the rows copied from the previous run
    if reused is not None:
        table = pa.concat_tables([table, reused.cast(table.schema)]).sort_by("image_id")
    run.write_table(f"{schema.EMBEDDINGS_DIR}/{shard_name(shard)}", table)
    return {"shard": shard, "n": int(good.sum()), "n_errors": len(errors)}


# --- incremental runs (enrich_dist/incremental.py) -------------------------------------------------
# An incremental run copies the vectors of unchanged images from its previous run. Shards that mix
# copied and new rows get embeddings_meta/reused/part-NNNNN.parquet: those rows are not embedded again
# (pending_shards) and are merged into the committed shard, in image_id order (commit_shard).
REUSED_DIR = schema.EMBED_REUSED_DIR


def reused_rows(run: RunDir, shard: int) -> pa.Table | None:
    """The rows of ``shard`` an incremental run copied from its previous run, or None."""
    rel = f"{schema.located(run, REUSED_DIR)}/{shard_name(shard)}"
    return run.read_table(rel) if run.exists(rel) else None


# --- end of the incremental hook ------------------------------------------------------------------


BYO_IN_MEMORY = 1 << 30  # a bring-your-own matrix larger than this goes to a temporary file, not the heap


def _byo_matrix(rows: int, dim: int, dtype: np.dtype, spill: str | None) -> np.ndarray:
    """An empty (rows, dim) matrix: in memory, or above ``BYO_IN_MEMORY`` bytes a memory-mapped file in the
    folder ``spill`` (the page cache holds what is in use, so the import needs no heap of N x d)."""
    size = rows * dim * np.dtype(dtype).itemsize
    if spill is None or size <= BYO_IN_MEMORY:
        return np.empty((rows, dim), dtype)
    path = os.path.join(spill, "byo-matrix.npy")
    log.info("embed: holding the %.1f GB imported matrix in %s (set TMPDIR to use another disk)", size / 1e9, path)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, dim))


def _byo_parquet(source, spill: str | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, keys, matrix) from a Parquet file, batch by batch into one matrix (no per-row Python objects).

    Peak memory is the matrix plus one record batch, whatever the file's size; with ``spill`` (a folder) a
    matrix above ``BYO_IN_MEMORY`` bytes is a memory-mapped file there instead.
    """
    # pre_buffer off: with it, pyarrow keeps every row group it has read cached until the file is closed
    # (measured: 5.9 GB of heap after reading a 10^7 x 128 file batch by batch; off: flat at one batch)
    file = pq.ParquetFile(source, pre_buffer=False)
    names = file.schema_arrow.names
    key = "image_id" if "image_id" in names else "uri"
    if "embedding" not in names or key not in names:
        raise ValueError(f"needs columns 'embedding' and 'image_id' or 'uri', found {names}")
    rows = file.metadata.num_rows
    matrix, keys, widths, nulls, row = None, [], set(), 0, 0
    for batch in file.iter_batches(columns=[key, "embedding"], batch_size=65536):
        column = batch.column(batch.schema.get_field_index("embedding"))
        nulls += column.null_count
        widths.update(int(w) for w in np.unique(pc.list_value_length(column).drop_null().to_numpy()))
        if len(widths) > 1 or nulls:
            break
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)  # null entries become NaN: reported per image
        if matrix is None:
            matrix = _byo_matrix(rows, next(iter(widths), 0), values.dtype, spill)
        matrix[row : row + len(column)] = values.reshape(len(column), -1)
        keys.append(batch.column(batch.schema.get_field_index(key)).to_numpy(zero_copy_only=False))
        row += len(column)
    if len(widths) > 1 or nulls:
        raise ValueError(
            f"embedding rows have different lengths {sorted(widths)[:2]}{' or are null' if nulls else ''}: "
            "every image needs a vector of the same dimension"
        )
    if matrix is None:
        return key, np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return key, np.concatenate(keys), matrix


def read_byo(
    path: str, storage_options: dict | None = None, spill: str | None = None
) -> tuple[str, np.ndarray, np.ndarray]:
    """Read bring-your-own embeddings: (key column "image_id"|"uri"|"row", keys, numeric matrix).

    Parquet or .npz: an ``embedding`` column/array plus ``image_id`` or ``uri``; .npy: a 2-D array
    whose row i is image_id i. A local .npy is memory-mapped and a Parquet file read column-wise (from
    disk, or by ranges from an object store), so the matrix is held once (as stored: float32 stays
    float32); with ``spill`` (a folder), a Parquet matrix above ``BYO_IN_MEMORY`` bytes is held in a
    memory-mapped file there, not on the heap.
    """
    lower = path.lower()
    local = "://" not in path and os.path.exists(path)
    try:
        if lower.endswith(".npy"):
            matrix = (
                np.load(path, mmap_mode="r", allow_pickle=False) if local
                else np.load(io.BytesIO(read_uri(path, storage_options)), allow_pickle=False)
            )
            keys, key = np.arange(len(matrix), dtype=np.int64), "row"
        elif lower.endswith(".npz"):
            with np.load(io.BytesIO(read_uri(path, storage_options)), allow_pickle=False) as npz:
                key = "image_id" if "image_id" in npz.files else "uri"
                if "embedding" not in npz.files or key not in npz.files:
                    raise ValueError(f"needs arrays 'embedding' and 'image_id' or 'uri', found {npz.files}")
                matrix, keys = npz["embedding"], npz[key]
        elif lower.endswith(".parquet") and local:
            key, keys, matrix = _byo_parquet(path, spill)
        elif lower.endswith(".parquet"):  # an object store: read by ranges, row group by row group, not whole
            fs, inner = filesystem(path, storage_options)

            def stream() -> tuple[str, np.ndarray, np.ndarray]:
                with fs.open(inner, "rb") as handle:
                    return _byo_parquet(handle, spill)

            key, keys, matrix = with_retries(stream, path)  # a transient error reads the file again
        else:
            raise ValueError("unknown format: use .parquet, .npy or .npz")
    except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{path}: cannot read embeddings ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if matrix.ndim != 2 or matrix.shape[1] < 1 or matrix.dtype.kind not in "uif":
        raise ValueError(f"{path}: embeddings must be a numeric 2-D array (rows x dim), got {matrix.dtype} {matrix.shape}")
    if len(keys) != len(matrix):
        raise ValueError(f"{path}: {len(keys)} {key}s for {len(matrix)} embedding rows")
    if len(np.unique(keys)) != len(keys):
        raise ValueError(f"{path}: duplicate {key} values; each image needs exactly one embedding")
    return key, keys, matrix


def import_embeddings(run: RunDir, cfg: EmbedConfig) -> dict:
    """Write embedding shards from a bring-your-own file, aligned with the manifest shards."""
    if not cfg.embeddings:
        raise ValueError("embedder 'byo' needs --embeddings FILE (.parquet, .npy or .npz)")
    with tempfile.TemporaryDirectory(prefix="enrich-byo-") as spill:
        return _import_embeddings(run, cfg, *read_byo(cfg.embeddings, run.storage_options, spill))


def _import_embeddings(run: RunDir, cfg: EmbedConfig, key: str, keys: np.ndarray, matrix: np.ndarray) -> dict:
    manifest = run.read_table(schema.MANIFEST_DIR, columns=["image_id", "uri", "status"])
    column = "image_id" if key in ("image_id", "row") else "uri"
    if key == "row" and len(keys) != manifest.num_rows:
        raise ValueError(
            f"{cfg.embeddings}: {len(keys)} rows but the manifest has {manifest.num_rows} images; a .npy needs one "
            "row per image_id (use .parquet/.npz with image_id or uri columns for a subset)"
        )
    try:  # keys matched column-wise (an index into the file's rows per manifest row)
        value_set = pa.array(keys).cast(manifest.column(column).type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ValueError(f"{cfg.embeddings}: its {key}s do not match the manifest's {column}s ({exc})") from None
    known = pc.is_in(value_set, value_set=manifest.column(column)).to_numpy(zero_copy_only=False)
    if not known.all():
        unknown = sorted(value_set.filter(pa.array(~known)).to_pylist(), key=str)
        raise ValueError(f"{cfg.embeddings}: {len(unknown)} {column}s are not in the manifest, e.g. {unknown[:5]}")
    stats = []
    for index, path in run.shards(schema.MANIFEST_DIR).items():
        part = run.read_table(path, columns=["image_id", "uri", "status"])
        part = part.filter(pc.equal(part.column("status"), "ok"))
        ids, uris = part.column("image_id").to_pylist(), part.column("uri").to_pylist()
        found = pc.index_in(part.column(column), value_set=value_set)
        have = found.is_valid().to_numpy(zero_copy_only=False)
        errors = [(i, u, f"no embedding in {cfg.embeddings}") for i, u, h in zip(ids, uris, have, strict=True) if not h]
        take = found.drop_null().to_numpy().astype(np.int64)
        stats.append(
            commit_shard(
                run,
                index,
                np.asarray([i for i, h in zip(ids, have, strict=True) if h], np.int64),
                matrix[take].astype(np.float64) if len(take) else np.zeros((0, matrix.shape[1])),
                [u for u, h in zip(uris, have, strict=True) if h],
                errors,
            )
        )
    log.info("embed: imported %d embeddings of dim %d from %s", sum(s["n"] for s in stats), matrix.shape[1], cfg.embeddings)
    return {"dim": int(matrix.shape[1])}


def pending_shards(run: RunDir) -> list[dict]:
    """Manifest shards whose embedding shard is not committed yet, with their ok rows (frame -1: none)."""
    done = set(run.shards(schema.EMBEDDINGS_DIR))
    work = []
    for index, path in run.shards(schema.MANIFEST_DIR).items():
        if index in done:
            continue
        part = run.read_table(path, columns=["image_id", "uri", "frame", "status"])
        part = part.filter(pc.equal(part.column("status"), "ok"))
        reused = reused_rows(run, index)  # incremental hook: embed only the rows not copied
        if reused is not None:
            part = part.filter(pc.invert(pc.is_in(part.column("image_id"), reused.column("image_id"))))
        work.append(
            {
                "shard": index,
                "ids": part.column("image_id").to_pylist(),
                "uris": part.column("uri").to_pylist(),
                "frames": part.column("frame").fill_null(-1).to_pylist(),
            }
        )
    return work


def _check_trained_model(run: RunDir, embedder: str) -> None:
    """Refuse to embed with an encoder other than the one ``encoder/`` holds."""
    stats = run.read_json(schema.ENCODER_TRAIN_STATS) if run.exists(schema.ENCODER_TRAIN_STATS) else {}
    held = stats.get("model", "vae")
    if held != embedder:
        raise ValueError(
            f"{run.uri_of(schema.ENCODER_DIR)} holds a trained {held} encoder, not {embedder}: use --embedder {held}, "
            f"or run `enrich train-encoder --embedder {embedder}` in a new --output folder"
        )


def _claim(run: RunDir, cfg: EmbedConfig) -> None:
    """Record which embedder fills this run dir; refuse to mix embedders' shards in one run."""
    ident, rel = cfg.identity(), schema.located(run, schema.EMBEDDER_IDENTITY)
    held = run.read_json(rel) if run.exists(rel) else None
    if held == ident:
        return
    if held is not None and run.shards(schema.EMBEDDINGS_DIR):
        raise ValueError(
            f"{run.uri} already holds embeddings from {held}, not {ident}: "
            "use a new --output folder to compare embedders"
        )
    run.write_json(rel, ident)


def run_embed(run: RunDir, cfg: EmbedConfig) -> dict:
    """Embed every ok manifest row into ``embeddings/part-NNNNN.parquet``; committed shards are skipped."""
    return execute(stages.EMBED, run, Context(RunConfig(embed=cfg), run.storage_options)).stats


def embeddings_match(run: RunDir, ctx: Context, stats: dict) -> None:
    """Completed embeddings are of this run's embedder, or the run is refused."""
    _claim(run, ctx.config.embed)


def compute_embeddings(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): every shard embedded, errors listed."""
    cfg = ctx.config.embed
    if cfg.embedder not in EMBEDDERS:
        raise ValueError(f"unknown embedder {cfg.embedder!r}: use {', '.join(EMBEDDERS)}")
    run.require(schema.MANIFEST_DIR, "manifest --input SRC")
    if cfg.embedder in ("vae", "contrastive"):
        run.require(schema.ENCODER_DIR, f"train-encoder --embedder {cfg.embedder}")
        _check_trained_model(run, cfg.embedder)
    start = time.monotonic()
    _claim(run, cfg)
    run.remove_stale_tmp(schema.EMBEDDINGS_DIR)
    n_shards = len(run.shards(schema.MANIFEST_DIR))
    stats = {"embedder": cfg.embedder, "n_shards": n_shards}
    if cfg.embedder == "byo":
        stats.update(import_embeddings(run, cfg))
    else:
        stats.update(_embed_with_actors(run, cfg, start))
    emb = run.read_table(schema.EMBEDDINGS_DIR, columns=["image_id"])
    errors_dir = schema.located(run, ERRORS_DIR)
    errors = run.read_table(errors_dir).num_rows if run.shards(errors_dir) else 0
    stats.update(n_embedded=emb.num_rows, n_errors=errors, seconds=round(time.monotonic() - start, 3))
    if len(run.shards(schema.EMBEDDINGS_DIR)) != n_shards:
        raise RuntimeError(f"embed: only {len(run.shards(schema.EMBEDDINGS_DIR))} of {n_shards} shards committed")
    if emb.num_rows == 0:
        raise ValueError(f"embed: no image of {run.uri} could be embedded; see {run.uri_of(ERRORS_DIR)}")
    log.info("embed: %d embeddings, %d errors in %.1fs", stats["n_embedded"], errors, stats["seconds"])
    return stats


def _embed_with_actors(run: RunDir, cfg: EmbedConfig, start: float) -> dict:
    """Run the pending shards through a Ray Data actor pool; returns device and pool size."""
    import ray  # imported here so the embedders above work where Ray is not installed (GPU checks)

    work = pending_shards(run)
    res = cluster_resources()
    n_actors, cpus, gpus, device = plan_actors(res, cfg, _cpus_per_gpu(ray) if res.gpus else None, _node_cpus(ray))
    n_actors = max(1, min(n_actors, len(work)))
    threads, decode_threads = actor_threads(cpus, device, cfg)
    if cfg.embedder in ("vae", "contrastive"):
        autocast_dtype(cfg.precision, device)  # a bad precision fails here, not inside every actor
    log.info(
        "embed: %d of %d shards to do, %d %s actor(s) of %g CPUs (%d decode threads) with %s embeddings, batch %d",
        len(work), len(run.shards(schema.MANIFEST_DIR)), n_actors, device.upper(), cpus, decode_threads,
        cfg.embedder, cfg.batch_size,
    )
    if work:
        quiet_ray_data()
        total, done = sum(len(w["ids"]) for w in work), 0
        ds = ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            ShardEmbedder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "run": run, "cfg": cfg, "device": device, "threads": threads, "decode_threads": decode_threads,
            },
        )
        for row in ds.iter_rows():
            done += int(row["n"]) + int(row["n_errors"])
            log.info(
                "embed: shard %d done (%d images, %d errors) in %.2fs; %d/%d images, %.0f images/s",
                row["shard"], row["n"], row["n_errors"], row["seconds"], done, total,
                done / max(time.monotonic() - start, 1e-9),
                extra={"shard_seconds": float(row["seconds"])},
            )
    return {"device": device, "actors": n_actors}


def _node_cpus(ray) -> int | None:
    """The most CPUs any alive node has (an actor must fit one node), None if unknown."""
    cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return max(cpus) if cpus and max(cpus) > 0 else None


def _cpus_per_gpu(ray) -> int | None:
    """The fewest CPUs per GPU on any alive node with GPUs (an actor must fit its node), None if unknown."""
    shares = [
        int(node["Resources"].get("CPU", 0)) // int(node["Resources"]["GPU"])
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) >= 1
    ]
    return min(shares) if shares else None


def check_embed(run: RunDir) -> tuple[dict, list[str]]:
    """Embedded + failed = manifest ok rows, no id twice, every vector finite, unit-norm, one dimension."""
    rows = nan = not_unit = 0
    dims: set[int] = set()
    for path in run.shards(schema.EMBEDDINGS_DIR).values():
        column = run.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        dims.add(column.type.list_size if hasattr(column.type, "list_size") else -1)
        if len(column) == 0:
            continue
        width = column.type.list_size
        x = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width).astype(np.float64)
        finite = np.isfinite(x).all(axis=1)
        nan += int(np.count_nonzero(~finite))
        not_unit += int(np.count_nonzero(np.abs(np.linalg.norm(x[finite], axis=1) - 1.0) > NORM_TOLERANCE))
        rows += len(column)
    ids = np.sort(ids_of(run, schema.EMBEDDINGS_DIR))
    failed = np.sort(ids_of(run, schema.located(run, schema.EMBED_ERRORS_DIR)))
    ok_ids = manifest_ok_ids(run)
    problems = []
    dup = count_duplicates(ids)
    if dup:
        problems.append(f"{dup} duplicate image_ids")
    if nan:
        problems.append(f"{nan} embeddings with NaN or infinite values")
    if not_unit:
        problems.append(f"{not_unit} embeddings are not L2-normalised")
    if len(dims) > 1:
        problems.append(f"shards of different embedding dimensions {sorted(dims)}")
    unknown = int(np.count_nonzero(~np.isin(ids, ok_ids)))
    if unknown:
        problems.append(f"{unknown} embedded image_ids are not ok rows of the manifest")
    both = int(np.count_nonzero(np.isin(ids, failed)))
    if both:
        problems.append(f"{both} image_ids are both embedded and listed as embed errors")
    accounted = len(np.union1d(ids, failed[np.isin(failed, ok_ids)]))
    if accounted != len(ok_ids):
        problems.append(
            f"{rows} embeddings + {len(failed)} embed errors do not cover the manifest's {len(ok_ids)} ok rows"
        )
    record = {
        "rows": rows,
        "manifest_ok_rows": int(len(ok_ids)),
        "errors": int(len(failed)),
        "dim": next(iter(dims)) if len(dims) == 1 else sorted(dims),
        "duplicate_ids": dup,
        "nan": nan,
    }
    return record, problems
