"""The report stage: one self-contained HTML page built from the run directory's artifacts only."""

from .artifacts import redundant_groups
from .stage import run_report

__all__ = ["run_report", "redundant_groups"]
