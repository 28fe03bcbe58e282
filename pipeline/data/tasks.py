"""Task registry: name -> (train, held-out) splits, and the paper's multi-task mixtures.

Where a dataset ships a labelled train/dev pair we use it as is. Where only one labelled
split exists here (QNLI, PIQA, BoolQ, CosmosQA, WSC, CodeAlpaca), examples are assigned by
a content hash: sha256(task, prompt, choices) mod 100 < HELD_OUT_PERCENT goes to held-out.
The assignment is deterministic, independent of file order, and identical texts always land
on the same side. In every case training examples whose content also occurs in the held-out
split are dropped, so no held-out example is ever trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

from . import loaders
from .core import DataError, Example

HELD_OUT_PERCENT = 20


@dataclass(frozen=True)
class TaskSpec:
    loader: Callable[..., list[Example]]
    train_split: str
    held_out_split: Optional[str]  # None: hash split of train_split
    kind: str = "choice"  # "choice" (log-likelihood over choices) or "generate"


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(loaders.load_sst2, "train", "dev"),
    "qnli": TaskSpec(loaders.load_qnli, "dev", None),
    "piqa": TaskSpec(loaders.load_piqa, "valid", None),
    "siqa": TaskSpec(loaders.load_siqa, "train", "dev"),
    "boolq": TaskSpec(loaders.load_boolq, "val", None),
    "openbookqa": TaskSpec(loaders.load_openbookqa, "train", "dev"),
    "cosmosqa": TaskSpec(loaders.load_cosmosqa, "valid", None),
    "dpr": TaskSpec(loaders.load_dpr, "train", "test"),
    "wsc": TaskSpec(loaders.load_wsc, "val", None),
    "arc_challenge": TaskSpec(loaders.load_arc_challenge, "dev", "test"),
    "arc_easy": TaskSpec(loaders.load_arc_easy, "dev", "test"),
    "gsm8k": TaskSpec(loaders.load_gsm8k, "train", "test", kind="generate"),
    "codealpaca": TaskSpec(loaders.load_codealpaca, "all", None, kind="generate"),
}

# Paper Table 4 analogue (BoolQ stands in for QQP, which is not available offline).
# Table 5 analogue: the commonsense suite, with CosmosQA for HellaSwag and DPR for WinoGrande.
MIXTURES: dict[str, tuple[str, ...]] = {
    "five_task": ("sst2", "qnli", "piqa", "siqa", "boolq"),
    "eight_task": ("boolq", "piqa", "siqa", "cosmosqa", "dpr", "arc_easy", "arc_challenge", "openbookqa"),
}


def content_key(ex: Example) -> str:
    return hashlib.sha256("\x00".join((ex.task, ex.prompt, *ex.choices)).encode()).hexdigest()


def is_held_out(ex: Example) -> bool:
    return int(content_key(ex)[:8], 16) % 100 < HELD_OUT_PERCENT


def task_splits(task: str, root=None) -> tuple[list[Example], list[Example]]:
    """(train, held_out) for one task."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    if spec.held_out_split is None:
        pool = spec.loader(spec.train_split, root)
        held = [e for e in pool if is_held_out(e)]
        train = [e for e in pool if not is_held_out(e)]
    else:
        train = spec.loader(spec.train_split, root)
        held = spec.loader(spec.held_out_split, root)
    held_keys = {content_key(e) for e in held}
    return [e for e in train if content_key(e) not in held_keys], held


def resolve_tasks(names: str | list[str]) -> list[str]:
    """A mixture name or a list of task names -> task names (validated)."""
    if isinstance(names, str):
        names = list(MIXTURES[names]) if names in MIXTURES else [names]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}; mixtures: {', '.join(MIXTURES)}")
    return list(names)
