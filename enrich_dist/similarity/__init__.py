"""Blocked all-pairs cosine similarity: histogram, threshold counts and top-k neighbours per image."""

from .kernel import TileStats, merge_topk, tile_stats
from .plan import histogram_edges, tile_plan
from .stage import compute_similarity, run_similarity

__all__ = [
    "TileStats",
    "compute_similarity",
    "histogram_edges",
    "merge_topk",
    "run_similarity",
    "tile_plan",
    "tile_stats",
]
