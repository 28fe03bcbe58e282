"""``python -m pipeline.submit``: the command line of ``pipeline.cluster.submit``."""

from pipeline.cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
