"""The training mixtures' held-out splits as lm-eval tasks, so in-domain accuracy and BBH/MMLU
come from one harness. One multiple-choice task per choice task (``rlora_heldout_<task>``,
the prompt and choices the training loop scores) and one group per mixture
(``rlora_heldout_<mixture>``, the unweighted mean over its tasks, as the training loop's
``eval/mean_acc``). Generation tasks (gsm8k, codealpaca) have no choice form and are left out.
"""

from __future__ import annotations

from pipeline.data.tasks import task_splits


def load_heldout(task: str, **_: object):
    """lm-eval ``custom_dataset`` entry point: the task's held-out split, in file order."""
    import datasets

    _, held = task_splits(task)
    rows = [{"prompt": e.prompt, "choices": list(e.choices), "gold": e.gold} for e in held]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
