"""Evaluation: models trained on ENRICH vs random subsets, scored on the test split, with statistics."""

from .stage import run_evaluate

__all__ = ["run_evaluate"]
