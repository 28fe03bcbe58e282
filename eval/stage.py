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

import json
from pathlib import Path
from typing import Any, Optional

from eval.harness import EvalJob, EvalSettings, evaluate_jobs

SIG_TAG = "rlora.eval.signature"
ROUND_TAG = "rlora.eval.round"
ROLE_TAG = "rlora.eval_role"


class EvalStageError(RuntimeError):
    pass


def headline(scores: dict[str, float]) -> dict[str, float]:
    """The scores worth a column: family averages, MMLU categories, held-out accuracies."""
    from eval.run import CATEGORY_GROUPS

    return {k: v for k, v in sorted(scores.items())
            if k.endswith("/avg") or k.startswith("heldout/") or (k.split("/")[0].startswith("mmlu") and k.split("/")[1] in CATEGORY_GROUPS)}


def settings_from(ev, model: str) -> EvalSettings:
    from eval.run import resolve_tasks

    return EvalSettings(model=model, tasks=tuple(resolve_tasks(list(ev.tasks), ev.task_source)), limit=ev.limit,
                        num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, gen_kwargs=ev.gen_kwargs)


def _has_adapter(client, run_id: str) -> bool:
    return any(a.path.endswith("adapter_config.json") for a in client.list_artifacts(run_id, "adapter"))


def select_trials(client, parent, metric: str, mode: str, top_k: int) -> list:
    """The ``top_k`` finished child runs with an adapter, best first by ``metric``."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    cands = [r for r in runs if r.data.tags.get("rlora.trial_id") and r.data.tags.get("tune.status") == "DONE"
             and metric in r.data.metrics]
    cands.sort(key=lambda r: r.data.metrics[metric], reverse=(mode == "max"))
    chosen = []
    for r in cands:
        if len(chosen) == top_k:
            break
        if _has_adapter(client, r.info.run_id):
            chosen.append(r)
    return chosen


def _base_run(tracker, parent, model: str) -> str:
    found = tracker.client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{ROLE_TAG}` = 'base'",
        max_results=1)
    if found:
        return found[0].info.run_id
    from pipeline.tracking import Tracker

    t = Tracker(tracker.tracking_uri)
    exp_name = tracker.client.get_experiment(parent.info.experiment_id).name
    rid = t.start_run(exp_name, "base-model", {"model": model}, tags={ROLE_TAG: "base"},
                      parent_run_id=parent.info.run_id)
    t.finish("FINISHED")
    return rid


def _register(client, name: str, run, scores: dict[str, float], metric: str) -> str:
    from mlflow.exceptions import MlflowException

    tags = {k: f"{v:.4f}" for k, v in headline(scores).items()}
    tags.update({"trial_id": run.data.tags.get("rlora.trial_id", ""), metric: f"{run.data.metrics.get(metric, float('nan')):.4f}"})
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
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id, tags=tags,
                                     description=f"trial {tags['trial_id']}: adapter directory (PEFT format, "
                                                 "load with rlora.from_pretrained)")
    return str(mv.version)


def plot_comparison(rows: list[dict], keys: list[str], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys or not rows:
        return None
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(keys) + 1), 3.4))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [r.get(k) or 0.0 for k in keys], width, label=r["model"], color="0.55" if r["model"] == "base" else None)
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.set_title("eval stage: base model vs top trials", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval_stage(parent_run_id: str, tracking_uri: str, ev, model: str, metric: str, mode: str,
                   sweep_name: str, params: list[str], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, parent_run_id)
    client = tracker.client
    parent = client.get_run(parent_run_id)
    settings = settings_from(ev, model)
    sig = settings.signature()
    trials = select_trials(client, parent, metric, mode, ev.top_k)
    if ev.top_k and not trials:
        raise EvalStageError(f"sweep {parent_run_id}: no finished trial with an adapter to evaluate")
    targets: list[tuple[str, Any]] = [(r.data.tags["rlora.trial_id"], r) for r in trials]
    if ev.include_base:
        targets.insert(0, ("base", client.get_run(_base_run(tracker, parent, model))))
    jobs, scores = [], {}
    for name, run in targets:
        if run.data.tags.get(SIG_TAG) == sig:  # already scored with these settings: reuse, log nothing
            scores[name] = {k: v for k, v in run.data.metrics.items() if "/" in k and _is_eval_metric(k)}
            continue
        adapter = None if name == "base" else f"runs:/{run.info.run_id}/adapter"  # fetched by the worker
        jobs.append(EvalJob(name=name, adapter_dir=adapter, run_id=run.info.run_id, tracking_uri=tracking_uri))
    cached = list(scores)
    print(f"eval stage: {len(targets)} model(s) ({len(cached)} already scored with these settings), "
          f"tasks {', '.join(ev.tasks)}, limit {ev.limit}", flush=True)
    results = evaluate_jobs(settings, jobs, max_workers=ev.max_workers, cpus_per_worker=ev.cpus_per_worker,
                            progress=progress)
    scores.update(_log_results(results, settings, tracking_uri, client))
    registry = ev.registry_name or f"rlora-{sweep_name}"
    versions = {name: _register(client, registry, client.get_run(run.info.run_id), scores[name], metric)
                for name, run in targets if name != "base" and name in scores}
    rows = [{"model": name, "run_id": run.info.run_id,
             metric: run.data.metrics.get(metric) if name != "base" else None,
             **{p: run.data.params.get(p) for p in params}, "registry_version": versions.get(name),
             **headline(scores[name])}
            for name, run in targets if name in scores]
    keys = sorted({k for name in scores for k in headline(scores[name])})
    for f in _write_comparison(rows, keys, metric, params, Path(out_dir)):
        tracker.log_artifact(f, "eval")
    tracker.set_tags({"rlora.eval.registry": registry, SIG_TAG: sig})
    failed = {r["name"]: r["error"] for r in results if r["error"]}
    summary = {"rows": rows, "registry": registry, "versions": versions, "evaluated": [r["name"] for r in results],
               "cached": cached, "failed": failed, "signature": sig}
    (Path(out_dir) / "eval_stage.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if failed:
        raise EvalStageError(f"eval stage: {len(failed)} of {len(results)} evaluations failed: "
                             + "; ".join(f"{name}: {err}" for name, err in failed.items()))
    return summary


def _log_results(results: list[dict], settings: EvalSettings, tracking_uri: str, client) -> dict[str, dict]:
    """Scores onto each job's run, at the next eval round (a new setting is a new point, never a
    duplicate); a failed job gets its error as a tag. Returns the scores by job name."""
    from pipeline.tracking import Tracker

    scores = {}
    for r in results:
        t = Tracker(tracking_uri, r["run_id"])
        if r["error"]:
            t.set_tags({"rlora.eval.error": r["error"][:500]})
            continue
        rnd = int(client.get_run(r["run_id"]).data.tags.get(ROUND_TAG, "-1")) + 1
        t.log_metrics({**r["scores"], "eval/wall_s": r["wall_s"]}, step=rnd)
        t.set_tags({SIG_TAG: settings.signature(), ROUND_TAG: str(rnd),
                    "rlora.eval.settings": json.dumps(settings.__dict__, default=str)})
        scores[r["name"]] = r["scores"]
    return scores


def _write_comparison(rows: list[dict], keys: list[str], metric: str, params: list[str], out_dir: Path) -> list[Path]:
    """comparison.{md,csv,html} (every headline score) and comparison.png (family averages)."""
    from pipeline.reports import write_table

    files = list(write_table(rows, ["model", metric, *params, *keys, "registry_version", "run_id"], out_dir,
                             "comparison"))
    fig = plot_comparison(rows, [k for k in keys if k.endswith("/avg") or k.startswith("heldout/")],
                          out_dir / "comparison.png")
    return files + ([fig] if fig else [])


def _is_eval_metric(key: str) -> bool:
    from eval.run import FAMILIES

    return key.split("/")[0] in (*FAMILIES, "heldout")
