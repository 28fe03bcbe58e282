"""The eval stage after a sweep: the top-k trials (by the sweep's objective) and the base model
are scored through lm-eval in parallel (``eval.harness``), and everything lands in MLflow:

- each trial's child run gets ``bbh/<subtask>``, ``bbh/avg``, ``mmlu/<subject>``,
  ``mmlu/<category>``, ``mmlu/avg`` (and any other family asked for); the base model gets a
  child run of its own (tag ``rlora.eval_role=base``) with the same metric names;
- each evaluated adapter is a version of the registered model ``rlora-<sweep>`` (or the
  configured name), tagged with its scores;
- the parent run gets ``eval/comparison.{md,html,csv}`` and ``eval/comparison.png``.

Idempotent: a run already scored with the same settings (tag ``rlora.eval.signature``) is not
re-evaluated and gets no new metric points; an adapter already registered from the same run
gets its version's tags updated, not a second version.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from eval.harness import EvalJob, EvalSettings, evaluate_jobs, merge_results

from pipeline.claims import confirm_metric
from pipeline.stages import PostSweepError
from pipeline.tracking import base_model_run

SIG_TAG = "rlora.eval.signature"
ROUND_TAG = "rlora.eval.round"


class EvalStageError(PostSweepError):
    pass


def headline(scores: dict[str, float]) -> dict[str, float]:
    """The scores worth a column: family averages, MMLU categories, held-out accuracies."""
    from pipeline.eval_names import CATEGORY_GROUPS

    keep = {k for k in scores if not k.endswith("_stderr") and (
        k.endswith("/avg") or k.startswith("heldout/")
        or (k.split("/")[0].startswith("mmlu") and k.split("/")[1] in CATEGORY_GROUPS))}
    keep |= {f"{k}_stderr" for k in keep if f"{k}_stderr" in scores}  # shown as x ± se
    return {k: scores[k] for k in sorted(keep)}


def settings_from(ev, model: str, precision: str = "fp32") -> EvalSettings:
    """The settings of the whole stage (its signature decides whether a run is already scored)."""
    from eval.task_names import resolve_tasks

    limit = tuple(sorted(ev.limit.items())) if isinstance(ev.limit, dict) else ev.limit
    return EvalSettings(model=model, tasks=tuple(resolve_tasks(list(ev.tasks), ev.task_source)), limit=limit,
                        num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, gen_kwargs=ev.gen_kwargs,
                        precision=precision)


def unit_settings(ev, model: str, precision: str = "fp32") -> list[EvalSettings]:
    """One EvalSettings per task family, with that family's limit: the units the workers share."""
    from dataclasses import replace

    from eval.task_names import resolve_tasks

    whole = settings_from(ev, model, precision)
    return [replace(whole, tasks=(lm_name,), limit=ev.limit_for(family))
            for family, lm_name in zip(ev.tasks, resolve_tasks(list(ev.tasks), ev.task_source))]


def _has_adapter(client, run_id: str) -> bool:
    """The run saved its adapter (or, full fine-tuning, its whole model) under ``adapter/``."""
    from pipeline.adapters import FULL_WEIGHTS

    return any(a.path.endswith(("adapter_config.json", FULL_WEIGHTS)) for a in client.list_artifacts(run_id, "adapter"))


def _tune_done(run) -> bool:
    return run.data.tags.get("tune.status") == "DONE"


def select_trials(client, parent, metric: str, mode: str, top_k: int, done=_tune_done) -> list:
    """The ``top_k`` finished child runs with an adapter, best first by ``metric`` (``done``: which
    trial runs count as finished; after the sweep, those it tagged DONE)."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    cands = [r for r in runs if r.data.tags.get("rlora.trial_id") and done(r) and metric in r.data.metrics]
    sign = -1.0 if mode == "max" else 1.0  # ties broken by trial id, as the sweep's summary does
    cands.sort(key=lambda r: (sign * r.data.metrics[metric], r.data.tags["rlora.trial_id"]))
    chosen = []
    for r in cands:
        if len(chosen) == top_k:
            break
        if _has_adapter(client, r.info.run_id):
            chosen.append(r)
    return chosen


def _register(client, name: str, run, scores: dict[str, float], metric: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import MODEL_ID_TAG

    tags = {k: f"{v:.4f}" for k, v in headline(scores).items()}
    tags.update({"trial_id": run.data.tags.get("rlora.trial_id", ""), metric: f"{run.data.metrics.get(metric, float('nan')):.4f}"})
    confirm = confirm_metric(metric)  # the score that measures it, beside the one that chose it
    if confirm in run.data.metrics:
        tags[confirm] = f"{run.data.metrics[confirm]:.4f}"
    existing = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
    if existing:
        version = existing[0].version
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        return str(version)
    try:
        client.create_registered_model(name, description="R-LoRA adapters evaluated after the sweep")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    model_id = run.data.tags.get(MODEL_ID_TAG)  # the run's logged model (runs before it: the adapter artifact)
    source = f"models:/{model_id}" if model_id else f"{run.info.artifact_uri}/adapter"
    import mlflow

    before = mlflow.get_tracking_uri()
    # MLflow's SQL registry resolves a models:/<id> source through the process-global tracking URI,
    # not this client's (a TODO in its code): point it at this store while the version is created
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags, model_id=model_id,
                                         description=f"trial {tags['trial_id']}: adapter directory (PEFT format; full "
                                                     "fine-tuning: the whole model), load with pipeline.adapters.load")
    finally:
        mlflow.set_tracking_uri(before)
    return str(mv.version)


def plot_comparison(rows: list[dict], keys: list[str], path: Path) -> Optional[Path]:
    from pipeline.reports import pyplot, save_figure

    plt = pyplot()

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys or not rows:
        return None
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(keys) + 1), 3.4))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))]
        err = [r.get(f"{k}_stderr") or 0.0 for k in keys]  # lm-eval's standard error
        ax.bar(xs, [r.get(k) or 0.0 for k in keys], width, yerr=err, capsize=2, label=r["model"],
               color="0.55" if r["model"] == "base" else None)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("eval stage: base model vs top trials (error bars: ±1 standard error)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def run_for_sweep(cfg, parent_run_id: str, tracking_uri: str, out_dir: Path, tail=None) -> dict[str, Any]:
    """The ``rlora_lab.post_sweep`` entry point: the eval stage of a sweep that just finished
    (``tail``: what it started in the sweep's tail, ``eval.tail``)."""
    from pipeline.train import use_gpu_for

    return run_eval_stage(parent_run_id, tracking_uri, cfg.eval, cfg.base.model, cfg.tune.metric, cfg.tune.mode,
                          cfg.name, list(cfg.search), out_dir, precision=cfg.base.train.precision,
                          use_gpu=use_gpu_for(cfg.base.scaling.use_gpu), tail=tail)


def run_eval_stage(parent_run_id: str, tracking_uri: str, ev, model: str, metric: str, mode: str,
                   sweep_name: str, params: list[str], out_dir: Path, progress: bool = True,
                   precision: str = "fp32", use_gpu: Optional[bool] = None, tail=None) -> dict[str, Any]:
    """``tail`` (``eval.tail.TailEval``): the part of the stage started while the sweep's last trials
    ran; its models are not scored again, the stage waits for them."""
    from pipeline.reports import adapter_cells
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, parent_run_id)
    client = tracker.client
    parent = client.get_run(parent_run_id)
    settings = settings_from(ev, model, precision)
    sig = settings.signature()
    trials = select_trials(client, parent, metric, mode, ev.top_k)
    if ev.top_k and not trials:
        raise EvalStageError(f"sweep {parent_run_id}: no finished trial with an adapter to evaluate")
    targets: list[tuple[str, Any]] = [(r.data.tags["rlora.trial_id"], r) for r in trials]
    if ev.include_base:
        targets.insert(0, ("base", client.get_run(base_model_run(client, parent_run_id, model))))
    # started in the sweep's tail (eval.tail); a trial it started that the stage did not select is left out
    in_tail = {name for name, _ in targets} & (tail.names() if tail is not None else set())
    units = unit_settings(ev, model, precision)
    jobs, scores = jobs_for([t for t in targets if t[0] not in in_tail], units, sig, tracking_uri)
    cached = list(scores)
    print(f"eval stage: {len(targets)} model(s) ({len(cached)} already scored with these settings"
          + (f", {len(in_tail)} started in the sweep's tail" if in_tail else "")
          + f"), tasks {', '.join(ev.tasks)}, limit {ev.limit}", flush=True)
    run_jobs = functools.partial(evaluate_jobs, settings, max_workers=ev.max_workers, cpus_per_worker=ev.cpus_per_worker,
                                 gpus_per_worker=ev.gpus_per_worker, use_gpu=use_gpu, progress=progress)
    results = merge_results(run_jobs(jobs))
    scores.update(log_results(results, settings, tracking_uri, client))
    if in_tail:  # what the tail scored is read back from its runs; what it did not finish is scored now
        tail.wait()
        late = [(name, client.get_run(run.info.run_id)) for name, run in targets if name in in_tail]
        retry, done = jobs_for(late, units, sig, tracking_uri)
        scores.update(done)
        if retry:
            print(f"eval stage: {len({j.name for j in retry})} model(s) the tail did not finish, scored now", flush=True)
            more = merge_results(run_jobs(retry))
            scores.update(log_results(more, settings, tracking_uri, client))
            results += more
    registry = ev.registry_name or f"rlora-{sweep_name}"
    versions = {name: _register(client, registry, client.get_run(run.info.run_id), scores[name], metric, tracking_uri)
                for name, run in targets if name != "base" and name in scores}
    confirm = confirm_metric(metric)
    rows = [{"model": name, "run_id": run.info.run_id,
             metric: run.data.metrics.get(metric) if name != "base" else None,
             f"{metric}_stderr": run.data.metrics.get(f"{metric}_stderr") if name != "base" else None,
             confirm: run.data.metrics.get(confirm), f"{confirm}_stderr": run.data.metrics.get(f"{confirm}_stderr"),
             **adapter_cells(run.data.params),
             **{p: run.data.params.get(p, run.data.tags.get("rlora.adapter") if p == "adapter" else None)
                for p in params},
             "registry_version": versions.get(name),
             **headline(scores[name])}
            for name, run in targets if name in scores]
    keys = sorted({k for name in scores for k in headline(scores[name]) if not k.endswith("_stderr")})
    paired = paired_rows(client, [(name, run.info.run_id) for name, run in targets if name in scores])
    files = _write_comparison(rows, keys, metric, params, Path(out_dir), paired,
                              confirm if any(r.get(confirm) is not None for r in rows) else None)
    for f in files:
        tracker.log_artifact(f, "eval")
    tracker.set_tags({"rlora.eval.registry": registry, SIG_TAG: sig})
    from pipeline.reports import with_eval_section
    from pipeline.tracking import DESCRIPTION_TAG

    note = client.get_run(parent_run_id).data.tags.get(DESCRIPTION_TAG, "")
    tracker.set_description(with_eval_section(note, f"Registered model `{registry}`.\n\n" + files[0].read_text()))
    failed = {r["name"]: r["error"] for r in results if r["error"]}
    summary = {"rows": rows, "paired": paired, "registry": registry, "versions": versions, "evaluated": [r["name"] for r in results],
               "cached": cached, "failed": failed, "signature": sig, "tail": sorted(in_tail),
               "tail_scored": tail.scored() if tail is not None else {}}
    (Path(out_dir) / "eval_stage.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if failed:
        raise EvalStageError(f"eval stage: {len(failed)} of {len(results)} evaluations failed: "
                             + "; ".join(f"{name}: {err}" for name, err in failed.items()))
    return summary


def jobs_for(targets: list[tuple[str, Any]], units: list[EvalSettings], sig: str, tracking_uri: str
             ) -> tuple[list[EvalJob], dict[str, dict]]:
    """One job per (model, task family) unit of every target not yet scored with these settings
    (family-major: every model's first, usually costliest, family starts first), and the scores of
    those already scored (reused, nothing logged again)."""
    jobs, scores = [], {}
    for unit in units:
        for name, run in targets:
            if run.data.tags.get(SIG_TAG) == sig:
                scores[name] = {k: v for k, v in run.data.metrics.items() if "/" in k and _is_eval_metric(k)}
                continue
            adapter = None if name == "base" else f"runs:/{run.info.run_id}/adapter"  # fetched by the worker
            jobs.append(EvalJob(name=name, adapter_dir=adapter, run_id=run.info.run_id, tracking_uri=tracking_uri,
                                settings=unit))
    return jobs, scores


def log_results(results: list[dict], settings: EvalSettings, tracking_uri: str, client) -> dict[str, dict]:
    """Scores onto each job's run, at the next eval round (a new setting is a new point, never a
    duplicate); a failed job gets its error as a tag. Returns the scores by job name."""
    from pipeline.tracking import MODEL_ID_TAG, Tracker

    scores = {}
    for r in results:
        t = Tracker(tracking_uri, r["run_id"])
        if r["error"]:
            t.set_tags({"rlora.eval.error": r["error"][:500]})
            continue
        tags = client.get_run(r["run_id"]).data.tags
        rnd = int(tags.get(ROUND_TAG, "-1")) + 1
        t.log_metrics(r["scores"], step=rnd, model_id=tags.get(MODEL_ID_TAG))  # linked to the trial's adapter model
        t.log_metrics({"eval/wall_s": r["wall_s"]}, step=rnd)
        if r.get("examples") is not None and len(r["examples"]):
            import tempfile

            from pipeline.stats import examples_file, save_examples
            from pipeline.tracking import EXAMPLES_DIR

            with tempfile.TemporaryDirectory() as tmp:
                t.log_artifact(save_examples(r["examples"], Path(tmp) / examples_file("lmeval", rnd)), EXAMPLES_DIR)
        t.set_tags({SIG_TAG: settings.signature(), ROUND_TAG: str(rnd),
                    "rlora.eval.settings": json.dumps(settings.__dict__, default=str)})
        scores[r["name"]] = r["scores"]
    return scores


def paired_rows(client, models: list[tuple[str, str]]) -> list[dict]:
    """Per task family, each model's paired difference (on the questions all of the family's models
    answered) to the base model and to the best trial (the first non-base model: targets are
    ranked by the sweep's objective, on data that is not these questions), with simultaneous 95 %
    intervals per family of comparisons (``pipeline.stats.compare_family``: every trial vs the
    base model, every other trial vs the best)."""
    from pipeline.stats import compare_family
    from pipeline.tracking import run_examples

    tables = {name: run_examples(client, rid, "lmeval").get("lmeval") for name, rid in models}
    tables = {k: t for k, t in tables.items() if t is not None}
    trials = [name for name, _ in models if name != "base" and name in tables]
    families = sorted({t.split("/")[0] for name in trials for t in tables[name]["task"]})
    rows = {(name, fam): {"model": name, "family": fam} for fam in families for name in trials}
    for fam in families:
        if fam == "heldout":  # the pool the trials were ranked on: scores only, no claim (the sweep's confirmation split makes them)
            continue
        sub = {k: t[t["task"].str.startswith(fam + "/")] for k, t in tables.items()}
        sub = {k: t for k, t in sub.items() if len(t)}
        members = [k for k in trials if k in sub]
        refs = [("base", "base", members), ("best", trials[0], [k for k in members if k != trials[0]])]
        for label, ref, others in refs:
            if ref not in sub or not others:
                continue
            for name, c in compare_family(sub[ref], {k: sub[k] for k in others}, "correct", by_task=False).items():
                if c.n == 0:
                    continue
                row = rows[(name, fam)]
                row[f"Δ vs {label}"] = f"{100 * c.delta:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]"
                row[f"resolved vs {label}"] = "yes" if c.resolved else "no"
                row[f"sentence vs {label}"] = c.sentence(name, ref)
                row["n"] = c.n
    return [rows[(name, fam)] for name in trials for fam in families if len(rows[(name, fam)]) > 2]


def _write_comparison(rows: list[dict], keys: list[str], metric: str, params: list[str], out_dir: Path,
                      paired: Optional[list[dict]] = None, confirm: Optional[str] = None) -> list[Path]:
    """comparison.{md,csv,html} (every headline score as x ± se), comparison_paired.{md,csv,html}
    (paired differences to the base model and to the best trial) and comparison.png."""
    from pipeline.reports import AB_COL, PCT_COL, write_table

    adapter_cols = [c for c in (PCT_COL, AB_COL) if any(r.get(c) is not None for r in rows)]
    files = list(write_table(rows, ["model", metric, *([confirm] if confirm else []), *adapter_cols, *params, *keys,
                                    "registry_version", "run_id"], out_dir, "comparison"))
    if paired:
        cols = ["model", "family", "n", "Δ vs base", "resolved vs base", "Δ vs best", "resolved vs best"]
        cols = [c for c in cols if any(c in r for r in paired)]
        files += list(write_table(paired, cols, out_dir, "comparison_paired"))
        note = ["", "Differences in points (×100), paired over the questions the family's models all answered; "
                "simultaneous 95 % intervals per task family and reference (max-t bootstrap over every trial vs "
                "the base model, and over every other trial vs the best); 'no' = not resolved at this sample size. "
                "The trials were chosen on the sweep's selection split; heldout_* tasks draw on the same held-out "
                "pool, so they get scores above but no paired claims (the sweep's confirmation split makes those).",
                ""]
        note += [f"- {r[k]}" for r in paired for k in ("sentence vs base", "sentence vs best") if k in r]
        md = files[0]
        md.write_text(md.read_text() + "\n" + files[3].read_text() + "\n".join(note) + "\n")
    fig = plot_comparison(rows, [k for k in keys if k.endswith("/avg") or k.startswith("heldout/")],
                          out_dir / "comparison.png")
    return files + ([fig] if fig else [])


def _is_eval_metric(key: str) -> bool:
    from pipeline.eval_names import FAMILIES

    return key.split("/")[0] in (*FAMILIES, "heldout")
