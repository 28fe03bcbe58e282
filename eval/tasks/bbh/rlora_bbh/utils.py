"""lm-eval loads this file by path: the project's BBH loader."""

from eval.bbh import load_bbh  # noqa: F401
