"""BIG-Bench Hard from the official files in the data directory (``bbh/<subtask>.json`` and
``bbh/cot-prompts/<subtask>.txt``), in lm-eval's ``bbh`` schema: rows ``{input, target}``.

The 3-shot exemplars come from the cot-prompts files: the chain-of-thought variant uses the
reasoning after "Let's think step by step." as the target, the direct-answer variant uses
only what follows "So the answer is".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.data.core import DataError, data_dir, require_file

COT_LEAD = re.compile(r"Let's think step by step\.[ \n]")
ANSWER_RE = re.compile(r"So the answer is (.*)\.\s*$", re.S)


@dataclass(frozen=True)
class Shot:
    input: str
    reasoning: str  # the chain of thought, ending in "So the answer is X."
    answer: str  # X


def bbh_dir(root=None) -> Path:
    path = data_dir(root) / "bbh"
    if not path.is_dir():
        raise DataError(f"BBH directory not found: {path}")
    return path


def subtasks(root=None) -> list[str]:
    names = sorted(p.stem for p in bbh_dir(root).glob("*.json"))
    if not names:
        raise DataError(f"no BBH subtask files (*.json) in {bbh_dir(root)}")
    return names


@lru_cache(maxsize=None)
def load_examples(subtask: str, root=None) -> list[dict]:
    path = require_file(bbh_dir(root) / f"{subtask}.json")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: not a BBH file ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r.get("input"), str) or not isinstance(r.get("target"), str):
            raise DataError(f"{path}: example {i} needs string 'input' and 'target'")
    return [{"input": r["input"], "target": r["target"]} for r in rows]


@lru_cache(maxsize=None)
def cot_prompt(subtask: str, root=None) -> tuple[str, tuple[Shot, ...]]:
    """(task description, the three exemplars) parsed from ``cot-prompts/<subtask>.txt``."""
    path = require_file(bbh_dir(root) / "cot-prompts" / f"{subtask}.txt")
    text = path.read_text(encoding="utf-8")
    try:
        body = text.split("-----\n", 1)[1]
    except IndexError:
        raise DataError(f"{path}: missing the '-----' line after the canary") from None
    description, *blocks = re.split(r"\n\nQ: ", "\n\n" + body.strip() if body.startswith("Q: ") else body.strip())
    shots = []
    for b in blocks:
        q, sep, a = b.partition("\nA: ")
        lead, m = COT_LEAD.match(a), ANSWER_RE.search(a)
        if not sep or not lead or not m:
            raise DataError(f"{path}: exemplar {len(shots) + 1} is not 'Q: ...\\nA: Let's think step by step. ... "
                            "So the answer is X.'")
        shots.append(Shot(input=q, reasoning=a[lead.end():].rstrip(), answer=m.group(1)))
    return description.strip(), tuple(shots)


def load_bbh(subtask: str, **_: object):
    """lm-eval ``custom_dataset`` entry point: a DatasetDict with the subtask's test split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_examples(subtask))})
