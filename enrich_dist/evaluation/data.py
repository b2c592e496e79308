"""What the evaluation trains on: the train/test split, budget sizes, ranking-prefix subsets, and the
images (and masks) decoded once at the model's input size."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ..config import resolve_size
from ..imaging import CROP_LEVEL, ImageError, decode, load_images, pad_square, resize
from ..storage import read_uri

GROUP_COLUMNS = ("patient_id", "clip_id")


@dataclass
class Images:
    """Manifest rows of the ok images, as numpy columns (strings as object arrays, None when null)."""

    image_id: np.ndarray
    uri: np.ndarray
    patient_id: np.ndarray
    clip_id: np.ndarray
    label: np.ndarray
    split: np.ndarray
    mask_uri: np.ndarray
    frame: np.ndarray
    columns: tuple[str, ...]

    @classmethod
    def from_manifest(cls, table: pa.Table) -> Images:
        """The ``status == ok`` rows of a manifest table, sorted by ``image_id``."""
        ok = table.filter(pc.fill_null(pc.equal(table["status"], "ok"), False)).sort_by("image_id")
        n = ok.num_rows

        def col(name: str) -> np.ndarray:
            if name not in ok.column_names:
                return np.full(n, None, dtype=object)
            return np.asarray(ok[name].cast(pa.string()).to_pylist(), dtype=object)

        return cls(
            image_id=ok["image_id"].to_numpy().astype(np.int64),
            uri=col("uri"),
            patient_id=col("patient_id"),
            clip_id=col("clip_id"),
            label=col("label"),
            split=col("split"),
            mask_uri=col("mask_uri"),
            frame=np.asarray(ok["frame"].to_pylist() if "frame" in ok.column_names else [None] * n, dtype=object),
            columns=tuple(ok.column_names),
        )

    def __len__(self) -> int:
        return len(self.image_id)

    def has_values(self, name: str) -> bool:
        """Whether column ``name`` exists and holds at least one non-null value."""
        return any(v is not None for v in getattr(self, name))


def split_groups(images: Images) -> tuple[np.ndarray, str]:
    """The grouping a tool-made split keeps on one side: patient, else clip, else the image itself."""
    for name in GROUP_COLUMNS:
        values = getattr(images, name)
        if all(v is not None for v in values) and len(values):
            return values, name
    return np.asarray([f"image-{i}" for i in images.image_id], dtype=object), "image_id"


def make_split(groups: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded group-disjoint split: a ``test_fraction`` share of the groups (at least one, never all) is test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"evaluate test_fraction must be in (0, 1), got {test_fraction}")
    names = np.unique(groups.astype(str))
    if len(names) < 2:
        raise ValueError(
            f"cannot make a test split from {len(names)} group(s): the archive needs at least two "
            "patients (or clips, or images), or a 'split' column with 'test' rows"
        )
    n_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    test = np.random.default_rng([seed, 1]).permutation(names)[:n_test]
    return np.isin(groups.astype(str), test)


def leaking_groups(groups: np.ndarray, is_test: np.ndarray) -> int:
    """How many groups have images on both sides of a split."""
    groups = groups.astype(str)
    return len(np.intersect1d(np.unique(groups[is_test]), np.unique(groups[~is_test])))


def budget_counts(budgets: list[float], n_train: int) -> list[tuple[float, int]]:
    """(budget, images) pairs below the full set: a fraction of ``n_train`` or a count, deduplicated."""
    out: dict[int, float] = {}
    for b in budgets:
        count = resolve_size(b, n_train)
        if count < 1 or count >= n_train:
            continue
        fraction = float(b) if isinstance(b, float) else count / n_train
        out.setdefault(count, fraction)
    return sorted(((f, c) for c, f in out.items()), key=lambda fc: fc[1])


def prefix_subset(order: np.ndarray, eligible: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` entries of ranking ``order`` (row positions) that are ``eligible`` (bool per row)."""
    picked = order[eligible[order]]
    return picked[:n]


def ranking_rows(ranking: pa.Table, replicate: int, image_ids: np.ndarray) -> np.ndarray:
    """Row positions (into sorted ``image_ids``) of one replicate's ranking, in rank order; unknown ids dropped."""
    rep = ranking.filter(pc.equal(ranking["replicate"], replicate)).sort_by("rank")
    ids = rep["image_id"].to_numpy()
    pos = np.searchsorted(image_ids, ids)
    pos = np.minimum(pos, len(image_ids) - 1)
    return pos[image_ids[pos] == ids].astype(np.int64)


def _content_box(img: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the pixels above the crop level (the whole image when none are)."""
    mask = img > CROP_LEVEL
    if not mask.any():
        return slice(None), slice(None)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def read_mask(data: bytes, name: str) -> np.ndarray:
    """A label map (H, W) of class indices from PNG/TIFF/NPY bytes (first channel of a colour image)."""
    if name.lower().endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype.kind not in "iub" or (arr.size and arr.min() < 0):
        raise ImageError(
            f"mask {name} is not a 2-D map of non-negative integer classes ({arr.dtype}, {arr.shape})"
        )
    return arr.astype(np.int64)


def load_pair(
    uri: str, mask_uri: str, size: int, storage_options: dict | None = None, frame: int | None = None, nifti_axis: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """An image (a frame of a cine/volume) and its mask cropped to the image's content, padded and resized together."""
    img = decode(read_uri(uri, storage_options), uri, frame, nifti_axis)
    mask = read_mask(read_uri(mask_uri, storage_options), mask_uri)
    if mask.shape != img.shape:
        raise ImageError(
            f"mask {mask_uri} is {mask.shape[1]}x{mask.shape[0]}, image is {img.shape[1]}x{img.shape[0]}"
        )
    box = _content_box(img)
    img, mask = pad_square(img[box]), pad_square(mask[box])
    small = Image.fromarray(mask.astype(np.int32), mode="I").resize((size, size), Image.Resampling.NEAREST)
    return resize(img, size), np.asarray(small, dtype=np.int64)


def load_chunk(
    uris: list[str],
    mask_uris: list[str] | None,
    size: int,
    storage_options: dict | None,
    frames: list[int | None] | None = None,
    nifti_axis: int = 2,
) -> tuple[np.ndarray, np.ndarray | None, list[str | None]]:
    """uint8 images (B, S, S), uint8 masks (or None) and a per-image error (None when decoded)."""
    frames = frames if frames is not None else [None] * len(uris)
    if mask_uris is None:
        x, errors = load_images(uris, size, storage_options, threads=1, frames=frames, nifti_axis=nifti_axis)
        return np.round(x * 255.0).astype(np.uint8), None, errors
    images = np.zeros((len(uris), size, size), np.uint8)
    masks = np.zeros((len(uris), size, size), np.uint8)
    errors: list[str | None] = [None] * len(uris)
    for i, (uri, mask_uri, frame) in enumerate(zip(uris, mask_uris, frames, strict=True)):
        try:
            img, mask = load_pair(uri, mask_uri, size, storage_options, frame, nifti_axis)
        except FileNotFoundError as exc:
            errors[i] = f"file not found: {exc}"
            continue
        except (ImageError, OSError, ValueError) as exc:
            errors[i] = str(exc) or type(exc).__name__
            continue
        if mask.max() > 255:
            errors[i] = f"mask {mask_uri} has class {int(mask.max())}; at most 255 classes are supported"
            continue
        images[i] = np.round(img * 255.0).astype(np.uint8)
        masks[i] = mask.astype(np.uint8)
    return images, masks, errors
