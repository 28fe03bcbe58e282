"""lm-eval loads this file by path; it defers to the project's MMLU loader."""

from eval.mmlu import load_subject  # noqa: F401
