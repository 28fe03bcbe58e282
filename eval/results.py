"""lm-eval's results in this project's vocabulary: task and group names to metric names
(``mmlu/avg``, ``bbh/navigate``, ``heldout/sst2``), scores with lm-eval's own standard errors,
and one row per question (``pipeline.stats.EXAMPLE_COLUMNS``) for paired comparisons."""

from __future__ import annotations

from typing import Optional

from pipeline.data.eval_names import FAMILIES, heldout_names
from pipeline.stats import EXAMPLE_COLUMNS

# the metric each task family is scored by, in lm-eval's "<metric>,<filter>" result keys
SCORE_KEYS = ("acc,none", "exact_match,get-answer", "exact_match,flexible-extract", "exact_match,strip",
              "exact_match,none")


def prefixes() -> list[tuple[str, str]]:
    """(task-name prefix, family), longest first so rlora_bbh_fewshot_x is not read as rlora_bbh + fewshot_x."""
    pairs = []
    for family, (local, stock, stock_sub) in FAMILIES.items():
        pairs += [(local, family), (stock, family), (stock_sub.rstrip("_"), family)]
    pairs += [(local, "heldout") for local in heldout_names().values()]
    return sorted(set(pairs), key=lambda p: -len(p[0]))


def metric_name(task: str) -> Optional[str]:
    """lm-eval task/group name -> our MLflow metric name (mmlu/avg, mmlu/stem, bbh/navigate,
    heldout/sst2, ...). Nested groups come back as ``parent::child``."""
    task = task.split("::")[-1]
    for prefix, family in prefixes():
        if family == "heldout" and task == prefix:
            return f"heldout/{prefix.removeprefix('rlora_heldout_')}"
        if task == prefix:
            return f"{family}/avg"
        if task.startswith(prefix + "_"):
            return f"{family}/{task[len(prefix) + 1:]}"
    return None


def flatten_scores(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's results -> ``<family>/<name>`` scores, each with lm-eval's own standard error
    as ``<family>/<name>_stderr`` (sample std / sqrt(n) for accuracies; pooled over a group's
    subtasks for group averages)."""
    out = {}
    for task, metrics in results.items():
        name = metric_name(task)
        key = next((k for k in SCORE_KEYS if isinstance(metrics.get(k), (int, float))), None)
        if name and key is not None:
            out[name] = float(metrics[key])
            metric, filt = key.split(",")
            se = metrics.get(f"{metric}_stderr,{filt}")
            if isinstance(se, (int, float)):
                out[f"{name}_stderr"] = float(se)
    return out


def lmeval_examples(samples: dict[str, list[dict]]):
    """lm-eval's logged samples -> one row per question (pipeline.stats.EXAMPLE_COLUMNS): task is
    the metric name (``mmlu/anatomy``), example_id lm-eval's doc hash, correct the task's score
    (acc or exact match, the same filter as the reported score), and for log-likelihood tasks the
    gold choice's log-prob and its margin over the best wrong choice (nan for generation)."""
    import math

    import pandas as pd

    rows = []
    for task, items in samples.items():
        name = metric_name(task)
        if not name or not items:
            continue
        rank = {k: i for i, k in enumerate(SCORE_KEYS)}

        def priority(sample):
            return min((rank.get(f"{m},{sample['filter']}", len(rank)) for m in sample["metrics"]), default=len(rank))

        best = min(priority(x) for x in items)
        if best == len(rank):
            continue
        metric = SCORE_KEYS[best].split(",")[0]
        for x in items:
            if priority(x) != best:
                continue
            gold, margin = math.nan, math.nan
            resps, target = x.get("filtered_resps"), x.get("target")
            if (isinstance(target, int) and isinstance(resps, list) and len(resps) > 1
                    and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps) and 0 <= target < len(resps)):
                lps = [float(r[0]) for r in resps]
                gold = lps[target]
                margin = gold - max(lp for i, lp in enumerate(lps) if i != target)
            rows.append({"task": name, "example_id": str(x.get("doc_hash") or x["doc_id"])[:16],
                         "correct": float(x[metric]), "gold_logprob": gold, "margin": margin})
    return pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))
