"""enrich_dist: ENRICH redundancy analysis and label-blind subset selection for medical-image archives."""

__version__ = "0.1.0"
