"""The eval stage after a sweep: pick the trials, score them and the base model with lm-eval, record."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from eval.harness import EvalJob, EvalSettings, evaluate_jobs, merge_results
from eval.record import SIG_TAG, headline, is_eval_metric, log_results, paired_rows, register, write_comparison
from eval.task_names import resolve_tasks
from pipeline.claims import confirm_metric
from pipeline.model.adapters import FULL_WEIGHTS
from pipeline.reports import adapter_cells, with_eval_section
from pipeline.runs import base_model_run
from pipeline.runtime import use_gpu_for
from pipeline.sweep.stages import PostSweepError
from pipeline.tracking import DESCRIPTION_TAG, Tracker


class EvalStageError(PostSweepError):
    pass


def settings_from(ev, model: str, precision: str = "fp32") -> EvalSettings:
    """The settings of the whole stage (its signature decides whether a run is already scored)."""
    limit = tuple(sorted(ev.limit.items())) if isinstance(ev.limit, dict) else ev.limit
    return EvalSettings(model=model, tasks=tuple(resolve_tasks(list(ev.tasks), ev.task_source)), limit=limit,
                        num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, gen_kwargs=ev.gen_kwargs,
                        precision=precision)


def unit_settings(ev, model: str, precision: str = "fp32") -> list[EvalSettings]:
    """One EvalSettings per task family, with that family's limit: the units the workers share."""
    whole = settings_from(ev, model, precision)
    return [replace(whole, tasks=(lm_name,), limit=ev.limit_for(family))
            for family, lm_name in zip(ev.tasks, resolve_tasks(list(ev.tasks), ev.task_source))]


def _has_adapter(client, run_id: str) -> bool:
    """The run saved its adapter (or, full fine-tuning, its whole model) under ``adapter/``."""
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


@dataclass
class EvalStage:
    """The eval stage of one finished sweep (the ``rlora_lab.post_sweep`` entry point ``eval``): its
    top trials and the base model scored with lm-eval, recorded on their runs, compared, registered."""

    parent_run_id: str
    tracking_uri: str
    ev: Any  # the sweep's EvalSection
    model: str
    metric: str
    mode: str
    sweep_name: str
    params: list[str]  # the sweep's searched parameters (columns of the comparison)
    out_dir: Path
    precision: str = "fp32"
    use_gpu: Optional[bool] = None
    progress: bool = True

    @classmethod
    def for_sweep(cls, cfg, parent_run_id: str, tracking_uri: str, out_dir: Path) -> "EvalStage":
        return cls(parent_run_id, tracking_uri, cfg.eval, cfg.base.model, cfg.tune.metric, cfg.tune.mode, cfg.name,
                   list(cfg.search), Path(out_dir), precision=cfg.base.train.precision,
                   use_gpu=use_gpu_for(cfg.base.scaling.use_gpu))

    def run(self, tail=None) -> dict[str, Any]:
        """``tail`` (``eval.tail_eval.TailEval``): the part of the stage started while the sweep's last
        trials ran; its models are not scored again, the stage waits for them."""
        tracker = Tracker(self.tracking_uri, self.parent_run_id)
        sig = self.settings.signature()  # an unknown task name stops the stage here, before any run is made
        targets = self._targets(tracker.client)
        # started in the sweep's tail (eval.tail_eval); a trial it started that the stage did not select is left out
        in_tail = {name for name, _ in targets} & (tail.names() if tail is not None else set())
        results, scores, cached = self._score(tracker.client, targets, in_tail, tail)
        registry = self.ev.registry_name or f"rlora-{self.sweep_name}"
        versions = {name: register(tracker.client, registry, tracker.client.get_run(run.info.run_id), scores[name],
                                   self.metric, self.tracking_uri)
                    for name, run in targets if name != "base" and name in scores}
        rows, paired = self._record(tracker, targets, scores, versions, registry)
        failed = {r["name"]: r["error"] for r in results if r["error"]}
        summary = {"rows": rows, "paired": paired, "registry": registry, "versions": versions,
                   "evaluated": [r["name"] for r in results], "cached": cached, "failed": failed,
                   "signature": sig, "tail": sorted(in_tail),
                   "tail_scored": tail.scored() if tail is not None else {}}
        (self.out_dir / "eval_stage.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if failed:
            raise EvalStageError(f"eval stage: {len(failed)} of {len(results)} evaluations failed: "
                                 + "; ".join(f"{name}: {err}" for name, err in failed.items()))
        return summary

    @property
    def settings(self) -> EvalSettings:
        return settings_from(self.ev, self.model, self.precision)

    def _targets(self, client) -> list[tuple[str, Any]]:
        """(name, run) of every model to score: the base model's run first, then the top trials."""
        trials = select_trials(client, client.get_run(self.parent_run_id), self.metric, self.mode, self.ev.top_k)
        if self.ev.top_k and not trials:
            raise EvalStageError(f"sweep {self.parent_run_id}: no finished trial with an adapter to evaluate")
        targets: list[tuple[str, Any]] = [(r.data.tags["rlora.trial_id"], r) for r in trials]
        if self.ev.include_base:
            targets.insert(0, ("base", client.get_run(base_model_run(client, self.parent_run_id, self.model))))
        return targets

    def _score(self, client, targets: list, in_tail: set[str], tail) -> tuple[list[dict], dict[str, dict], list[str]]:
        """Every target's scores: reused where its run holds them with these settings, read back
        from the tail's runs, else computed now (in parallel workers) and logged on its run."""
        settings, sig = self.settings, self.settings.signature()
        units = unit_settings(self.ev, self.model, self.precision)
        jobs, scores = jobs_for([t for t in targets if t[0] not in in_tail], units, sig, self.tracking_uri)
        cached = list(scores)
        print(f"eval stage: {len(targets)} model(s) ({len(cached)} already scored with these settings"
              + (f", {len(in_tail)} started in the sweep's tail" if in_tail else "")
              + f"), tasks {', '.join(self.ev.tasks)}, limit {self.ev.limit}", flush=True)
        run_jobs = functools.partial(evaluate_jobs, settings, max_workers=self.ev.max_workers,
                                     cpus_per_worker=self.ev.cpus_per_worker, gpus_per_worker=self.ev.gpus_per_worker,
                                     use_gpu=self.use_gpu, progress=self.progress)
        results = merge_results(run_jobs(jobs))
        scores.update(log_results(results, settings, self.tracking_uri, client))
        if in_tail:  # what the tail scored is read back from its runs; what it did not finish is scored now
            tail.wait()
            late = [(name, client.get_run(run.info.run_id)) for name, run in targets if name in in_tail]
            retry, done = jobs_for(late, units, sig, self.tracking_uri)
            scores.update(done)
            if retry:
                print(f"eval stage: {len({j.name for j in retry})} model(s) the tail did not finish, scored now",
                      flush=True)
                more = merge_results(run_jobs(retry))
                scores.update(log_results(more, settings, self.tracking_uri, client))
                results += more
        return results, scores, cached

    def _record(self, tracker, targets: list, scores: dict, versions: dict, registry: str) -> tuple[list, list]:
        """The comparison (table, paired differences, plot) on the parent run and in its description."""
        client, metric, confirm = tracker.client, self.metric, confirm_metric(self.metric)
        rows = [{"model": name, "run_id": run.info.run_id,
                 metric: run.data.metrics.get(metric) if name != "base" else None,
                 f"{metric}_stderr": run.data.metrics.get(f"{metric}_stderr") if name != "base" else None,
                 confirm: run.data.metrics.get(confirm), f"{confirm}_stderr": run.data.metrics.get(f"{confirm}_stderr"),
                 **adapter_cells(run.data.params),
                 **{p: run.data.params.get(p, run.data.tags.get("rlora.adapter") if p == "adapter" else None)
                    for p in self.params},
                 "registry_version": versions.get(name),
                 **headline(scores[name])}
                for name, run in targets if name in scores]
        keys = sorted({k for name in scores for k in headline(scores[name]) if not k.endswith("_stderr")})
        paired = paired_rows(client, [(name, run.info.run_id) for name, run in targets if name in scores])
        files = write_comparison(rows, keys, metric, self.params, self.out_dir, paired,
                                 confirm if any(r.get(confirm) is not None for r in rows) else None)
        for f in files:
            tracker.log_artifact(f, "eval")
        tracker.set_tags({"rlora.eval.registry": registry, SIG_TAG: self.settings.signature()})
        note = client.get_run(self.parent_run_id).data.tags.get(DESCRIPTION_TAG, "")
        tracker.set_description(with_eval_section(note, f"Registered model `{registry}`.\n\n" + files[0].read_text()))
        return rows, paired


def jobs_for(targets: list[tuple[str, Any]], units: list[EvalSettings], sig: str, tracking_uri: str
             ) -> tuple[list[EvalJob], dict[str, dict]]:
    """One job per (model, task family) unit of every target not yet scored with these settings
    (family-major: every model's first, usually costliest, family starts first), and the scores of
    those already scored (reused, nothing logged again)."""
    jobs, scores = [], {}
    for unit in units:
        for name, run in targets:
            if run.data.tags.get(SIG_TAG) == sig:
                scores[name] = {k: v for k, v in run.data.metrics.items() if "/" in k and is_eval_metric(k)}
                continue
            adapter = None if name == "base" else f"runs:/{run.info.run_id}/adapter"  # fetched by the worker
            jobs.append(EvalJob(name=name, adapter_dir=adapter, run_id=run.info.run_id, tracking_uri=tracking_uri,
                                settings=unit))
    return jobs, scores
