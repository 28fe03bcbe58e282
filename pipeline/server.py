"""``python -m pipeline.server``: the command line of ``pipeline.cluster.server``."""

from pipeline.cluster.server import main

if __name__ == "__main__":
    raise SystemExit(main())
