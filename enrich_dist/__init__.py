"""enrich_dist: ENRICH redundancy analysis and label-blind subset selection for medical-image archives."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``enrich_dist.run`` and ``enrich_dist.open_run`` (the Python API), imported on first use."""
    if name in ("run", "open_run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'enrich_dist' has no attribute {name!r}")
