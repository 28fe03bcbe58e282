"""GSM8K for the single-task track (the paper's Table 2): lm-eval's own ``gsm8k`` task (5-shot,
greedy generation, its answer-extraction filters ``strict-match`` and ``flexible-extract`` and its
``exact_match``, copied by ``eval.generate_tasks`` into ``rlora_gsm8k``), on the split the training
task holds out (``test.jsonl``, the ``gsm8k`` task's held-out split; few-shot exemplars from
``train.jsonl``), read from the data directory instead of the hub."""

from __future__ import annotations

import json

from pipeline.data import data_dir

# the training task's splits (pipeline.data.tasks: gsm8k trains on train.jsonl, holds out test.jsonl)
SPLITS = {"train": "train.jsonl", "test": "test.jsonl"}


def load_gsm8k(**_: object):
    """lm-eval ``custom_dataset`` entry point: the official files' ``question`` and ``answer``
    (chain of thought ending ``#### <number>``), in file order."""
    import datasets

    root = data_dir() / "gsm8k"
    out = {}
    for split, name in SPLITS.items():
        with open(root / name) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out[split] = datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]} for r in rows])
    return datasets.DatasetDict(out)
