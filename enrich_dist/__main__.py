"""``python -m enrich_dist`` is the ``enrich`` command."""

from enrich_dist.cli import main

raise SystemExit(main())
