"""lm-eval loads this file by path; it defers to the project's held-out loader."""

from eval.heldout import load_heldout  # noqa: F401
