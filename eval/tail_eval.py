"""The eval stage's head start in a sweep's tail (``eval.overlap``; called by ``pipeline.sweep.tail``).

When the sweep's last trial has started, a slot freed by a finished trial would idle until the
stragglers end. ``TailEval.update()`` (on that moment and whenever a trial ends after it) starts
scoring, in a background thread on Ray actors that take a slot as soon as one is free:

- the base model, at once (``eval.include_base``);
- every finished trial that is sure to be among the stage's final top-k, whatever the trials not
  yet settled score: it ranks within ``top_k - unsettled`` among the finished ones, by the same
  order the stage uses (objective, then trial id).

Scores are logged exactly as the stage logs them (with the settings' signature), so the stage
after the sweep reuses them; anything the tail did not finish (failure, cancel) is scored there.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from eval.harness import evaluate_jobs, merge_results
from eval.record import log_results
from eval.stage import jobs_for, select_trials, settings_from, unit_settings
from pipeline.runs import base_model_run
from pipeline.runtime import use_gpu_for
from pipeline.sweep.tail import pending_placement_groups
from pipeline.tracking import Tracker

SETTLED = ("FINISHED", "FAILED", "KILLED")  # a trial run in any other state may still change the ranking


def certain_trials(client, parent, metric: str, mode: str, top_k: int, expected: int) -> list:
    """Finished trial runs that will be among the ``top_k`` the stage selects after the sweep,
    whatever the ``expected - settled`` trials not settled yet score (each can push a finished
    trial down by one place at most)."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    trials = [r for r in runs if r.data.tags.get("rlora.trial_id")]
    k = top_k - (expected - sum(r.info.status in SETTLED for r in trials))
    if k <= 0:
        return []
    # a run FINISHED by its training ran every step; the sweep tags it DONE after the trials
    return select_trials(client, parent, metric, mode, k,
                         done=lambda r: r.info.status == "FINISHED" and r.data.tags.get("tune.status", "DONE") == "DONE")


class TailEval:
    """Started by the sweep (``pipeline.sweep.tail.tail_stage``); ``update()`` is called from Tune's
    callback thread and returns at once, the scoring runs in this object's threads."""

    def __init__(self, cfg, parent_run_id: str, tracking_uri: str):
        from pipeline.sweep.tuner import expected_trials  # lazy: loads peft, torch

        self.cfg, self.parent_run_id, self.uri = cfg, parent_run_id, tracking_uri
        self.expected = expected_trials(cfg)
        precision = cfg.base.train.precision
        self.settings = settings_from(cfg.eval, cfg.base.model, precision)
        self.units = unit_settings(cfg.eval, cfg.base.model, precision)
        self.use_gpu = use_gpu_for(cfg.base.scaling.use_gpu)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="eval-tail")
        self.futures: dict[str, Future] = {}
        self.stop = threading.Event()
        self._scored: dict[str, float] = {}  # model -> seconds after the tail started when its scores were logged
        self.t0 = time.time()

    def names(self) -> set[str]:
        return set(self.futures)

    def scored(self) -> dict[str, float]:
        return dict(self._scored)

    def update(self) -> list[str]:
        """Start scoring what is now certain to be scored; returns the models started by this call."""
        if self.stop.is_set() or pending_placement_groups():
            return []  # a trial's worker group still waits for its slot: an eval actor must not take it
        ev = self.cfg.eval
        tracker = Tracker(self.uri, self.parent_run_id)
        client = tracker.client
        parent = client.get_run(self.parent_run_id)
        targets: list[tuple[str, Any]] = []
        if ev.include_base and "base" not in self.futures:
            targets.append(("base", client.get_run(base_model_run(client, self.parent_run_id, self.cfg.base.model))))
        for r in certain_trials(client, parent, self.cfg.tune.metric, self.cfg.tune.mode, ev.top_k, self.expected):
            if r.data.tags["rlora.trial_id"] not in self.futures:
                targets.append((r.data.tags["rlora.trial_id"], r))
        jobs, _ = jobs_for(targets, self.units, self.settings.signature(), self.uri)
        if not jobs:
            return []
        started = list(dict.fromkeys(j.name for j in jobs))
        fut = self.pool.submit(self._score, jobs)
        for name in started:
            self.futures[name] = fut
        print(f"eval stage, in the sweep's tail: scoring {', '.join(started)}", flush=True)
        return started

    def _score(self, jobs) -> None:
        from mlflow import MlflowClient

        ev = self.cfg.eval
        results = merge_results(evaluate_jobs(self.settings, jobs, max_workers=ev.max_workers,
                                              cpus_per_worker=ev.cpus_per_worker, gpus_per_worker=ev.gpus_per_worker,
                                              use_gpu=self.use_gpu, progress=False, stop=self.stop))
        ok = [r for r in results if not r["error"]]  # failed or cancelled: the stage after the sweep retries
        log_results(ok, self.settings, self.uri, MlflowClient(tracking_uri=self.uri))
        for r in ok:
            self._scored[r["name"]] = time.time() - self.t0
        bad = [f"{r['name']} ({r['error'].splitlines()[0][:120]})" for r in results if r["error"]]
        if bad:  # success is counted in the stage's own line; a person only needs to hear of a failure
            print(f"eval stage, in the sweep's tail: not scored (retried after the trials): {', '.join(bad)}", flush=True)

    def wait(self) -> None:
        """Until everything the tail started has ended (its errors are printed, not raised)."""
        for fut in set(self.futures.values()):
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - what it did not log is scored by the stage
                print(f"eval stage, in the sweep's tail: {type(e).__name__}: {e}", flush=True)
        self.pool.shutdown(wait=True)

    def cancel(self) -> None:
        """The sweep stopped (error, Ctrl-C): abandon the tail's work, kill its actors."""
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
