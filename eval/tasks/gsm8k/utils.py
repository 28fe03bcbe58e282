"""lm-eval loads this file by path; it defers to the project's GSM8K loader."""

from eval.gsm8k import load_gsm8k  # noqa: F401
