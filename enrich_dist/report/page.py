"""The report being written: figures embedded in the page (and saved beside it), missing artifacts."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ..schema import REPORT_DIR
from ..storage import RunDir
from .figures import data_uri
from .html import Markup, missing


@dataclass
class ReportPage:
    """Figures committed so far, missing artifacts, thumbnail counts of one report."""

    run: RunDir
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    thumbnails: int = 0
    thumbnail_errors: int = 0
    images: str = "thumbnails"

    @property
    def private(self) -> bool:
        """No archive image, uri or path on the page (``--report-images none``)."""
        return self.images == "none"

    def add_figure(self, name: str, png: bytes) -> str:
        """Save a PNG beside index.html (for reuse) and return it as a data URI for the page itself."""
        self.run.write_bytes(posixpath.join(REPORT_DIR, name), png)
        self.figures.append(name)
        return data_uri(png)

    def absent(self, what: str, command: str) -> Markup:
        """Record a missing artifact and return the notice naming the command that produces it."""
        self.missing.append(what)
        return missing(what, command)
