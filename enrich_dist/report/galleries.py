"""The galleries: the most redundant groups of near-duplicates and the most unique images."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from ..imaging import manifest_nifti_axis
from . import figures
from .artifacts import DuplicateGroup, Group, Manifest, gallery_ids
from .html import Markup, join, note, tag, thumb
from .page import ReportPage

logger = logging.getLogger("enrich_dist.report")

THUMB_THREADS = 4


def thumbnails(out: ReportPage, ids: set[int], manifest: Manifest | None) -> dict[int, tuple[str | None, str | None]]:
    """Thumbnail data URI (or the error instead) of each image id, decoded in a few threads."""
    images = manifest.images if manifest else {}
    axis = manifest_nifti_axis(out.run)

    def one(image_id: int) -> tuple[str | None, str | None]:
        row = images.get(image_id)
        if row is None or not row.get("uri"):
            return None, f"image {image_id} not in the manifest"
        try:
            png = figures.thumbnail(row["uri"], out.run.storage_options, frame=row.get("frame"), nifti_axis=axis)
            return figures.data_uri(png), None
        except FileNotFoundError:
            return None, "file not found"
        except Exception as exc:  # any decoder failure becomes a placeholder, never a crashed report
            return None, f"{type(exc).__name__}: {exc}"[:200]

    ordered = sorted(ids)
    with ThreadPoolExecutor(max_workers=THUMB_THREADS) as pool:
        result = dict(zip(ordered, pool.map(one, ordered), strict=True))
    out.thumbnails += len(result)
    failed = {i: e for i, (_, e) in result.items() if e}
    out.thumbnail_errors += len(failed)
    if failed:
        logger.warning(
            "%d of %d thumbnails could not be drawn (e.g. image %d: %s)",
            len(failed),
            len(result),
            *next(iter(failed.items())),
        )
    return result


def duplicate_gallery(
    out: ReportPage, threshold: str | None, groups: list[DuplicateGroup], manifest: Manifest | None
) -> list[Markup]:
    """The largest near-duplicate groups at the strictest threshold, as rows of thumbnails (to check by eye)."""
    if threshold is None or not groups:
        return []
    if out.private:
        return [note("Near-duplicate groups left out: --report-images none.")]
    thumbs = thumbnails(out, {i for _, ids in groups for i in ids}, manifest)
    parts = [
        tag("h3", f"Largest near-duplicate groups (similarity > {threshold})"),
        note("Each row: up to 8 images of one group (connected pairs above the threshold), lowest ids first. "
             "A group of unlike images means the threshold is too low for this embedding."),
    ]
    for size, ids in groups:
        cells = [thumb(thumbs[i][0], f"#{i}", thumbs[i][1]) for i in ids]
        parts.append(tag("p", f"{size} images", cls="caption"))
        parts.append(tag("div", join(cells), cls="group"))
    return parts


def galleries(
    out: ReportPage, have_neighbors: bool, groups: list[Group], unique: list[dict], manifest: Manifest | None
) -> list[Markup]:
    """Most redundant groups (image + top neighbors) and the most unique images, as thumbnails."""
    if not have_neighbors:
        return [out.absent("nearest neighbors (similarity/neighbors/part-*.parquet)", "enrich similarity")]
    if out.private:
        return [note("Galleries left out: this report was made with --report-images none (no image, no path).")]
    thumbs = thumbnails(out, gallery_ids(groups, unique), manifest)
    images = manifest.images if manifest else {}

    def cell(image_id: int, caption: str, anchor: bool = False) -> Markup:
        src, error = thumbs[image_id]
        row = images.get(image_id, {})
        hover = " ".join(str(row[k]) for k in ("uri", "label") if row.get(k))
        return thumb(src, caption, error, anchor=anchor, title=hover or None)

    parts = [
        tag("h3", "Most redundant groups"),
        note(
            "Each row: an image with the highest similarity to any other image (outlined), "
            "then its nearest neighbors with their similarity."
        ),
    ]
    for row, nbrs in groups:
        cells = [cell(row["image_id"], f"#{row['image_id']} max {row['max_sim']:.3f}", anchor=True)]
        cells += [cell(i, f"#{i} {s:.3f}") for i, s in nbrs]
        parts.append(tag("div", join(cells), cls="group"))
    parts += [
        tag("h3", "Most unique images"),
        note("Images whose nearest neighbor is least similar (max similarity shown)."),
    ]
    parts.append(
        tag(
            "div",
            join(cell(r["image_id"], f"#{r['image_id']} max {r['max_sim']:.3f}") for r in unique),
            cls="thumbs",
        )
    )
    return parts
