from __future__ import annotations

import csv
from pathlib import Path

from .core import DataError, Example, data_dir, require_file

SST2_CHOICES = (" negative", " positive")


def _tsv_rows(path: Path) -> list[list[str]]:
    with require_file(path).open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_sst2(split: str = "train", root: str | Path | None = None) -> list[Example]:
    """GLUE SST-2 (train 67,349 / dev 872). The copy's header reads ``text\\tlabel``."""
    if split not in ("train", "dev"):
        raise DataError(f"sst2: split must be 'train' or 'dev' (test has no labels), got {split!r}")
    path = data_dir(root) / "sst2" / f"{split}.tsv"
    rows = _tsv_rows(path)
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise DataError(f"{path}:{i}: expected 'sentence<TAB>0|1', got {row!r}")
        out.append(Example("sst2", f"Review: {row[0].strip()}\nSentiment:", SST2_CHOICES, int(row[1])))
    return out
