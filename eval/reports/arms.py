"""An ablation arm or a baseline: the finished runs of one adapter, one record per seed, and what
the reports say about it (``eval.reproduce``'s Table 4, ``eval.reports.baselines``' Tables 2/3): its score
with a standard error over seeds and examples, and its paired difference to a reference arm."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from pipeline.paired import family_crit, paired_compare
from pipeline.runs import run_examples
from pipeline.stats import seed_average, seed_mean_se

TASK_LABELS = {"sst2": "SST-2", "qnli": "QNLI", "piqa": "PIQA", "siqa": "SIQA", "boolq": "BoolQ*", "qqp": "QQP"}


def mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # no spread from one seed


def seeds_mean_se(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean over seeds and its standard error sd/√K (None from a single seed)."""
    m, sd = mean_std(xs)
    return m, (None if sd is None else sd / math.sqrt(len(xs)))


def cell(m: Optional[float], s: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    if m is None:
        return "–"
    return f"{m * scale:.{digits}f}" + ("" if s is None else f" ± {s * scale:.{digits}f}")


def sweep_trials(client, parent_run_id: str) -> list:
    """The sweep's finished trial runs (its direct children with a trial id)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    return [r for r in runs if r.data.tags.get("rlora.trial_id") and r.info.status == "FINISHED"]


def seed_record(client, run, tasks: list[str]) -> dict[str, Any]:
    """One seed's held-out results: per-example table, per-task and macro accuracy, its seed."""
    m = run.data.metrics
    return {"examples": run_examples(client, run.info.run_id, "heldout").get("heldout"),
            "run_id": run.info.run_id, "seed": run.data.params.get("train.seed"),
            "acc": {t: m.get(f"eval/{t}/acc") for t in tasks}, "mean_acc": m.get("eval/mean_acc")}


def seed_avg(recs: list[dict]):
    """Per-example outcomes averaged over an arm's seeds (examples every seed scored)."""
    return seed_average([r.get("examples") for r in recs])


def arm_score(recs: list[dict], task: Optional[str] = None) -> tuple[Optional[float], Optional[float]]:
    """(mean over seeds, standard error over seeds and examples) of an arm's accuracy on one task
    or (task None) on the macro average."""
    per_seed = [r["acc"][task] if task else r["mean_acc"] for r in recs]
    per_seed = [x for x in per_seed if x is not None]
    if not per_seed:
        return None, None
    mean, se = seed_mean_se(per_seed, seed_avg(recs), task=task)
    return mean, (None if math.isnan(se) else se)


def arm_difference(a: list[dict], b: list[dict], m: int = 1) -> Optional[dict]:
    """Arm a − arm b on the macro accuracy: paired over examples (seed-averaged outcomes) and over
    seeds (per-seed differences, seeds matched by value). None without per-example tables. ``m``: the
    comparisons made against the same reference; the interval holds jointly over them (Bonferroni,
    ``pipeline.paired.family_crit``), so "resolved" is wrong for at most 5 % of families."""
    ta, tb = seed_avg(a), seed_avg(b)
    if ta is None or tb is None:
        return None
    c = paired_compare(ta, tb, "correct")
    if c.n == 0:
        return None
    sb = {r["seed"]: r["mean_acc"] for r in b}
    d = [r["mean_acc"] - sb[r["seed"]] for r in a if r["seed"] in sb and r["mean_acc"] is not None]
    var_seed = statistics.variance(d) / len(d) if len(d) > 1 else 0.0
    se = math.sqrt(c.se ** 2 + var_seed)
    delta = statistics.fmean(d) if d else c.delta
    crit = family_crit(m)
    lo, hi = delta - crit * se, delta + crit * se
    return {"delta": delta, "se": se, "lo": lo, "hi": hi, "resolved": lo > 0 or hi < 0, "n": c.n, "seeds": len(d),
            "m": m}


def delta_cell(d: Optional[dict]) -> str:
    if d is None:
        return "–"
    return f"{100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" + ("" if d["resolved"] else " n.r.")
