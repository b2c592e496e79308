"""The report stage: one self-contained HTML page built from the run directory's artifacts only."""

from __future__ import annotations

import logging
import posixpath
import time

from .. import stages
from ..config import ReportConfig, RunConfig, check_section
from ..executor import Context, execute
from ..schema import REPORT_INDEX, RUN_JSON
from ..storage import RunDir
from . import sections
from .artifacts import (
    N_GROUP_NEIGHBORS,
    N_GROUPS,
    SUMMARY,
    duplicate_groups,
    gallery_ids,
    load_manifest,
    load_neighbors,
    read_json,
    redundant_groups,
)
from .evaluation import evaluation
from .galleries import duplicate_gallery, galleries
from .html import page, section
from .page import ReportPage
from .prediction import prediction

logger = logging.getLogger("enrich_dist.report")

INDEX = REPORT_INDEX


REPORT_IMAGES = ("thumbnails", "none")


def run_report(run: RunDir, images: str = "thumbnails") -> dict:
    """Write ``report/index.html`` (figures embedded, PNG copies beside it) from whatever artifacts exist.

    ``images`` "none" leaves out every archive image (galleries, encoder pictures) and every uri or path.
    """
    ctx = Context(RunConfig(report=ReportConfig(images=images)), run.storage_options)
    return execute(stages.REPORT, run, ctx).stats


def compute_report(run: RunDir, ctx: Context) -> dict:
    """The stage's work (always rewritten; the executor checks the page is whole)."""
    check_section("report", ctx.config.report)
    images = ctx.config.report.images
    start = time.perf_counter()
    out = ReportPage(run, images=images)
    run_info = read_json(run, RUN_JSON)
    top, unique = load_neighbors(run)
    groups = redundant_groups(top or [], N_GROUPS, N_GROUP_NEIGHBORS)
    summary = read_json(run, SUMMARY)
    dup_threshold, dup_groups = duplicate_groups(run, summary)
    shown = gallery_ids(groups, unique) | {i for _, ids in dup_groups for i in ids}
    manifest = load_manifest(run, shown)
    header = sections.header(out, manifest)
    parts = [
        ("redundancy", "Redundancy", sections.redundancy(out, summary)),
        ("galleries", "Galleries", [*galleries(out, top is not None, groups, unique, manifest),
                                    *duplicate_gallery(out, dup_threshold, dup_groups, manifest)]),
        ("selection", "Selection", sections.selection(out, manifest)),
        ("prediction", "Before labelling: will ENRICH beat random here?", prediction(out)),
        ("evaluation", "Evaluation", evaluation(out)),
        ("encoder", "Encoder", sections.encoder(out)),
        ("config", "Config and timings", sections.config(out, run_info)),
    ]
    doc = page(
        "ENRICH report" if out.private else f"ENRICH report: {posixpath.basename(run.uri.rstrip('/'))}",
        header,
        [(anchor, title, section(anchor, title, body)) for anchor, title, body in parts],
    )
    run.write_bytes(INDEX, doc.encode("utf-8"))
    stats = {
        "report": run.uri_of(INDEX),
        "figures": out.figures,
        "missing": out.missing,
        "groups": len(groups),
        "thumbnails": out.thumbnails,
        "thumbnail_errors": out.thumbnail_errors,
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "report written to %s (%d figures, %d thumbnails, %d failed, missing: %s)",
        stats["report"],
        len(out.figures),
        out.thumbnails,
        out.thumbnail_errors,
        ", ".join(out.missing) or "none",
    )
    return stats


def check_report(run: RunDir) -> tuple[dict, list[str]]:
    """The page exists and is a complete HTML document."""
    index = INDEX
    if not run.exists(index):
        return {"bytes": 0}, [f"{index} is missing"]
    data = run.read_bytes(index)
    problems = [] if data.rstrip().endswith(b"</html>") else [f"{index} is not a complete HTML page"]
    return {"bytes": len(data)}, problems
