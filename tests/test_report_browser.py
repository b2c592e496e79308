"""The report of a real tiny run renders in headless Chromium, offline, and every image in it loads."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from enrich_dist.config import EvaluateConfig, RunConfig
from enrich_dist.datasets import make_echo_archive
from enrich_dist.evaluation import run_evaluate
from enrich_dist.pipeline import run_stages
from enrich_dist.report import run_report
from enrich_dist.storage import RunDir

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} not installed (Debian: apt-get install -y chromium; CI's .ci/run installs it)",
)

# Appended to a copy of the page: after load, list every image's size so --dump-dom can report it.
PROBE = """<script>
window.addEventListener("load", function () {
  var found = [];
  document.querySelectorAll("img").forEach(function (img) {
    found.push({complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, alt: img.alt});
  });
  var out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network: every host resolves to nothing."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


@pytest.fixture(scope="module")
def tiny_report(ray_local, tmp_path_factory) -> tuple[RunDir, dict]:
    """Every stage on an 80-image synthetic echo archive (2 patients, one of them test), then the report."""
    root = tmp_path_factory.mktemp("browser")
    archive = root / "archive"
    make_echo_archive(str(archive), 80, seed=1, workers=1, progress=False)
    cfg = RunConfig(input=str(archive / "manifest.csv"), output=str(root / "run"))
    cfg.encoder.epochs, cfg.encoder.sample = 1, 80
    cfg.similarity.block_size = 32
    cfg.select.replicates, cfg.select.budgets = 2, (0.25, 0.5, 1.0)
    run_stages(cfg, ("manifest", "train-encoder", "embed", "similarity", "select"))
    run = RunDir(cfg.output)
    run_evaluate(run, EvaluateConfig(model="linear", epochs=1, min_steps=5))
    return run, run_report(run)


def test_report_renders_offline_and_every_image_loads(tiny_report: tuple[RunDir, dict], tmp_path: Path) -> None:
    run, stats = tiny_report
    assert stats["missing"] == [] and stats["thumbnail_errors"] == 0
    page = Path(run.path("report/index.html")).read_text(encoding="utf-8")
    n_images = len(re.findall(r"<img ", page))
    assert n_images >= stats["thumbnails"] + len(stats["figures"])
    assert "classification_metric_vs_budget.png" in stats["figures"]

    # the page alone, away from the run dir and the archive: nothing it shows may come from elsewhere
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "index.html").write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", (alone / "index.html").as_uri()).stdout
    probe = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.S)
    assert probe, f"the probe did not run; Chromium printed: {dom[:500]}"
    images = json.loads(html.unescape(probe.group(1)))
    assert len(images) == n_images
    broken = [i for i in images if not i["complete"] or i["width"] == 0 or i["height"] == 0]
    assert broken == [], broken
    assert "Evaluation" in dom and "Labelling time saved" in dom


def test_report_screenshot_is_not_blank(tiny_report: tuple[RunDir, dict], tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    run, _ = tiny_report
    page = tmp_path / "index.html"
    shutil.copy(run.path("report/index.html"), page)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    with Image.open(shot) as img:
        assert img.size == (1200, 2400)
        assert max(ImageStat.Stat(img.convert("L")).stddev) > 10  # text, tables and figures, not an empty page
