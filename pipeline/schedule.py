"""``python -m pipeline.schedule``: the command line of ``pipeline.cluster.schedule``."""

from pipeline.cluster.schedule import main

if __name__ == "__main__":
    raise SystemExit(main())
