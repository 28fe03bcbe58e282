"""The sweep's summary on its parent run: trials table, claims, plots, description, the UI's view."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import timeline
from pipeline.claims import claims_note, compare_trials, confirm_metric
from pipeline.config.sweep import SweepConfig
from pipeline.reports import adapter_cells, plot_objective_vs_params, section_cell, sweep_description, trials_table
from pipeline.runs import parent_metric
from pipeline.tracking import ui_column


def end_stopped(client, run_id: str, status: str, metrics: dict) -> None:
    """End the run of a trial that did not end itself (stopped by ASHA, or died) as of its last
    report, not the sweep's end, with the phases its reports' stamps give (``pipeline.timeline``:
    start-up and loop; ASHA stops it right after that report)."""
    from mlflow.entities import Metric

    at = metrics.get(f"{timeline.PREFIX}report")
    phases = timeline.metrics(metrics) if status == "STOPPED" else {}
    if phases:
        ms, step = int(1000 * (at or time.time())), int(metrics.get("step") or 0)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ms, step) for k, v in phases.items()])
    client.set_terminated(run_id, "FAILED" if status == "ERROR" else "FINISHED",
                          end_time=int(1000 * at) if at and status == "STOPPED" else None)


def summarize(cfg: SweepConfig, results, tracker, sweep_dir: Path, base=(None, None)) -> dict[str, Any]:
    """Reconcile child runs with Tune's trial states, log table + plot + best config to the parent
    (``base``: the base model's per-example tables on the selection and confirmation splits, for
    the Δ-vs-base column)."""
    rows = [trial_row(cfg, r, tracker) for r in results]
    best, ranked = rank_trials(cfg, rows)
    verdict, vs_base, claims = compare_trials(ranked, cfg.tune.metric, tracker.client, *base)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    md = _log_tables(cfg, rows, claims, tracker, out)
    summary = {"trials": len(rows), "done": sum(r["status"] == "DONE" for r in rows),
               "stopped": sum(r["status"] == "STOPPED" for r in rows),
               "errored": sum(r["status"] == "ERROR" for r in rows)}
    tracker.log_metrics({f"sweep/{k}": v for k, v in summary.items()}, step=0)
    _log_best(cfg, tracker, best, verdict, vs_base, claims)
    exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    tracker.set_description(sweep_description(cfg.name, cfg.tune.metric, best, list(cfg.search), [verdict, vs_base],
                                              Path(md).read_text(), exp_id, rows, confirm_metric(cfg.tune.metric)))
    view = sweep_view(cfg, tracker, exp_id)
    tracker.set_tags({"rlora.ui_view": view})
    found = None if claims is None else {
        "split": claims.split, "order": claims.order, "resolved": claims.resolved(),
        "vs_best": {k: c.to_dict() for k, c in claims.vs_best.items()},
        "vs_base": {k: c.to_dict() for k, c in claims.vs_base.items()}}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "best": best, "rows": rows,
                                                  "best_vs_runner_up": verdict, "best_vs_base": vs_base,
                                                  "claims": found}, indent=2, default=str) + "\n")
    return {"summary": summary, "best": best, "rows": rows, "verdict": verdict, "vs_base": vs_base, "ui_view": view,
            "claims": found}


def trial_row(cfg: SweepConfig, r, tracker) -> dict[str, Any]:
    """One trial's row of the table from its Tune result; its child run tagged with Tune's status
    and, if it did not end itself, ended as of its last report."""
    metrics = r.metrics or {}
    trial_id = metrics.get("trial_id") or (Path(r.path).name if r.path else None)
    child = tracker.find_trial_run(cfg.base.mlflow.experiment, trial_id, tracker.run_id) if trial_id else None
    step = metrics.get("step")
    if r.error is not None:
        status = "ERROR"
    elif step is not None and step < cfg.base.train.steps:
        status = "STOPPED"  # by ASHA
    else:
        status = "DONE"
    cells = {}
    if child:
        tracker.client.set_tag(child, "tune.status", status)
        child_run = tracker.client.get_run(child)
        now, cells = child_run.info.status, adapter_cells(child_run.data.params)
        # still RUNNING (stopped by ASHA, or died), or FAILED by a worker that ASHA's stop interrupted
        if now == "RUNNING" or (status == "STOPPED" and now == "FAILED"):
            end_stopped(tracker.client, child, status, metrics)
    obj = metrics.get(cfg.tune.metric)
    return {"trial_id": trial_id, "status": status, "steps": step, "loop_s": metrics.get("time/loop_s"),
            "setup_s": metrics.get("time/setup_s"), "started_at": metrics.get(f"{timeline.PREFIX}start"),
            "startup_s": metrics.get("time/startup_s", timeline.metrics(metrics).get("time/startup_s")),
            cfg.tune.metric: obj if status != "ERROR" else None, "mlflow_run": child,
            # (a restored errored trial that was not retried comes back without its config)
            **cells, **{k: section_cell((r.config or {}).get(k)) for k in cfg.search},
            f"{cfg.tune.metric}_stderr": metrics.get(f"{cfg.tune.metric}_stderr") if obj is not None else None}


def rank_trials(cfg: SweepConfig, rows: list[dict]) -> tuple[Optional[dict], list[dict]]:
    """The best trial and the scored trials in order, the best first. Ties are broken by trial id,
    as the eval stage does. The best is a trial that ran every step (what the eval stage scores and
    registers), where there is one: a trial ASHA stopped is ranked by an earlier step's score and
    has no adapter or confirmation score."""
    ok = [row for row in rows if row[cfg.tune.metric] is not None and not math.isnan(row[cfg.tune.metric])
          and row["status"] != "ERROR"]
    sign = -1.0 if cfg.tune.mode == "max" else 1.0
    ok.sort(key=lambda row: (sign * row[cfg.tune.metric], str(row["trial_id"])))
    best = next((row for row in ok if row["status"] == "DONE"), ok[0] if ok else None)
    return best, ([best] + [row for row in ok if row is not best] if best else ok)


def _log_tables(cfg: SweepConfig, rows: list[dict], claims, tracker, out: Path) -> Path:
    """The trials table (markdown, CSV, HTML) and the objective-vs-parameters plot on the parent."""
    md, csv_path, html = trials_table(rows, list(cfg.search), cfg.tune.metric, out, cfg.tune.mode,
                                      confirm_metric(cfg.tune.metric), claims_note(claims))
    for path in (md, csv_path, html):
        tracker.log_artifact(path, "trials")
    fig = plot_objective_vs_params(rows, list(cfg.search), cfg.tune.metric, out / "objective_vs_params.png")
    if fig:
        tracker.log_artifact(fig, "figures")
    return md


def _log_best(cfg: SweepConfig, tracker, best: Optional[dict], verdict, vs_base, claims) -> None:
    """The best trial's parameters and scores on the parent, and the claims as tags."""
    if best:
        tracker.log_params({f"best.{k}": best[k] for k in cfg.search})
        cm = confirm_metric(cfg.tune.metric)
        tracker.log_metrics({parent_metric("best", cfg.tune.metric): best[cfg.tune.metric],
                             parent_metric("best", cfg.tune.metric + "_stderr"): best.get(f"{cfg.tune.metric}_stderr"),
                             **({parent_metric("best", cm): best[cm], parent_metric("best", cm + "_stderr"):
                                 best.get(f"{cm}_stderr")} if best.get(cm) is not None else {})}, step=0)
        tracker.set_tags({"best_trial": best["trial_id"], "best_run": best["mlflow_run"] or ""})
    if verdict:
        tracker.set_tags({"rlora.best_vs_runner_up": verdict})
    if vs_base:
        tracker.set_tags({"rlora.best_vs_base": vs_base})
    if claims is not None:
        tracker.set_tags({"rlora.claims_split": claims.split, "rlora.claims_resolved": ",".join(claims.resolved())})


def sweep_view(cfg: SweepConfig, tracker, experiment_id: str) -> str:
    """The MLflow UI's runs table for this sweep: its trials expanded under the parent run, sorted by
    the objective, with the objective ± se, the held-out means, the searched parameters, the
    dataset and the logged model as columns. Returns the UI route (printed at the end)."""
    metrics = [cfg.tune.metric, f"{cfg.tune.metric}_stderr", "eval/mean_acc", "eval/mean_margin", "train/loss"]
    columns = [ui_column("attributes", "Dataset"), ui_column("attributes", "Models")]
    columns += [ui_column("metrics", m) for m in dict.fromkeys(metrics)] + [ui_column("params", p) for p in cfg.search]
    state = {"runsExpanded": {tracker.run_id: True}, "selectedColumns": columns,
             "orderByKey": ui_column("metrics", cfg.tune.metric), "orderByAsc": cfg.tune.mode == "min"}
    return tracker.share_view(experiment_id, f"sweep-{tracker.run_id[:12]}", state)
