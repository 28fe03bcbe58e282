"""``python -m benchmarks.objective_reliability [PARENT_RUN_ID] [--tracking-uri URI] [--step N]``

How reliably does each candidate sweep objective rank a sweep's trials? From the per-example
held-out tables of every trial (all scored on the same examples at step N; default: the latest
step every trial reached, i.e. ASHA's first rung), for accuracy, gold-vs-best-wrong margin and
gold log-prob:

- split-half rank agreement: the examples are split at random into two halves (within each task),
  every trial is scored on each half, and the Spearman correlation of the two rankings is averaged
  over 500 splits (1 = both halves order the trials identically);
- noise-to-signal: the median standard error of a trial's score divided by the standard deviation
  of the scores across trials (below ~0.5 the ranking is mostly signal).

Prints a table and writes ``benchmarks/results/objective_reliability.json``. The default sweep
objective (``tune.metric`` in sweeps/heads_gamma.yaml) is the metric with the higher agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.stats import examples_file, score_table
from pipeline.tracking import EXAMPLES_DIR, resolve_tracking_uri

OUT = Path(__file__).parent / "results" / "objective_reliability.json"
METRICS = {"correct": "eval/mean_acc", "margin": "eval/mean_margin", "gold_logprob": "eval/mean_gold_logprob"}


def trial_tables(client, parent_run_id: str, step=None):
    import pandas as pd

    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=1000)
    steps = {}
    for r in runs:
        if not r.data.tags.get("rlora.trial_id"):
            continue
        names = [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(r.info.run_id, EXAMPLES_DIR)]
        found = {int(n.rsplit("-", 1)[1].split(".")[0]) for n in names if n.startswith("heldout-")}
        if found:  # a trial still before its first evaluation has nothing to compare
            steps[r.info.run_id] = found
    if len(steps) < 3:
        raise SystemExit(f"run {parent_run_id}: fewer than 3 trials with per-example held-out tables")
    common = set.intersection(*steps.values())
    if step is None:
        step = max(common) if common else None
    if step is None or step not in common:
        raise SystemExit(f"no step that every trial scored (steps: {sorted(common)})")
    import tempfile

    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rid in steps:
            path = client.download_artifacts(rid, f"{EXAMPLES_DIR}/{examples_file('heldout', step)}", tmp)
            tables[rid] = pd.read_parquet(path).set_index(["task", "example_id"]).sort_index()
    return tables, step


def reliability(tables: dict, col: str, splits: int = 500, seed: int = 0) -> dict:
    from scipy.stats import spearmanr

    keys = next(iter(tables.values())).index
    mat = np.stack([t.loc[keys, col].to_numpy(np.float64) for t in tables.values()])  # trials x examples
    tasks = np.asarray(keys.get_level_values(0))
    groups = [np.flatnonzero(tasks == t) for t in np.unique(tasks)]
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(splits):
        h1, h2 = [], []
        for g in groups:
            p = rng.permutation(g)
            h1.append(p[: len(p) // 2])
            h2.append(p[len(p) // 2:])
        s1 = np.mean([mat[:, h].mean(1) for h in h1], axis=0)
        s2 = np.mean([mat[:, h].mean(1) for h in h2], axis=0)
        rho = spearmanr(s1, s2).statistic
        if np.isfinite(rho):
            rhos.append(rho)
    scores = [score_table(t.reset_index(), col)[1] for t in tables.values()]
    spread = float(np.std([s.mean for s in scores], ddof=1))
    med_se = float(np.median([s.se for s in scores]))
    return {"metric": METRICS[col], "trials": len(tables), "examples": len(keys),
            "split_half_spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "split_half_spearman_sd": float(np.std(rhos)) if rhos else float("nan"),
            "median_se": med_se, "between_trial_sd": spread,
            "noise_to_signal": med_se / spread if spread > 0 else float("inf")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.objective_reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", nargs="?", help="sweep parent run id (default: the latest sweep in the store)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="rlora-sweeps")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(args.tracking_uri))
    parent = args.parent
    if parent is None:
        exp = client.get_experiment_by_name(args.experiment)
        runs = client.search_runs([exp.experiment_id], "tags.`rlora.sweep` != ''", order_by=["start_time DESC"],
                                  max_results=200) if exp else []
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if not parents:
            print(f"error: no sweep in experiment {args.experiment!r} of {args.tracking_uri}", file=sys.stderr)
            return 2
        parent = parents[0].info.run_id
    tables, step = trial_tables(client, parent, args.step)
    rows = [reliability(tables, col) for col in METRICS]
    print(f"sweep {parent}: {rows[0]['trials']} trials x {rows[0]['examples']} held-out examples at step {step}\n")
    print(f"| objective | split-half rank agreement (Spearman, mean ± sd over 500 splits) | median se | "
          f"sd across trials | noise / signal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['metric']} | {r['split_half_spearman']:.2f} ± {r['split_half_spearman_sd']:.2f} | "
              f"{r['median_se']:.4f} | {r['between_trial_sd']:.4f} | {r['noise_to_signal']:.2f} |")
    best = max(rows, key=lambda r: r["split_half_spearman"])
    print(f"\nmost reliable ranking: {best['metric']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"parent_run_id": parent, "step": step, "rows": rows,
                                    "most_reliable": best["metric"]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
