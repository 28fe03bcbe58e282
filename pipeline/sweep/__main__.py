"""``python -m pipeline.sweep``: see ``pipeline.sweep.cli``."""

from pipeline.sweep.cli import main

raise SystemExit(main())
