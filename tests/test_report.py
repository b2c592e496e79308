"""The report renders whatever artifacts exist, escapes data, and never crashes on a bad image."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from enrich_dist import schema
from enrich_dist.evaluation.stats import summarize
from enrich_dist.report import redundant_groups, run_report
from enrich_dist.storage import RunDir

EVIL = "<script>alert(1)</script>"
N_IMAGES = 10
THRESHOLDS = (0.5, 0.7, 0.9)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _embeddings(n: int) -> np.ndarray:
    """Unit vectors in pairs of near-duplicates, so some images are clearly redundant."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n // 2, 8))
    x = np.repeat(base, 2, axis=0)[:n] + 0.1 * rng.normal(size=(n, 8))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_manifest(run: RunDir, archive: Path) -> list[str]:
    rng = np.random.default_rng(1)
    folder = archive / f"a{EVIL}b"  # a URI with markup in it must come out escaped
    folder.mkdir(parents=True)
    uris = []
    for i in range(N_IMAGES):
        path = folder / f"img_{i:02d}.png"
        path.write_bytes(_png(rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)))
        uris.append(str(path))
    rows = {
        "image_id": list(range(N_IMAGES + 1)),
        "uri": [*uris, str(archive / "broken.dcm")],
        "patient_id": [f"p{i // 4}" for i in range(N_IMAGES + 1)],
        "clip_id": [f"c{i // 2}" for i in range(N_IMAGES + 1)],
        "frame": [0] * (N_IMAGES + 1),
        "label": [EVIL if i % 3 == 0 else "normal" for i in range(N_IMAGES + 1)],
        "split": ["train"] * (N_IMAGES + 1),
        "mask_uri": [None] * (N_IMAGES + 1),
        "status": ["ok"] * N_IMAGES + ["error"],
        "error": [None] * N_IMAGES + [f"cannot decode {EVIL}"],
    }
    run.write_table("manifest/part-00000.parquet", pa.table(rows, schema=schema.MANIFEST))
    return uris


def _write_similarity(run: RunDir, paper_bins_as_dict: bool = False, with_siblings: bool = True) -> None:
    x = _embeddings(N_IMAGES)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :4]
    rows = {
        "image_id": list(range(N_IMAGES)),
        "max_sim": sims.max(axis=1).astype(np.float32),
        "nn_ids": [o.tolist() for o in order],
        "nn_sims": [sims[i, o].astype(np.float32).tolist() for i, o in enumerate(order)],
        **{schema.threshold_column(t): (sims > t).sum(axis=1) for t in THRESHOLDS},
    }
    run.write_table(
        "similarity/neighbors/part-00000.parquet", pa.table(rows, schema=schema.neighbors_schema(THRESHOLDS))
    )
    pairs = sims[np.triu_indices(N_IMAGES, 1)]
    counts, edges = np.histogram(pairs, bins=20, range=(-1, 1))
    bins = {
        "<=0.5": int((pairs <= 0.5).sum()),
        "0.5-0.7": int(((pairs > 0.5) & (pairs <= 0.7)).sum()),
        "0.7-0.9": int(((pairs > 0.7) & (pairs <= 0.9)).sum()),
        ">0.9": int((pairs > 0.9).sum()),
    }
    paper = (
        {k: {"pairs": v, "fraction": v / len(pairs)} for k, v in bins.items()}
        if paper_bins_as_dict
        else [{"label": k, "pairs": v, "fraction": v / len(pairs)} for k, v in bins.items()]
    )
    thresholds = {
        f"{t:g}": {
            "pairs": int((pairs > t).sum()),
            "pair_fraction": float((pairs > t).mean()),
            "images_with_neighbor": int((sims.max(axis=1) > t).sum()),
            "image_fraction": float((sims.max(axis=1) > t).mean()),
        }
        for t in THRESHOLDS
    }
    summary = {
        "n_images": N_IMAGES,
        "n_pairs": len(pairs),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "thresholds": thresholds,
        "paper_bins": paper,
        "exact": True,
        "seconds": 0.1,
        "sibling_recall": {"at_1": 0.84, "at_k": 0.9123, "k": 10, "n_eligible": 2950},
        "sibling_recall_not_measured": None,
    }
    if not with_siblings:
        summary.update(sibling_recall=None, sibling_recall_not_measured="the manifest has no clip ids")
    run.write_json("similarity/summary.json", summary)


def _write_selection(run: RunDir) -> None:
    ranking = {
        "replicate": [0] * N_IMAGES,
        "rank": list(range(N_IMAGES)),
        "image_id": list(range(N_IMAGES)),
        "is_seed": [i < 2 for i in range(N_IMAGES)],
        "round": [0, 0] + [1 + i // 4 for i in range(N_IMAGES - 2)],
        "score": [None, None] + [0.1 * i for i in range(N_IMAGES - 2)],
    }
    run.write_table("selection/ranking.parquet", pa.table(ranking, schema=schema.RANKING))
    rows = []
    for method in ("random", "enrich"):
        for replicate in range(2):
            for budget in (0.3, 0.6, 1.0):
                n = round(budget * N_IMAGES)
                gain = 1 if method == "enrich" else 0
                rows.append(
                    {
                        "method": method,
                        "replicate": replicate,
                        "budget": budget,
                        "n_images": n,
                        "n_patients": min(3, 1 + n // 4 + gain),
                        "n_clips": min(5, n // 2 + gain + replicate),
                        "label_counts": [(EVIL, n // 3), ("normal", n - n // 3)],
                    }
                )
    run.write_table("selection/subsets.parquet", pa.Table.from_pylist(rows, schema=schema.SUBSETS))


def _write_encoder_and_run_json(run: RunDir) -> None:
    history = {
        "epoch": [1, 2, 3],
        "train_total": [3.0, 2.0, 1.5],
        "val_total": [3.1, 2.2, 1.7],
        "train_kl": [1, 0.8, 0.7],
    }
    run.write_json("encoder/train.json", {"config": {"beta": 4.0, "latent_dim": 128}, "history": history})
    run.write_bytes("encoder/reconstructions.png", _png(np.zeros((16, 32), dtype=np.uint8)))
    stages = {
        "manifest": {
            "started": "2025-01-01T00:00:00",
            "ended": "2025-01-01T00:00:02",
            "seconds": 2.0,
            "stats": {"ok": N_IMAGES},
        }
    }
    run.write_json(
        "run.json",
        {
            "config": {"input": f"s3://b/{EVIL}", "similarity": {"top_k": 4}},
            "versions": {"numpy": "2"},
            "stages": stages,
        },
    )


def _write_evaluation(run: RunDir) -> None:
    rows = [
        {"method": "full", "budget": 1.0, "replicate": r, "n_train": 8, "metric": 0.9 + 0.01 * r} for r in range(3)
    ]
    for i, budget in enumerate((0.3, 0.6)):
        for r in range(3):
            rows.append({"method": "enrich", "budget": budget, "replicate": r, "n_train": 3 + 3 * i, "metric": 0.85 + 0.03 * i + 0.01 * r})
            rows.append({"method": "random", "budget": budget, "replicate": r, "n_train": 3 + 3 * i, "metric": 0.6 + 0.01 * r})
    stats = summarize(rows, alpha=0.05, seconds_per_image=1.0)
    meta = {"task": "classification", "metric": "auc", "model": "cnn", "image_size": 32, "n_train": 8, "n_test": 2}
    run.write_json("evaluation/stats.json", {"classification": {**meta, "split": {"source": EVIL}, **stats}})


@pytest.fixture
def full_run(tmp_path: Path) -> tuple[RunDir, list[str]]:
    run = RunDir(str(tmp_path / "run"))
    uris = _write_manifest(run, tmp_path / "archive")
    _write_similarity(run)
    _write_selection(run)
    _write_evaluation(run)
    _write_encoder_and_run_json(run)
    return run, uris


def _page(run: RunDir) -> str:
    return run.read_bytes("report/index.html").decode("utf-8")


def _check_images(page: str, report_dir: Path) -> tuple[int, int]:
    """Every <img src> is an existing file beside index.html or a valid PNG data URI; returns both counts."""
    files = data = 0
    for src in (html.unescape(s) for s in re.findall(r'<img src="([^"]*)"', page)):
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,")
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
            Image.open(io.BytesIO(png)).verify()
            data += 1
        else:
            assert "/" not in src and (report_dir / src).is_file(), src
            files += 1
    return files, data


def test_full_report_renders_every_section(full_run: tuple[RunDir, list[str]]) -> None:
    run, _ = full_run
    run.mark_done("embeddings", {"embedder": "contrastive", "n_shards": 1})
    stats = run_report(run)
    page = _page(run)
    assert stats["missing"] == [] and stats["thumbnail_errors"] == 0
    assert "cosine distance of contrastive-encoder embeddings" in page  # names the embedder the run used
    assert stats["groups"] >= 1 and stats["thumbnails"] > 0
    files, data = _check_images(page, Path(run.uri) / "report")
    # histogram, paper bins, coverage, metric vs budget, labelling time, loss, reconstructions
    assert len(stats["figures"]) == 7 and files == 0  # figures are embedded, so the page stands alone
    assert all((Path(run.uri) / "report" / name).is_file() for name in stats["figures"])  # and saved beside it
    assert data >= stats["thumbnails"] + len(stats["figures"])  # an image may appear in both galleries
    for text in (
        "Redundancy",
        "Most redundant groups",
        "Most unique images",
        "enrich",
        "random",
        "Stage timings",
        "Labelling time saved",
        "p enrich vs random",
        "for 84.00% of the 2,950 images that have another frame of their clip, the most similar image is a frame "
        "of the same clip (recall@10: 0.91",
        "only partially",
    ):
        assert text in page
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert html.escape(f"s3://b/{EVIL}") in page and html.escape(f"a{EVIL}b") in page
    assert "enrich select" not in page and "enrich evaluate" not in page
    assert run_report(run)["figures"] == stats["figures"]  # a rerun overwrites the same files


def test_missing_artifacts_render_with_the_command_to_run(tmp_path: Path) -> None:
    empty = RunDir(str(tmp_path / "empty"))
    page_stats = run_report(empty)
    page = _page(empty)
    for command in ("enrich manifest", "enrich similarity", "enrich select", "enrich evaluate", "enrich train-encoder"):
        assert command in page
    assert page_stats["figures"] == [] and len(page_stats["missing"]) == 7

    run = RunDir(str(tmp_path / "run"))
    _write_manifest(run, tmp_path / "archive")
    _write_similarity(run, paper_bins_as_dict=True, with_siblings=False)
    stats = run_report(run)
    page = _page(run)
    assert "enrich select" in page and "enrich manifest" not in page
    assert "Sibling recall: not measured (the manifest has no clip ids)." in page and "recall@" not in page
    assert set(stats["figures"]) == {"similarity_histogram.png", "paper_bins.png"}
    _check_images(page, Path(run.uri) / "report")


def test_bad_images_become_placeholders(full_run: tuple[RunDir, list[str]]) -> None:
    run, uris = full_run
    Path(uris[0]).write_bytes(Path(uris[0]).read_bytes()[:200])  # a truncated PNG
    for uri in uris[1:]:
        Path(uri).unlink()
    stats = run_report(run)
    page = _page(run)
    assert stats["thumbnail_errors"] == stats["thumbnails"] > 0
    assert page.count('class="placeholder"') >= stats["thumbnails"]
    assert "cannot decode image" in page and "file not found" in page
    _check_images(page, Path(run.uri) / "report")


def test_redundant_groups_skip_images_already_shown() -> None:
    rows = [
        {"image_id": 0, "max_sim": 0.99, "nn_ids": [1, 2], "nn_sims": [0.99, 0.9]},
        {"image_id": 1, "max_sim": 0.99, "nn_ids": [0], "nn_sims": [0.99]},
        {"image_id": 3, "max_sim": 0.95, "nn_ids": [2, 0, 4], "nn_sims": [0.95, 0.8, 0.7]},
        {"image_id": 5, "max_sim": 0.5, "nn_ids": None, "nn_sims": None},
    ]
    groups = redundant_groups(rows, n_groups=8, n_neighbors=2)
    assert [(r["image_id"], nbrs) for r, nbrs in groups] == [
        (0, [(1, 0.99), (2, 0.9)]),
        (3, [(2, 0.95), (0, 0.8)]),
        (5, []),
    ]
    assert len(redundant_groups(rows, n_groups=1, n_neighbors=2)) == 1


@pytest.mark.parametrize(
    "recall, words",
    [
        ({"at_1": 0.95, "at_k": 0.97, "k": 5, "n_eligible": 40}, ["95.00% of the 40 images", "recall@5: 0.97",
                                                                  "recognises near-duplicate frames: the"]),
        ({"at_1": 0.5, "at_k": 0.6, "k": 3, "n_eligible": 1234}, ["50.00% of the 1,234 images", "only partially"]),
        ({"at_1": 0.1, "at_k": 0.2, "k": 10, "n_eligible": 7}, ["largely does not", "--embedder contrastive"]),
        (None, ["Sibling recall: not measured (no clip has 2 or more embedded images)."]),
    ],
)
def test_sibling_recall_in_words(tmp_path: Path, recall: dict | None, words: list[str]) -> None:
    """The measured numbers with what they say about the embedding, or why nothing was measured."""
    from enrich_dist.report import sections
    from enrich_dist.report.page import ReportPage

    why = None if recall else "no clip has 2 or more embedded images"
    summary = {"n_images": 3, "n_pairs": 3, "exact": True, "thresholds": {}, "sibling_recall": recall,
               "sibling_recall_not_measured": why}
    text = " ".join(str(p) for p in sections.redundancy(ReportPage(RunDir(str(tmp_path))), summary))
    for w in words:
        assert w in text
    assert "approximate neighbor lists" not in text
    text = " ".join(str(p) for p in sections.redundancy(ReportPage(RunDir(str(tmp_path))), {**summary, "exact": False}))
    assert ("Measured on the approximate neighbor lists." in text) == (recall is not None)
    old = {k: v for k, v in summary.items() if not k.startswith("sibling")}  # written before sibling recall
    text = " ".join(str(p) for p in sections.redundancy(ReportPage(RunDir(str(tmp_path))), old))
    assert "Sibling recall: not measured (similarity/summary.json does not record it)." in text


def test_near_duplicates_in_the_report(tmp_path: Path) -> None:
    """Groups, removal share and leakage from the similarity summary; what is missing is said, not invented."""
    from enrich_dist.report import sections
    from enrich_dist.report.page import ReportPage

    dups = {
        "keep": "lowest_id",
        "thresholds": {"0.9": {"folder": "duplicates/t=0.90", "pairs": 120, "groups": 4, "images_in_groups": 40,
                               "largest_groups": [20, 10, 6, 4], "remove": 30, "remove_fraction": 0.3}},
        "leakage": {"threshold": 0.9, "pairs": 7, "by": {"splits": 5, "patients": 3}, "path": "duplicates/leakage.parquet"},
    }
    base = {"n_images": 100, "n_pairs": 4950, "exact": True, "thresholds": {}}

    def text(summary: dict) -> str:
        return " ".join(str(p) for p in sections.redundancy(ReportPage(RunDir(str(tmp_path))), summary))

    page = text({**base, "duplicates": dups})
    for w in ["20, 10, 6, 4", "30 (30.00%)", "Warning: 7 near-duplicate pairs", "5 across splits", "3 across patients",
              "keep order: lowest id"]:
        assert w in page
    clean = text({**base, "duplicates": {**dups, "leakage": {**dups["leakage"], "pairs": 0}}})
    assert "Leakage: no near-duplicate pair" in clean and "Warning" not in clean
    assert "Leakage: not checked" in text({**base, "duplicates": {**dups, "leakage": None}})
    assert "Near-duplicate groups: not computed" in text(base)


def test_report_without_images_or_paths(full_run: tuple[RunDir, list[str]]) -> None:
    """--report-images none: no archive image and no uri or path anywhere in the HTML; charts stay."""
    run, uris = full_run
    stats = run_report(run, images="none")
    page = _page(run)
    assert stats["thumbnails"] == 0 and not any(n in stats["figures"] for n in ("views.png", "reconstructions.png"))
    files, data = _check_images(page, Path(run.uri) / "report")
    assert files == 0 and data == len(stats["figures"]) > 0  # only the charts
    for uri in uris:
        assert uri not in page and html.escape(uri) not in page
    assert run.uri not in page and "s3://" not in page and str(Path(run.uri).parent) not in page
    assert "--report-images none" in page
    with pytest.raises(ValueError, match=r"report.images \(--report-images\) must be one of thumbnails, none"):
        run_report(run, images="blurred")


def test_largest_duplicate_groups_are_shown_at_the_strictest_threshold(tmp_path: Path) -> None:
    """The gallery picks the strictest threshold with groups, its largest groups first, lowest ids first;
    with --report-images none it shows no image and no id."""
    import pyarrow as pa

    run = RunDir(str(tmp_path / "run"))
    rows = {"duplicates/t=0.90": [(i, 0, 30) for i in range(30)],
            "duplicates/t=0.98": [(40 + i, 1, 3) for i in range(3)] + [(50 + i, 2, 12) for i in range(12)]
            + [(70, 3, 2), (71, 3, 2)] + [(80, 4, 2), (81, 4, 2)]}
    for folder, table in rows.items():
        run.write_table(f"{folder}/groups.parquet", pa.table({
            "image_id": [r[0] for r in table], "group_id": [r[1] for r in table], "group_size": [r[2] for r in table]}))
    dups = {"keep": "lowest_id", "leakage": None, "thresholds": {
        "0.9": {"folder": "duplicates/t=0.90", "pairs": 400, "groups": 1, "images_in_groups": 30, "largest_groups": [30],
                "remove": 29, "remove_fraction": 0.29},
        "0.98": {"folder": "duplicates/t=0.98", "pairs": 80, "groups": 4, "images_in_groups": 19,
                 "largest_groups": [12, 3, 2, 2], "remove": 15, "remove_fraction": 0.15}}}
    run.write_json("similarity/summary.json", {"duplicates": dups})
    run_report(run)
    page = _page(run)
    start = page.index("Largest near-duplicate groups (similarity &gt; 0.98)")
    shown = re.findall(r"(\d+) images</p>", page[start:])
    assert shown[:3] == ["12", "3", "2"]  # three largest, biggest first; ties by group id
    section = page[start:]
    assert "#50<" in section and "#57<" in section and "#58<" not in section  # at most 8 members, lowest ids
    assert "#80<" not in section  # the fourth group is left out
    run_report(run, images="none")
    private = _page(run)
    assert "Largest near-duplicate groups" not in private and "#50<" not in private


def test_cells_mode_says_what_it_left_out(full_run: tuple[RunDir, list[str]]) -> None:
    run, _ = full_run
    run.write_json(
        "selection/selection.json",
        {"cells": {"n_cells": 9766, "cell_size": 1024, "products_per_replicate": 5.1e9, "products_complete": 5e13}},
    )
    run_report(run)
    page = _page(run)
    assert "farthest-first within 9,766 k-means cells of about 1,024 images (cells mode), 0.01% of the" in page
    assert "picks in its own cell only" in page
