"""lm-eval loads this file by path: the project's BBH loader, and lm-eval's own zero-shot answer filters."""

from eval.bbh import load_bbh  # noqa: F401

import importlib.util
from pathlib import Path

import lm_eval

_spec = importlib.util.spec_from_file_location(
    "_lm_eval_bbh_zeroshot_utils", Path(lm_eval.__file__).parent / "tasks" / "bbh" / "zeroshot" / "utils.py")
_stock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stock)
globals().update({k: v for k, v in vars(_stock).items() if k.endswith("Filter")})
