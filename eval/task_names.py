"""Task names for ``eval.run --tasks`` and the eval stage: the stock lm-eval names mapped to this
project's offline tasks (``eval/tasks``), or passed to lm-eval as they are (``--task-source stock``)."""

from __future__ import annotations

from eval.harness import task_manager
from pipeline.data.eval_names import local_names


class EvalInputError(ValueError):
    pass


def resolve_tasks(names: list[str], source: str) -> list[str]:
    if source == "stock":  # lm-eval's own tasks (their datasets come from the hub)
        known_stock = set(task_manager(stock=True).all_tasks) - set(task_manager().all_tasks)
        for n in names:
            if n not in known_stock:
                raise EvalInputError(f"--tasks: {n!r} is not an lm-eval task or group")
        return names
    known = local_names()
    out = []
    for n in names:
        if n in known:
            out.append(known[n])
        elif n in known.values():
            out.append(n)
        else:
            raise EvalInputError(f"--tasks: {n!r} has no offline version; known: {', '.join(known)} "
                                 "(or use --task-source stock where the hub is reachable)")
    return out
