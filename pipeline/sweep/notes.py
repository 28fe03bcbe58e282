"""Notes printed before a sweep: what its precision can resolve, and the confirmation split's size."""

from __future__ import annotations

from pipeline.config.sweep import SweepConfig
from pipeline.data import resolve_tasks
from pipeline.data.batching import confirmation_examples
from pipeline.paired import family_crit, paired_se
from pipeline.stats import expected_se, objective_column
from pipeline.sweep.tuner import expected_trials

TRIAL_DISAGREEMENT = 0.07  # share of examples two of the main sweep's trials answer differently (measured)


def precision_note(cfg: SweepConfig) -> str:
    """What standard error the sweep's settings give its objective and its claims, said before it starts."""
    n_tasks = len(resolve_tasks(cfg.base.data.tasks))
    n = cfg.base.data.eval_per_task
    se = expected_se(n, n_tasks)
    col = objective_column(cfg.tune.metric)
    if col == "correct":
        what = f"a mean accuracy near 0.6 has a standard error of about {100 * se:.1f} points"
    elif col is None:  # e.g. a generative task's eval/<task>/answer_nll: no per-example table to pair
        what = (f"each trial logs its standard error as {cfg.tune.metric}_stderr; there is no paired test for "
                "this objective: read differences under about two standard errors as not resolved")
    else:
        what = "paired comparisons at the end say which differences between trials are resolved"
    return (f"objective {cfg.tune.metric}: {n_tasks} task(s) x {n} held-out examples = {n_tasks * n}, the same "
            f"for every trial (the selection split); {what}" + (confirm_note(cfg) if col is not None else "")
            + (f"; every configuration runs {cfg.tune.seeds} seeds and is ranked by the mean over seeds, whose "
               f"standard error also counts the spread between seeds" if cfg.tune.seeds > 1 else ""))


def confirm_note(cfg: SweepConfig) -> str:
    """The confirmation split as it will be (choice tasks only, capped by what each task's held-out
    pool has left after the selection split), and what a paired difference there can resolve."""
    from collections import Counter

    per_task = Counter(e.task for e in confirmation_examples(cfg.base.data))
    if not per_task:
        return ("; no confirmation split (base.data.confirm_per_task 0, or no choice task has held-out examples "
                "left): the claims at the end are made on the same examples that ranked the trials")
    sizes = sorted(set(per_task.values()))
    size = f"{len(per_task)} x {sizes[0]}" if len(sizes) == 1 else \
        ", ".join(f"{t} {k}" for t, k in sorted(per_task.items()))
    out = (f"; the claims at the end come from a confirmation split of {size} other examples, scored once per "
           "finished trial and for the base model")
    if objective_column(cfg.tune.metric) != "correct":
        return out
    m = max(1, expected_trials(cfg) - 1)
    pse = paired_se(min(per_task.values()), len(per_task), TRIAL_DISAGREEMENT)
    return (out + f": a paired difference between two trials there has a standard error of about {100 * pse:.1f} "
            f"points (when they disagree on {100 * TRIAL_DISAGREEMENT:.0f} % of examples), and with up to {m} "
            f"comparison{'s' if m > 1 else ''} against the best a difference of about "
            f"{100 * (family_crit(m) + 0.84) * pse:.1f} points is resolved with 80 % power")
