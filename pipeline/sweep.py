"""``python -m pipeline.sweep <sweep.yaml> [--set key=value ...] [--resume [DIR] [--retry-errored]]``

Ray Tune + Optuna (TPE, seeded; study persisted in sqlite) with an ASHA scheduler on the
held-out metric. Each trial runs the Ray Train job of ``pipeline.train`` and reports to Tune
through ``TuneReportCallback``. Trials hold no CPU themselves and at most
``cluster CPUs // (workers x CPUs per worker)`` run at once, so a trial can never hold a CPU
its own workers wait for. With ``tune.train_in_trial`` a one-worker trial trains in its own
process instead (``pipeline.in_trial``) and holds that worker's resources itself. MLflow gets
one parent run per sweep (search space, best config, trials table, objective-vs-parameter plot)
and one nested child run per trial.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from pipeline import timeline
from pipeline.base_scores import score_base
from pipeline.claims import claims_note, compare_trials, confirm_metric
from pipeline.config import ConfigError, RunConfig, SweepConfig, load_sweep_config, set_path
from pipeline.stages import PostSweepError, post_sweep_stage
from pipeline.tracking import parent_metric

STATE_FILE = "sweep_state.json"


# -------------------------------------------------------------------------------- search space
def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in cfg.search.items():
        k = spec.kind
        if k == "choice":
            space[key] = tune.grid_search(spec.choice) if cfg.tune.search_alg == "grid" else tune.choice(spec.choice)
        elif k == "grid":
            space[key] = tune.grid_search(spec.grid)
        elif k == "int":
            space[key] = tune.randint(spec.int_[0], spec.int_[1] + 1)  # inclusive upper bound
        elif k == "uniform":
            space[key] = tune.uniform(*spec.uniform)
        else:
            space[key] = tune.loguniform(*spec.loguniform)
    return space


def trial_run_config(base: dict, params: dict[str, Any], sweep: dict) -> RunConfig:
    data = json.loads(json.dumps(base))
    for key, value in params.items():
        set_path(data, key, value)
    cfg = RunConfig.model_validate(data)
    # every report must carry the objective for ASHA/Optuna: checkpoint only at eval steps
    cfg.train.checkpoint_every = cfg.train.eval_every
    cfg.mlflow.experiment = sweep["experiment"]
    cfg.mlflow.run_name = sweep["trial_name"]
    return cfg


def _intermediate_reports(final_step: int):
    """Train -> Tune reports for every step but the last. The last one is reported by the trial
    function itself after the adapter and figures are uploaded: ASHA stops a trial as soon as it
    reports step == max_t, which would otherwise kill it before its results are saved."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class IntermediateReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step") == final_step:
                return
            super().after_report(run_context, metrics, checkpoint)

    return IntermediateReports()


def _trial(params: dict[str, Any], ctx: dict) -> None:
    """Tune trainable: one Ray Train run per trial."""
    t_start = time.time()
    from ray import tune

    from pipeline.train import run_training
    from pipeline.tune_state import await_recorded

    trial_id = tune.get_context().get_trial_id()
    await_recorded(ctx["tune_storage"], trial_id)  # before the trial's MLflow run: --resume must know it
    cfg = trial_run_config(ctx["base"], params, {"experiment": ctx["experiment"], "trial_name": f"trial-{trial_id}"})
    worst = -1.0 if ctx["mode"] == "max" else 1e9
    if ctx.get("seeds", 1) > 1:
        tune.report(_seeded_trial(cfg, ctx, trial_id, {ctx["metric"]: worst}))
        return
    out = run_training(cfg, parent_run_id=ctx["parent_run_id"], quiet=True, trial_id=trial_id,
                       callbacks=[_intermediate_reports(cfg.train.steps)], train_name=f"trial-{trial_id}",
                       storage_path=ctx["train_storage"], nan_metrics={ctx["metric"]: worst},
                       extra_tags={"rlora.sweep": ctx["sweep_name"]}, in_trial=ctx["in_trial"], started_at=t_start)
    # The final step's metrics, now that everything is saved (also right for a trial re-run by
    # --resume whose Train run had already finished, which reports nothing through the callback).
    tune.report({k: v for k, v in out["metrics"].items() if k != "checkpoint_path"})


def _seeded_trial(cfg: RunConfig, ctx: dict, trial_id: str, nan_metrics: dict) -> dict[str, Any]:
    """``tune.seeds`` > 1: the configuration trained with seeds train.seed, +1, ... one Ray Train run
    each, nested under the trial's child run. The child run gets the held-out scores of the
    seed-averaged per-example table (= means over seeds) with standard errors over seeds and
    examples, that table, and seed 0's adapter (what the eval stage scores)."""
    import tempfile

    from pipeline.stats import examples_file, save_examples, score_metrics, seed_average, seed_metrics
    from pipeline.tracking import EXAMPLES_DIR, Tracker, run_examples
    from pipeline.train import error_line, run_training

    t = Tracker(cfg.mlflow.tracking_uri)
    existing = t.find_trial_run(ctx["experiment"], trial_id, ctx["parent_run_id"])
    if existing:  # a trial restarted by --resume
        t.reopen(existing)
    else:
        t.start_run(ctx["experiment"], f"trial-{trial_id}", cfg.model_dump(mode="json"),
                    tags={"rlora.trial_id": trial_id, "rlora.sweep": ctx["sweep_name"], "rlora.seeds": str(ctx["seeds"]),
                          **cfg.adapter.tags},
                    parent_run_id=ctx["parent_run_id"])
    outs = []
    for k in range(ctx["seeds"]):
        seeded = cfg.model_copy(deep=True)
        seeded.train.seed = cfg.train.seed + k
        seeded.mlflow.run_name = f"trial-{trial_id}-seed{seeded.train.seed}"
        try:
            outs.append(run_training(seeded, parent_run_id=t.run_id, quiet=True, trial_id=f"{trial_id}/seed{k}",
                                     train_name=seeded.mlflow.run_name, storage_path=ctx["train_storage"],
                                     nan_metrics=nan_metrics, extra_tags={"rlora.sweep": ctx["sweep_name"]},
                                     in_trial=ctx["in_trial"]))
        except BaseException as e:
            t.set_tags({"error": f"seed {seeded.train.seed}: {error_line(e)}"[:500]})
            t.finish("FAILED")
            raise
    averaged = seed_average([run_examples(t.client, o["run_id"], "heldout").get("heldout") for o in outs])
    metrics = seed_metrics([o["metrics"] for o in outs], averaged)
    steps = cfg.train.steps
    from pipeline.train import adapter_model

    model_id = adapter_model(t, f"trial-{trial_id}", cfg)
    t.log_metrics(metrics, step=steps, model_id=model_id)
    # the confirmation split, averaged over seeds in the same way (logged only: Tune never sees it)
    confirms = [run_examples(t.client, o["run_id"], "confirm").get("confirm") for o in outs]
    confirmed = seed_average(confirms) if all(c is not None for c in confirms) else None
    if confirmed is not None:
        t.log_metrics(seed_metrics([score_metrics(c, "confirm") for c in confirms], confirmed, prefix="confirm"),
                      step=steps, model_id=model_id)
    with tempfile.TemporaryDirectory() as tmp:
        if averaged is not None:
            t.log_artifact(save_examples(averaged, Path(tmp) / examples_file("heldout", steps)), EXAMPLES_DIR)
        if confirmed is not None:
            t.log_artifact(save_examples(confirmed, Path(tmp) / examples_file("confirm", steps)), EXAMPLES_DIR)
    t.log_artifacts(outs[0]["adapter_dir"], "adapter")
    t.finish_model(model_id, outs[0]["adapter_dir"], steps)
    t.set_tags({"rlora.seed_runs": ",".join(o["run_id"] for o in outs)})
    t.finish("FINISHED")
    return {**metrics, "step": steps, "time/loop_s": sum(o["metrics"].get("time/loop_s", 0.0) for o in outs),
            "time/setup_s": sum(o["metrics"].get("time/setup_s", 0.0) for o in outs)}


def _trial_ended(result) -> bool:
    """A trial that ran to its end: an error, or a report with its step (finished, diverged or
    stopped by ASHA). After a Ctrl-C, Tune may list a trial it interrupted before its first report
    as terminated, with no metrics and no config: that one still has to run (--resume)."""
    return result.error is not None or (result.metrics or {}).get("step") is not None


def expected_trials(cfg: SweepConfig) -> int:
    if cfg.tune.search_alg == "optuna":
        return cfg.tune.num_samples
    n = cfg.tune.num_samples
    for spec in cfg.search.values():
        n *= len(spec.grid if spec.kind == "grid" else spec.choice)
    return n


def _trial_dirname(trial) -> str:
    return trial.trial_id


# -------------------------------------------------------------------------------- driver
def concurrency(cfg: SweepConfig) -> int:
    """Trials that fit the cluster at once: for each resource a trial's workers take (CPUs, and GPU
    shares when training on GPUs), how many trials' worth the cluster has; the smallest count."""
    import ray

    from pipeline.train import use_gpu_for, worker_resources

    if cfg.tune.max_concurrent_trials != "auto":
        return int(cfg.tune.max_concurrent_trials)
    sc = cfg.base.scaling
    have = ray.cluster_resources()  # trials hold no CPU themselves
    slots = []
    for res, per_worker in worker_resources(sc, use_gpu_for(sc.use_gpu)).items():
        need, avail = sc.num_workers * per_worker, have.get(res, 0)
        if need > avail + 1e-9:
            raise ConfigError(f"base.scaling: a trial needs {need:g} {res} but the cluster has {avail:g}")
        slots.append(int(avail / need + 1e-9))
    return max(1, min(slots))


def _sweep_dir(cfg: SweepConfig, resume: Optional[str]) -> Path:
    root = Path(cfg.base.output_dir).resolve() / "sweeps" / cfg.name
    if resume is None:
        d = root / datetime.now().strftime("%Y%m%d-%H%M%S")
        d.mkdir(parents=True, exist_ok=False)
        (root / "LATEST").write_text(d.name + "\n")
        return d
    if resume == "latest":
        if not (root / "LATEST").is_file():
            raise ConfigError(f"--resume: no earlier sweep named {cfg.name!r} under {root}")
        return root / (root / "LATEST").read_text().strip()
    return Path(resume).resolve()


def ray_storage(cfg: SweepConfig, sweep_dir: Path) -> str:
    """Where this sweep's Tune state and trial checkpoints live: the sweep directory, or with
    ``base.storage`` (a URI every node reaches) the same sweep's place there."""
    if cfg.base.storage:
        return f"{cfg.base.storage.rstrip('/')}/sweeps/{cfg.name}/{sweep_dir.name}"
    return str(sweep_dir)


def build_tuner(cfg: SweepConfig, sweep_dir: Path, parent_run_id: str, tracking_uri: str, resume: bool,
                callbacks: Optional[list] = None, retry_errored: bool = False):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from pipeline._optuna import ResumableOptunaSearch

    where = ray_storage(cfg, sweep_dir)
    ctx = {"base": cfg.base.model_dump(mode="json"), "parent_run_id": parent_run_id, "metric": cfg.tune.metric,
           "mode": cfg.tune.mode, "experiment": cfg.base.mlflow.experiment, "sweep_name": cfg.name,
           "train_storage": f"{where}/train", "tune_storage": f"{where}/tune", "seeds": cfg.tune.seeds,
           "in_trial": cfg.tune.train_in_trial}
    ctx["base"]["mlflow"]["tracking_uri"] = tracking_uri
    # The trial process itself holds no CPU (Ray refuses an empty bundle, and any CPU share would
    # starve its own workers on a small cluster): only a token of the memory resource. Trained in
    # the trial's own process, the trial holds what its one worker would have.
    resources = {"CPU": 0, "memory": 2**20}
    if cfg.tune.train_in_trial:
        from pipeline.train import use_gpu_for, worker_resources

        resources.update(worker_resources(cfg.base.scaling, use_gpu_for(cfg.base.scaling.use_gpu)))
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
    from pipeline.tune_state import save_often

    save_often(ctx["tune_storage"])
    if resume:
        # an errored trial, with retry_errored, runs its trial function again: its Ray Train runs
        # resume from their own last checkpoints (the function reports no Tune checkpoint)
        return tune.Tuner.restore(ctx["tune_storage"], trainable=trainable, resume_unfinished=True,
                                  resume_errored=retry_errored, restart_errored=False)
    search_alg = None
    if cfg.tune.search_alg == "optuna":
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
        search_alg = ResumableOptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed,
                                  sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
                                  study_name=cfg.name, storage=storage)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.base.train.steps, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=concurrency(cfg), trial_dirname_creator=_trial_dirname,
                                    reuse_actors=reuse_trial_actors(cfg)),
        run_config=tune.RunConfig(name="tune", storage_path=where,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks),
    )


def reuse_trial_actors(cfg: SweepConfig) -> bool:
    """``tune.reuse_actors``; by default a trial's actor (the process that drives its Ray Train run:
    imports, MLflow client) runs a later trial too, saving that trial's actor start-up, unless the
    scheduler is ASHA (refused by the schema): a trial ASHA stops is still inside
    ``trainer.fit()`` when Tune would reset its actor, and with Ray 2.60 a 1-slot ASHA sweep with
    reused actors stops starting trials after its second. Without early
    stopping every trial's function has returned before its actor is reused."""
    if cfg.tune.reuse_actors is not None:
        return cfg.tune.reuse_actors
    return cfg.tune.scheduler != "asha"


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
    from pipeline.reports import adapter_cells, plot_objective_vs_params, section_cell, trials_table

    rows = []
    for r in results:
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
        rows.append({"trial_id": trial_id, "status": status, "steps": step, "loop_s": metrics.get("time/loop_s"),
                     "setup_s": metrics.get("time/setup_s"), "started_at": metrics.get(f"{timeline.PREFIX}start"),
                     "startup_s": metrics.get("time/startup_s", timeline.metrics(metrics).get("time/startup_s")),
                     cfg.tune.metric: obj if status != "ERROR" else None, "mlflow_run": child,
                     # (a restored errored trial that was not retried comes back without its config)
                     **cells, **{k: section_cell((r.config or {}).get(k)) for k in cfg.search}})
        rows[-1][f"{cfg.tune.metric}_stderr"] = metrics.get(f"{cfg.tune.metric}_stderr") if obj is not None else None
    ok = [row for row in rows if row[cfg.tune.metric] is not None and not math.isnan(row[cfg.tune.metric])
          and row["status"] != "ERROR"]
    sign = -1.0 if cfg.tune.mode == "max" else 1.0  # ties broken by trial id, as the eval stage does
    ok.sort(key=lambda row: (sign * row[cfg.tune.metric], str(row["trial_id"])))
    # the best is a trial that ran every step (what the eval stage scores and registers), where there is one:
    # a trial ASHA stopped is ranked by an earlier step's score and has no adapter or confirmation score
    best = next((row for row in ok if row["status"] == "DONE"), ok[0] if ok else None)
    ok = [best] + [row for row in ok if row is not best] if best else ok
    verdict, vs_base, claims = compare_trials(ok, cfg.tune.metric, tracker.client, *base)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    md, csv_path, html = trials_table(rows, list(cfg.search), cfg.tune.metric, out, cfg.tune.mode,
                                      confirm_metric(cfg.tune.metric), claims_note(claims))
    tracker.log_artifact(md, "trials")
    tracker.log_artifact(csv_path, "trials")
    tracker.log_artifact(html, "trials")
    fig = plot_objective_vs_params(rows, list(cfg.search), cfg.tune.metric, out / "objective_vs_params.png")
    if fig:
        tracker.log_artifact(fig, "figures")
    summary = {"trials": len(rows), "done": sum(r["status"] == "DONE" for r in rows),
               "stopped": sum(r["status"] == "STOPPED" for r in rows),
               "errored": sum(r["status"] == "ERROR" for r in rows)}
    tracker.log_metrics({f"sweep/{k}": v for k, v in summary.items()}, step=0)
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
    from pipeline.reports import sweep_description

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


def sweep_view(cfg: SweepConfig, tracker, experiment_id: str) -> str:
    """The MLflow UI's runs table for this sweep: its trials expanded under the parent run, sorted by
    the objective, with the objective ± se, the held-out means, the searched parameters, the
    dataset and the logged model as columns. Returns the UI route (printed at the end)."""
    from pipeline.tracking import ui_column

    metrics = [cfg.tune.metric, f"{cfg.tune.metric}_stderr", "eval/mean_acc", "eval/mean_margin", "train/loss"]
    columns = [ui_column("attributes", "Dataset"), ui_column("attributes", "Models")]
    columns += [ui_column("metrics", m) for m in dict.fromkeys(metrics)] + [ui_column("params", p) for p in cfg.search]
    state = {"runsExpanded": {tracker.run_id: True}, "selectedColumns": columns,
             "orderByKey": ui_column("metrics", cfg.tune.metric), "orderByAsc": cfg.tune.mode == "min"}
    return tracker.share_view(experiment_id, f"sweep-{tracker.run_id[:12]}", state)


TRIAL_DISAGREEMENT = 0.07  # share of examples two of the main sweep's trials answer differently (measured)


def precision_note(cfg: SweepConfig) -> str:
    """What standard error the sweep's settings give its objective and its claims, said before it starts."""
    from pipeline.data import resolve_tasks
    from pipeline.stats import expected_se, objective_column

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

    from pipeline.batching import confirmation_examples
    from pipeline.stats import family_crit, objective_column, paired_se

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


QUIET_WORKERS = {"TQDM_DISABLE": "1"}  # lm-eval's and transformers' progress bars off inside workers


def run_sweep(cfg: SweepConfig, config_path: str, resume: Optional[str] = None, console=None,
              retry_errored: bool = False) -> dict[str, Any]:
    """The sweep, its summary and its eval stage. ``console`` (pipeline.console.Console): its log file
    goes in the sweep directory and is attached to the parent run. ``retry_errored`` (with ``resume``):
    trials that ended in an error run again, from their last checkpoint."""
    t0 = time.time()
    from pipeline.models import resolve_model
    from pipeline.tracking import Tracker, base_model_run, check_reachable, resolve_tracking_uri
    from pipeline.train import ensure_ray

    tracking_uri = resolve_tracking_uri(cfg.base.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    sweep_dir = _sweep_dir(cfg, resume)
    tracker = Tracker(tracking_uri)
    state_path = sweep_dir / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise ConfigError(f"--resume: {sweep_dir} is not a sweep directory (no {STATE_FILE})")
        state = json.loads(state_path.read_text())
        tracker.run_id = state["parent_run_id"]
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    else:
        resolve_model(cfg.base.model)  # convert an embedded model once, before any trial starts
        parent = tracker.start_run(cfg.base.mlflow.experiment, cfg.name, {
            "search": {k: v.model_dump(by_alias=True, exclude_none=True) for k, v in cfg.search.items()},
            "tune": cfg.tune.model_dump(mode="json"), "base": cfg.base.model_dump(mode="json")},
            tags={"rlora.sweep": cfg.name, "sweep_dir": str(sweep_dir), "config_file": config_path})
        state = {"parent_run_id": parent, "config": cfg.model_dump(mode="json", by_alias=True),
                 "tracking_uri": tracking_uri, "started": time.time()}
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        (sweep_dir / "sweep_config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
        tracker.log_artifact(sweep_dir / "sweep_config.json")  # what `eval.run --sweep` reads back
        # the base model's run, before anything in the sweep's tail (its scoring, the eval stage) looks for it
        base_model_run(tracker.client, parent, cfg.base.model)
    if console is not None:
        console.log_to(sweep_dir / LOG_FILE)
        console.attach_to = (tracking_uri, tracker.run_id)
    print(f"sweep {cfg.name}: {sweep_dir}\nMLflow parent run {tracker.run_id} ({tracking_uri})", flush=True)
    print(precision_note(cfg), flush=True)

    from pipeline.stats import objective_column
    from pipeline.tail import BaseHeldOut, TailStart, tail_stage

    # the eval stage's head start and the base model's held-out scoring in the sweep's tail
    # (not on --resume: Tune restores a sweep with the callbacks it started with)
    tail = None if resume else tail_stage(cfg, tracker.run_id, tracking_uri)
    base = None if resume or objective_column(cfg.tune.metric) is None else BaseHeldOut(cfg, tracking_uri,
                                                                                        tracker.run_id)
    try:
        ensure_ray(worker_env=None if console is None or console.verbose else QUIET_WORKERS)
        slots = concurrency(cfg)
        in_tail = [TailStart(expected_trials(cfg), tail, base, slot_at_start=cfg.tune.train_in_trial)
                   ] if tail is not None or base is not None else None
        tuner = build_tuner(cfg, sweep_dir, tracker.run_id, tracking_uri, resume=bool(resume), callbacks=in_tail,
                            retry_errored=retry_errored)
        try:
            results = tuner.fit()
        except KeyboardInterrupt:
            results = None
    except BaseException as e:
        if tail is not None:
            tail.cancel()
        if base is not None:
            base.cancel()
        if not isinstance(e, KeyboardInterrupt):
            tracker.set_tags({"error": f"{type(e).__name__}: {e}"[:500]})
            tracker.finish("FAILED")
        raise
    def stopped() -> dict[str, Any]:  # interrupted: the parent KILLED, and how to go on
        for started in (tail, base):
            if started is not None:
                started.cancel()
        tracker.client.update_run(tracker.run_id, status="KILLED")
        print(f"\nsweep interrupted; resume with:\n  python -m pipeline.sweep {config_path} --resume {sweep_dir}",
              file=sys.stderr)
        return {"interrupted": True, "sweep_dir": str(sweep_dir), "parent_run_id": tracker.run_id}

    if results is None or sum(map(_trial_ended, results)) < expected_trials(cfg):
        return stopped()
    try:  # a Ctrl-C while the base model is scored or the summary written: --resume does both again
        if base is not None:
            base.wait()
        out = summarize(cfg, results, tracker, sweep_dir, score_base(cfg, tracker))
    except KeyboardInterrupt:
        return stopped()
    wall = time.time() - t0
    # share of the sweep's slot-time spent in training loops (steps + evals), the rest is Ray and
    # worker start-up, model loading, scheduling and idle slots
    loop_s = sum((row.get("loop_s") or 0.0) for row in out["rows"])
    busy = loop_s / (wall * slots) if wall > 0 else 0.0
    timing = {"sweep/wall_s": wall, "sweep/slots": slots, "sweep/train_loop_s": loop_s}
    if not resume:  # a resumed sweep's clock starts at the resume: its trials' earlier loops do not fit in it
        timing["sweep/outside_training_fraction"] = 1.0 - busy
    # run_training entered -> first step (pipeline.timeline), per trial
    timing.update(timeline.startup_summary([(row.get("started_at"), row.get("startup_s")) for row in out["rows"]]))
    tracker.log_metrics(timing, step=0)
    out["timing"] = timing
    tracker.finish("FINISHED")
    if cfg.eval.enabled:
        try:
            out["eval"] = eval_stage(cfg, tracker.run_id, tracking_uri, sweep_dir, tail=tail)
        finally:
            if tail is not None:
                tail.cancel()  # a no-op once the stage has waited for it
    return {**out, "wall_s": wall, "sweep_dir": str(sweep_dir), "parent_run_id": tracker.run_id,
            "tracking_uri": tracking_uri, "experiment": cfg.base.mlflow.experiment}


LOG_FILE = "sweep.log"
def eval_stage(cfg: SweepConfig, parent_run_id: str, tracking_uri: str, sweep_dir: Path, tail=None) -> dict[str, Any]:
    t0 = time.time()
    stage = post_sweep_stage()
    args = {"tail": tail} if tail is not None else {}
    out = stage(cfg, parent_run_id, tracking_uri, sweep_dir / "eval", **args)
    out["wall_s"] = time.time() - t0
    return out


def main(argv=None) -> int:
    from pipeline.cli import base_parser, fail, user_errors

    ap = base_parser("python -m pipeline.sweep", __doc__, "sweep YAML (see sweeps/)", "tune.num_samples=16")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                    help="continue an interrupted sweep (default: the latest one of this name)")
    ap.add_argument("--retry-errored", action="store_true",
                    help="with --resume: run the trials that ended in an error again, each from its last "
                         "checkpoint (finished trials are never rerun)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every worker's output, warnings and Ray's log lines live (they are always in "
                         f"the sweep directory's {LOG_FILE}, attached to the parent run)")
    args = ap.parse_args(argv)
    if args.retry_errored and args.resume is None:
        ap.error("--retry-errored only applies with --resume")
    try:
        cfg = load_sweep_config(args.config, args.overrides)
    except user_errors() as e:
        return fail(e)
    from pipeline.console import Console

    if not args.verbose:  # third-party progress bars in this process, at their source
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = Console(verbose=args.verbose)
    try:
        with console:
            try:
                code = _run_and_report(cfg, args, console)
            except Exception:  # the traceback goes in the log too
                import traceback

                traceback.print_exc()
                return 1
            finally:  # Ray flushes its deduplicated worker lines at shutdown: through the console, not after it
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            if console.path:
                print(f"log: {console.path}")
            return code
    finally:
        _attach_log(console)


def _attach_log(console) -> None:
    """The whole console log (what the terminal showed and what it did not) on the parent run."""
    if not (console.path and console.attach_to):
        return
    try:
        from mlflow.tracking import MlflowClient

        uri, run_id = console.attach_to
        MlflowClient(uri).log_artifact(run_id, str(console.path), "logs")
    except Exception as e:  # the log stays in the sweep directory
        print(f"warning: could not attach {console.path} to the parent run: {e}", file=sys.stderr)


def _run_and_report(cfg: SweepConfig, args, console) -> int:
    from pipeline.cli import fail, user_errors

    try:
        out = run_sweep(cfg, args.config, args.resume, console, retry_errored=args.retry_errored)
    except user_errors() as e:
        return fail(e)
    except PostSweepError as e:  # the sweep itself is complete and recorded
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out.get("interrupted"):
        return 130
    s, best = out["summary"], out["best"]
    print(f"\nsweep {cfg.name} finished in {out['wall_s']:.0f}s: {s['trials']} trials "
          f"({s['done']} done, {s['stopped']} stopped early by ASHA, {s['errored']} failed)")
    if best:
        params = ", ".join(f"{k}={best[k]}" for k in cfg.search)
        se = best.get(f"{cfg.tune.metric}_stderr")
        cm = confirm_metric(cfg.tune.metric)
        confirmed = (f"; on the confirmation split {cm} = {best[cm]:.4f} ± {best.get(cm + '_stderr', math.nan):.4f}"
                     if best.get(cm) is not None else "")
        print(f"best {cfg.tune.metric} = {best[cfg.tune.metric]:.4f}" + (f" ± {se:.4f}" if se is not None else "")
              + f" on the selection split (trial {best['trial_id']}){confirmed}: {params}")
        for sentence in (out.get("verdict"), out.get("vs_base")):
            if sentence:
                print(sentence[0].upper() + sentence[1:] + ".")
        print(open(Path(out["sweep_dir"]) / "report" / "trials.md").read().rstrip())
    t = out["timing"]
    share = t.get("sweep/outside_training_fraction")
    print(f"time outside training loops (Ray/worker start-up, model load, scheduling, idle slots): "
          + (f"{100 * share:.1f}% of {t['sweep/slots']} slot(s) x {t['sweep/wall_s']:.0f}s" if share is not None
             else "not measured (a resumed sweep)")
          + (f"; a trial's start-up before its first step: median {t['sweep/trial_startup_median_s']:.1f}s"
             if "sweep/trial_startup_median_s" in t else "")
          + (f" (first trial {t['sweep/trial_startup_first_s']:.1f}s, later trials median "
             f"{t['sweep/trial_startup_later_median_s']:.1f}s)" if "sweep/trial_startup_later_median_s" in t else ""))
    if out.get("eval"):
        ev = out["eval"]
        head = f", {len(ev['tail'])} of them started in the sweep's tail" if ev.get("tail") else ""
        print(f"eval stage ({ev['wall_s']:.0f}s after the trials{head}): {len(ev['rows'])} model(s) -> {cfg.eval.tasks}; "
              f"adapters registered as '{ev['registry']}' versions {sorted(ev['versions'].values(), key=int)}")
        print(open(Path(out["sweep_dir"]) / "eval" / "comparison.md").read().rstrip())
    uri = out["tracking_uri"]
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    how = "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}, then "
    print(f"MLflow: {how}open {ui}/{out['ui_view']} (experiment '{out['experiment']}', parent run "
          f"{out['parent_run_id']}: its description has this summary)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
