"""Synthetic archives the project makes itself (no downloads): the fetal-echo archive."""

from .echo import CHAMBERS, ClipParams, PatientParams, make_echo_archive, render_clip

__all__ = ["CHAMBERS", "ClipParams", "PatientParams", "make_echo_archive", "render_clip"]
