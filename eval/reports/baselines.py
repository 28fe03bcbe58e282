"""The baselines report (``python -m eval.reproduce --table baselines``): every adapter of a sweep
such as ``sweeps/baselines.yaml`` in the layout of the paper's Tables 2/3.

One row per adapter (the run's ``rlora.adapter`` label: ``rlora-N3-r8``, ``lora-r24``, ``ia3`` ...):
held-out accuracy per task and its macro average (mean over seeds ± standard error over seeds and
examples), the paired difference to R-LoRA (same examples, seeds matched) with a 95 % interval
that holds jointly over every adapter's comparison with R-LoRA (Bonferroni),
trainable parameters as % of the base, the A/B matrix counts, and training throughput (median of
the logged ``train/tokens_per_s`` over a run's steps, mean over seeds) and peak memory (the
logged ``train/peak_mem_gb``, mean over seeds). A trial trained with
``tune.seeds`` > 1 contributes its nested seed runs, a sweep with seeds as a grid dimension its
trials; either way every seed is one record, as in the ablation report.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from eval.reports.arms import TASK_LABELS, arm_difference, arm_score, cell, delta_cell, seed_record, sweep_trials
from pipeline.reports import write_table
from pipeline.tracking import Tracker


def _records(client, run) -> list:
    """The runs that hold one seed each: the trial itself, or its nested seed runs."""
    seed_runs = run.data.tags.get("rlora.seed_runs")
    return [client.get_run(i) for i in seed_runs.split(",")] if seed_runs else [run]


def _tokens_per_s(client, run_id: str) -> Optional[float]:
    hist = client.get_metric_history(run_id, "train/tokens_per_s")
    return statistics.median(h.value for h in hist) if hist else None


def _peak_mem_gb(client, run_id: str) -> Optional[float]:
    hist = client.get_metric_history(run_id, "train/peak_mem_gb")
    return max(h.value for h in hist) if hist else None


def collect(client, parent_run_id: str, tasks: list[str]) -> dict[str, list[dict[str, Any]]]:
    """adapter label -> one record per finished seed (accuracies, per-example table, % params, A/B,
    tokens/s; ``reference``: the run is R-LoRA proper, adapter.method rlora with preset rlora, the
    row every other one is compared with)."""
    trials = [t for t in sweep_trials(client, parent_run_id) if t.data.tags.get("rlora.adapter")]
    labels = [t.data.tags["rlora.adapter"] for t in trials]
    arms: dict[str, list[dict[str, Any]]] = {}
    for trial, label in zip(trials, labels):
        if labels.count(label) > 1:  # configurations that differ outside the label (gamma, lr ...)
            label = f"{label} [{trial.data.tags['rlora.trial_id']}]"
        for r in _records(client, trial):
            if r.info.status != "FINISHED":
                continue
            p = r.data.params
            arms.setdefault(label, []).append({
                **seed_record(client, r, tasks),
                "reference": p.get("adapter.method") == "rlora" and p.get("adapter.preset") == "rlora",
                "pct": float(p["adapter.trainable_pct"]) if p.get("adapter.trainable_pct") else None,
                "ab": p.get("adapter.ab_matrices"), "tokens_per_s": _tokens_per_s(client, r.info.run_id),
                "peak_mem_gb": _peak_mem_gb(client, r.info.run_id)})
    return arms


def table(arms: dict[str, list[dict]], tasks: list[str]) -> tuple[list[str], list[dict], Optional[str]]:
    """(columns, rows, the reference label): rows sorted by macro accuracy, best first."""
    refs = [label for label, recs in arms.items() if any(r["reference"] for r in recs)]
    ref = refs[0] if len(refs) == 1 else None  # several R-LoRA shapes: no single reference
    rows = []
    for label, recs in arms.items():
        tps = [r["tokens_per_s"] for r in recs if r["tokens_per_s"] is not None]
        pct = [r["pct"] for r in recs if r["pct"] is not None]
        mem = [r["peak_mem_gb"] for r in recs if r.get("peak_mem_gb") is not None]
        mean, se = arm_score(recs)
        row = {"adapter": label, "seeds": len(recs),
               **{TASK_LABELS.get(t, t): cell(*arm_score(recs, t)) for t in tasks},
               "Avg": cell(mean, se), "_avg": mean if mean is not None else float("-inf"),
               "Δ vs R-LoRA": "–" if ref is None or label == ref else delta_cell(arm_difference(recs, arms[ref],
                                                                                                 len(arms) - 1)),
               "% params": f"{statistics.fmean(pct):.3g}" if pct else "–",
               "A/B": recs[0]["ab"] if recs[0]["ab"] not in (None, "None") else "–",
               "tokens/s": f"{statistics.fmean(tps):.0f}" if tps else "–",
               "peak mem (GiB)": f"{statistics.fmean(mem):.2f}" if mem else "–"}
        rows.append(row)
    rows.sort(key=lambda row: (-row["_avg"], row["adapter"]))
    for row in rows:
        del row["_avg"]
    cols = ["adapter", "seeds", *[TASK_LABELS.get(t, t) for t in tasks], "Avg", "Δ vs R-LoRA", "% params", "A/B",
            "tokens/s", "peak mem (GiB)"]
    return cols, rows, ref


def write_report(tracking_uri: str, parent_run_id: str, tasks: list[str], out_dir: Path, wall_s: Optional[float],
                 config_note: str) -> dict[str, Any]:
    """The report (markdown, csv, html) in ``out_dir``, logged to the sweep's parent run under
    ``reproduce/``."""
    t = Tracker(tracking_uri, parent_run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = collect(t.client, parent_run_id, tasks)
    if not arms:
        raise RuntimeError(f"sweep {parent_run_id}: no finished trials to report")
    cols, rows, ref = table(arms, tasks)
    tables = write_table(rows, cols, out_dir, "baselines")
    lines = ["# Baselines: every adapter of the sweep against R-LoRA", "",
             f"MLflow sweep run `{parent_run_id}`. {config_note}" + (f" Wall time {wall_s / 60:.1f} min." if wall_s else ""),
             "", "## Tables 2/3 layout: held-out accuracy (%) per task, mean ± standard error (seeds and examples)", "",
             tables[0].read_text().rstrip(), "",
             f"Δ vs R-LoRA: paired difference to `{ref or 'no single R-LoRA row'}` in points, over examples and "
             f"seeds, with a 95 % interval that holds jointly over the {len(arms) - 1} comparisons with R-LoRA "
             "(Bonferroni); n.r. = not resolved (the interval contains 0). % params: trainable parameters "
             "as a share of the frozen base. A/B: low-rank down/up matrices per adapted layer. tokens/s: median "
             "training throughput over a run's steps, mean over seeds (trials ran side by side on shared cores: "
             "compare with `benchmarks.train_step --variants methods`, which times each method alone). peak mem: "
             "the training worker's peak memory (GPU: CUDA's peak allocation; CPU: peak resident set, "
             "interpreter and libraries included), mean over seeds; – for runs from before it was logged.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    for f in [report, *tables]:
        t.log_artifact(f, "reproduce")
    return {"report": str(report), "rows": rows, "reference": ref}
