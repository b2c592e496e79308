"""The report's pictures: matplotlib charts and image thumbnails, each rendered to PNG bytes."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from ..imaging import decode
from ..storage import read_uri

THUMB_SIZE = 96
METHOD_COLORS = {"enrich": "#1b7837", "random": "#762a83"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def similarity_histogram(edges: Sequence[float], counts: Sequence[int], thresholds: Sequence[float]) -> bytes:
    """Bars of the all-pairs similarity histogram (log y when counts span decades), thresholds dashed."""
    edges_a = np.asarray(edges, dtype=np.float64)
    counts_a = np.asarray(counts, dtype=np.float64)
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges_a[:-1], counts_a, width=np.diff(edges_a), align="edge", color="#4575b4", linewidth=0)
    positive = counts_a[counts_a > 0]
    if positive.size and positive.max() > 100 * positive.min():
        ax.set_yscale("log")
    for t in thresholds:
        ax.axvline(t, color="#d73027", linestyle="--", linewidth=1)
    ax.set_xlabel("cosine similarity of an image pair")
    ax.set_ylabel("pairs")
    ax.set_xlim(edges_a[0], edges_a[-1])
    return _png(fig)


def paper_bins(labels: Sequence[str], fractions: Sequence[float]) -> bytes:
    """Bar chart of the share of pairs in the paper's Figure 1 similarity bins."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    percents = [100.0 * f for f in fractions]
    bars = ax.bar(range(len(labels)), percents, color="#4575b4")
    ax.bar_label(bars, labels=[f"{p:.1f}%" for p in percents], fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("% of pairs")
    ax.margins(y=0.15)
    return _png(fig)


def coverage(series: Mapping[str, Mapping[str, Sequence[float]]]) -> bytes:
    """Patients and clips covered vs budget, one line with error bars per method.

    ``series[method]`` holds equal-length ``budget``, ``patients_mean``, ``patients_std``,
    ``clips_mean`` and ``clips_std`` sequences.
    """
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    for i, (what, title) in enumerate((("patients", "patients covered"), ("clips", "clips covered"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, s in series.items():
            budget = 100.0 * np.asarray(s["budget"], dtype=np.float64)
            ax.errorbar(
                budget,
                s[f"{what}_mean"],
                yerr=s[f"{what}_std"],
                label=method,
                marker="o",
                markersize=3,
                capsize=3,
                color=METHOD_COLORS.get(method),
            )
        ax.set_xlabel("budget (% of images)")
        ax.set_ylabel(title)
        ax.legend()
    return _png(fig)


def metric_vs_budget(
    series: Mapping[str, Mapping[str, Sequence[float]]],
    full: tuple[float, float] | None,
    significant: Sequence[float],
    metric: str,
) -> bytes:
    """The paper's Figure 2: test metric vs budget per method (mean ± sd), the full-set reference.

    ``series[method]`` holds equal-length ``budget``, ``mean``, ``std`` and ``matches_full`` (1 when
    the budget is indistinguishable from the full set: filled marker, else hollow); ``full`` is the
    full set's (mean, std), drawn as a line and band; ``significant`` are the budgets where ENRICH and
    random differ (marked with an asterisk).
    """
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.add_subplot()
    if full is not None:
        mean, std = full
        ax.axhline(mean, color="#444444", linestyle="--", linewidth=1, label="full training set")
        ax.axhspan(mean - std, mean + std, color="#999999", alpha=0.2, linewidth=0)
    top = []
    for method, s in series.items():
        budget = 100.0 * np.asarray(s["budget"], dtype=np.float64)
        mean_a = np.asarray(s["mean"], dtype=np.float64)
        std_a = np.asarray(s["std"], dtype=np.float64)
        color = METHOD_COLORS.get(method)
        ax.errorbar(budget, mean_a, yerr=std_a, label=method, color=color, capsize=3, linewidth=1.2)
        matches = np.asarray(s["matches_full"], dtype=bool)
        ax.plot(budget[matches], mean_a[matches], "o", color=color, markersize=5)
        ax.plot(budget[~matches], mean_a[~matches], "o", markerfacecolor="white", color=color, markersize=5)
        top.append(mean_a + std_a)
    if significant and top:
        ceiling = float(np.nanmax(np.concatenate(top)))
        for b in significant:
            ax.annotate("*", (100.0 * b, ceiling), ha="center", va="bottom", fontsize=14, color="#d73027")
        ax.margins(y=0.12)
    ax.set_xlabel("budget (% of training images)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def labelling_time(full_hours: float, saved_hours: Mapping[str, float | None]) -> bytes:
    """The paper's Figure 3: hours of expert labelling saved by each method's smallest sufficient subset."""
    methods = list(saved_hours)
    values = [saved_hours[m] or 0.0 for m in methods]
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(methods)), values, color=[METHOD_COLORS.get(m, "#4575b4") for m in methods])
    labels = [
        "no budget matched"
        if saved_hours[m] is None
        else f"{v:,.2f} h" + (f" ({100 * v / full_hours:.0f}%)" if full_hours > 0 else "")
        for m, v in zip(methods, values, strict=True)
    ]
    ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("labelling hours saved")
    ax.set_title(f"labelling the full training set: {full_hours:,.2f} h", fontsize=10)
    ax.set_ylim(0, max(full_hours, 1e-9) * 1.1)
    return _png(fig)


LOSS_PANELS = (
    ("total loss", ("train_total", "val_total")),
    ("reconstruction", ("train_recon", "val_recon")),
    ("KL divergence", ("train_kl", "val_kl")),
    ("contrastive loss", ("train_loss",)),
    ("held-out view retrieval", ("val_view_retrieval",)),
)


def loss_curves(history: Mapping[str, Sequence[float]]) -> bytes | None:
    """Encoder losses per epoch, one panel per term present; None without any curve."""
    panels = [(title, [k for k in keys if any(v is not None for v in history.get(k) or [])]) for title, keys in LOSS_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    epochs = list(history.get("epoch") or [])
    fig = Figure(figsize=(3.6 * len(panels), 3.0), layout="constrained")
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            values = np.asarray([np.nan if v is None else v for v in history[key]], dtype=np.float64)
            x = epochs[: len(values)] if len(epochs) >= len(values) else np.arange(1, len(values) + 1)
            ax.plot(x, values, label=key.split("_")[0], linestyle="--" if key.startswith("val") else "-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return _png(fig)


def thumbnail(
    uri: str, storage_options: dict | None = None, size: int = THUMB_SIZE, frame: int | None = None, nifti_axis: int = 2
) -> bytes:
    """A grayscale PNG thumbnail (longest side ``size``) of one archive image (a frame of a cine/volume)."""
    gray = decode(read_uri(uri, storage_options), uri, frame, nifti_axis)
    img = Image.fromarray(np.round(gray * 255.0).astype(np.uint8), mode="L")
    return _encode_png(ImageOps.contain(img, (size, size)))


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI embedding PNG bytes in the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
