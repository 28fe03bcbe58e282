"""``python -m pipeline.train``: see ``pipeline.train.cli``."""

from pipeline.train.cli import main

raise SystemExit(main())
