"""Blocked all-pairs cosine similarity: histogram, threshold counts and top-k neighbors per image.

Names are imported on first use, so the kernels load without Ray (the GPU check runs where only
torch and numba are installed).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TileStats": "kernel",
    "merge_topk": "kernel",
    "tile_stats": "kernel",
    "histogram_edges": "plan",
    "tile_plan": "plan",
    "compute_similarity": "stage",
    "run_similarity": "stage",
    "sibling_recall": "siblings",
    "sibling_recall_from_embeddings": "siblings",
    "sibling_recall_from_run": "siblings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
