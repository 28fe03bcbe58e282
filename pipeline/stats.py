"""Scores with standard errors: per task, macro over tasks, over seeds; per-example tables on disk."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

Z95 = 1.959963984540054


EXAMPLE_COLUMNS = ("task", "example_id", "correct", "gold_logprob", "margin")


# what a per-example column is called as a score: correct -> acc; margin / gold_logprob as themselves
VALUE_NAMES = {"correct": "acc", "margin": "margin", "gold_logprob": "gold_logprob"}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); se is nan for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def macro_mean_se(per_task: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Mean of per-task means and its standard error (tasks independent)."""
    if not per_task:
        return math.nan, math.nan
    means = [m for m, _ in per_task.values()]
    ses = [s for _, s in per_task.values()]
    return float(np.mean(means)), float(math.sqrt(sum(s * s for s in ses)) / len(ses))


@dataclass
class Score:
    mean: float
    se: float
    n: int

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if math.isnan(self.mean):
            return "–"
        se = "?" if math.isnan(self.se) else f"{scale * self.se:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {se}"


def score_table(rows, value: str = "correct") -> tuple[dict[str, Score], Score]:
    """Per-task scores and the macro mean of a per-example table (pandas DataFrame)."""
    per_task = {}
    for task, g in rows.groupby("task", sort=True):
        m, s = mean_se(g[value].to_numpy(dtype=np.float64))
        per_task[str(task)] = Score(m, s, int(g[value].notna().sum()))
    mm, ms = macro_mean_se({t: (s.mean, s.se) for t, s in per_task.items()})
    return per_task, Score(mm, ms, sum(s.n for s in per_task.values()))


def score_metrics(rows, prefix: str = "eval", values: Iterable[str] = ("correct", "margin", "gold_logprob"),
                  mean_name: str = "mean") -> dict[str, float]:
    """MLflow metrics of a per-example table: ``<prefix>/<task>/<name>`` and ``<prefix>/mean_<name>``,
    each with ``_stderr`` beside it and ``<prefix>/<task>/n`` (examples scored)."""
    out: dict[str, float] = {}
    for value in values:
        if value not in rows or rows[value].isna().all():
            continue
        name = VALUE_NAMES[value]
        per_task, macro = score_table(rows, value)
        for task, s in per_task.items():
            out[f"{prefix}/{task}/{name}"] = s.mean
            out[f"{prefix}/{task}/{name}_stderr"] = s.se
            out[f"{prefix}/{task}/n"] = s.n
        out[f"{prefix}/{mean_name}_{name}"] = macro.mean
        out[f"{prefix}/{mean_name}_{name}_stderr"] = macro.se
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


# ---------------------------------------------------------------------------------- seeds
def seed_average(tables: list):
    """Per-example outcomes averaged over seeds (runs of one configuration), on the examples every
    seed scored."""
    import pandas as pd

    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    g = pd.concat(tables).groupby(["task", "example_id"], sort=True)
    avg = g[["correct", "gold_logprob", "margin"]].mean()
    return avg[g.size() == len(tables)].reset_index()


def seed_mean_se(per_seed: Sequence[float], averaged=None, value: str = "correct",
                 task: Optional[str] = None) -> tuple[float, float]:
    """(mean over seeds, standard error over seeds and examples) of a macro score (or one task's):
    se² = sd²_seeds / K + se²_examples, the latter from the seed-averaged per-example table."""
    mean, sd = mean_se(per_seed)
    k = len([x for x in per_seed if x == x])
    parts = [] if math.isnan(sd) else [sd]  # mean_se gives sd / sqrt(K) already
    if averaged is not None and len(averaged):
        per_task, macro = score_table(averaged, value)
        s = macro if task is None else per_task.get(task)
        if s is not None and not math.isnan(s.se):
            parts.append(s.se)
    if k == 0:
        return math.nan, math.nan
    return mean, (math.sqrt(sum(x * x for x in parts)) if parts else math.nan)


def seed_metrics(per_seed: list[dict], averaged, prefix: str = "eval") -> dict[str, float]:
    """Held-out metrics of one configuration run with several seeds: every score of
    :func:`score_metrics` on the seed-averaged table (= the mean over seeds), its ``_stderr``
    combining seeds and examples (:func:`seed_mean_se`), and ``<key>_seed_sd``."""
    out = {}
    base = score_metrics(averaged, prefix) if averaged is not None and len(averaged) else {}
    cols = {name: col for col, name in VALUE_NAMES.items()}
    for key, value in base.items():
        if key.endswith("/n"):
            out[key] = value
            continue
        if key.endswith("_stderr"):  # examples only: replaced below by the seeds-and-examples one
            continue
        vals = [m[key] for m in per_seed if key in m]
        tail = key[len(prefix) + 1:]
        if tail.startswith("mean_"):
            task, name = None, tail[len("mean_"):]
        else:
            task, name = tail.rsplit("/", 1)
        mean, se = seed_mean_se(vals, averaged, cols[name], task)
        out[key] = value
        out[f"{key}_stderr"] = se
        if len(vals) > 1:
            out[f"{key}_seed_sd"] = float(np.std(vals, ddof=1))
    # scores no per-example table carries (a generative task's answer_nll): the mean over seeds, its
    # error from the spread between seeds and the seeds' own errors (on the same examples: their mean)
    for key in sorted({k for m in per_seed for k in m} - set(base)):
        se_key = f"{key}_stderr"
        if not key.startswith(prefix + "/") or key.endswith(("_stderr", "_seed_sd")):
            continue
        vals = [m[key] for m in per_seed if key in m]
        ses = [m[se_key] for m in per_seed if se_key in m and not math.isnan(m[se_key])]
        if not ses:
            continue
        mean, between = mean_se(vals)
        parts = [x for x in (between, float(np.mean(ses))) if not math.isnan(x)]
        out[key], out[se_key] = mean, math.sqrt(sum(x * x for x in parts))
        if len(vals) > 1:
            out[f"{key}_seed_sd"] = float(np.std(vals, ddof=1))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


# ---------------------------------------------------------------------------------- storage
def save_examples(rows, path: Path):
    """Write a per-example table (DataFrame or list of dicts) as parquet; returns the path."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(EXAMPLE_COLUMNS))
    missing = [c for c in EXAMPLE_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"per-example table lacks column(s) {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def load_examples(path):
    import pandas as pd

    df = pd.read_parquet(path)
    missing = [c for c in EXAMPLE_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"{path}: not a per-example table (missing {missing})")
    return df


def objective_column(metric: str) -> Optional[str]:
    """The per-example column behind a macro objective: eval/mean_acc -> correct, eval/mean_margin
    -> margin, eval/mean_gold_logprob -> gold_logprob; None for anything else."""
    for col, name in VALUE_NAMES.items():
        if metric == f"eval/mean_{name}":
            return col
    return None


def display_scale(column: Optional[str]) -> tuple[float, str]:
    """(factor, unit) for showing a score: accuracies in points, log-probabilities in nats."""
    return (100.0, "points") if column in (None, "correct") else (1.0, "nats")


def examples_file(kind: str, step: int) -> str:
    """``heldout-000080.parquet`` (training loop, by step), ``lmeval-000001.parquet`` (eval round)."""
    return f"{kind}-{step:06d}.parquet"


def expected_se(n_per_task: int, n_tasks: int, p: float = 0.6) -> float:
    """Standard error of a macro-mean accuracy near ``p`` with ``n_per_task`` examples in each of
    ``n_tasks`` tasks (what a sweep's settings will give, printed before it starts)."""
    if n_per_task < 2 or n_tasks < 1:
        return math.nan
    return math.sqrt(p * (1 - p) / (n_per_task - 1)) / math.sqrt(n_tasks)
