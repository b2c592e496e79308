"""Image sets the project makes itself (no downloads): the fetal-echo archive and clip sets for benchmarks."""

from .clips import ClipSet, deid_cine_frames, digits_clips, echo_clips
from .echo import CHAMBERS, ClipParams, PatientParams, make_echo_archive, render_clip

__all__ = [
    "CHAMBERS",
    "ClipParams",
    "ClipSet",
    "PatientParams",
    "deid_cine_frames",
    "digits_clips",
    "echo_clips",
    "make_echo_archive",
    "render_clip",
]
