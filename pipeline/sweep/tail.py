"""The sweep's tail: once its last trial has started, slots that finished trials leave idle would
wait for the stragglers. The base model's held-out scoring (the trials' reference) runs there, as
a Ray task on a freed slot (``BaseHeldOut``), when a trial still running is expected to go on for
at least ``BASE_MIN_TAIL_S`` (the median time of the ended trials less its own time so far). With
``eval.overlap`` (default on) the eval stage starts there too: the base model at once, and every finished trial as soon as it is sure to be among the final
top-k whatever the trials still running score. The stage after the sweep then only scores the
rest and waits for what the tail started (``eval.tail_eval.TailEval``, found through the
``rlora_lab.post_sweep`` entry point ``eval_tail``: ``pipeline/`` does not import ``eval/``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from ray.tune import Callback

from pipeline.runtime import worker_resources
from pipeline.sweep.stages import POST_SWEEP, TAIL_ENTRY
from pipeline.tracking import Tracker

# the base model's held-out scoring starts in the tail if a trial has this long left ($RLORA_BASE_MIN_TAIL_S)
BASE_MIN_TAIL_S = 10.0


def tail_stage(cfg, parent_run_id: str, tracking_uri: str) -> Optional[Any]:
    """The eval stage's tail worker for this sweep, or None (overlap off, eval off, not installed)."""
    from importlib.metadata import entry_points

    if not (cfg.eval.enabled and cfg.eval.overlap):
        return None
    found = list(entry_points(group=POST_SWEEP, name=TAIL_ENTRY))
    if not found:
        print(f"eval.overlap: no '{POST_SWEEP}' entry point named '{TAIL_ENTRY}' is installed (pip install -e .); "
              "the eval stage runs after the trials", flush=True)
        return None
    return found[0].load()(cfg, parent_run_id, tracking_uri)


def pending_placement_groups() -> bool:
    """Whether any placement group (a Train worker group claiming its slot) is still pending."""
    import ray
    from ray.util import placement_group_table

    return ray.is_initialized() and any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in placement_group_table().values())


class TailStart(Callback):
    """A Tune callback that starts ``base`` (the base model's held-out scoring, ``BaseHeldOut``) and
    calls ``tail.update()`` whenever a trial ends after the sweep's last
    trial has started (every configuration has a trial and none is waiting for resources). An
    error there is printed in one line and never stops the sweep: what the tail did not score,
    the stage after the sweep does. Tune pickles its callbacks with the experiment state:
    the tail (threads, Ray actors) stays out of the pickle, so a restored sweep has none."""

    def __init__(self, expected_trials: int, tail, base=None, slot_at_start: bool = False):
        """``slot_at_start``: a trial holds its slot from its start (trained in its trial's process);
        otherwise its Train worker group claims it later, which the trial's first report shows."""
        self.expected_trials, self.tail, self.base, self.started = expected_trials, tail, base, False
        self.slot_at_start = slot_at_start
        self.began: dict[str, float] = {}  # trial id -> when Tune started it
        self.took: list[float] = []  # how long each ended trial ran
        self.min_tail_s = float(os.environ.get("RLORA_BASE_MIN_TAIL_S", BASE_MIN_TAIL_S))
        self.deferred = False  # a slot was freed while a trial had yet to hold its own: start it later

    def __getstate__(self):
        return {**self.__dict__, "tail": None, "base": None}

    def __setstate__(self, state):  # also one pickled by an earlier version (a sweep resumed after an upgrade)
        self.__dict__.update({"tail": None, "base": None, "began": {}, "took": [], "min_tail_s": BASE_MIN_TAIL_S,
                              "deferred": False, "slot_at_start": False, **state})

    def tail_left_s(self, trials, ended) -> float:
        """The longest time a trial still running is expected to go on: the median time the ended
        trials took, less what it has run so far."""
        import statistics

        now = time.time()
        running = [t for t in trials if t is not ended and t.status == "RUNNING" and t.trial_id in self.began]
        if not running or not self.took:
            return 0.0
        return max(statistics.median(self.took) - (now - self.began[t.trial_id]) for t in running)

    def _update(self, trials, ended) -> None:
        # A trial's worker group still waiting for its slot (the last trial, started as an earlier one
        # ended) must get it before any eval actor: nothing starts now, and Tune's next loop step with
        # no pending group tries again (trials of equal length end together, and the next trial end
        # may be the straggler's own, when the tail has nothing left to hide).
        self.deferred = pending_placement_groups()
        if self.deferred:
            return
        # first, so the base model's held-out scoring gets the freed slot; only where a trial is
        # expected to run on long enough to hide it (on one CPU share it is slower than the
        # driver's scoring after the trials, with every CPU)
        if self.base is not None and self.tail_left_s(trials, ended) >= self.min_tail_s:
            try:
                self.base.start()
            except Exception as e:  # noqa: BLE001 - scored in the driver after the trials instead
                print(f"base model's held-out scoring, in the sweep's tail: {type(e).__name__}: {e}"[:300], flush=True)
        if self.tail is None:
            return
        try:
            self.tail.update()
        except Exception as e:  # noqa: BLE001 - the sweep goes on; the stage after it scores the rest
            print(f"eval stage, in the sweep's tail: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  " (scored after the trials instead)", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        # Tune calls this before it marks ``trial`` RUNNING: every other trial must be past PENDING.
        # Nothing is scored yet: this trial's Train worker group has still to claim its slot, and an
        # eval actor asking at the same moment could take it (the worker group would then wait for a
        # slot until it times out); the tail begins at the next trial's end, or, where trials already
        # ended (several at once, the last trial taking one of their slots), once this one is under way.
        self.began[trial.trial_id] = time.time()
        if not self.started and len(trials) >= self.expected_trials and all(
                t is trial or t.status != "PENDING" for t in trials):
            self.started = True
            self.deferred = bool(self.took)

    def under_way(self, trials) -> bool:
        """Every running trial holds its slot: no placement group is pending and, where a trial's
        worker group claims its slot after the trial starts, every running trial has reported."""
        if pending_placement_groups():
            return False
        return self.slot_at_start or all(t.last_result.get("training_iteration") for t in trials
                                         if t.status == "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.began:
            self.took.append(time.time() - self.began[trial.trial_id])
        if self.started:
            self._update(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.started:
            self._update(trials, trial)

    def on_step_end(self, iteration, trials, **info):
        if self.deferred and self.under_way(trials):
            self._update(trials, None)


class BaseHeldOut:
    """``pipeline.sweep.base_scores.score_base`` as a Ray task holding one trial's resources, started in the
    sweep's tail. ``wait()`` before the summary; what it did not log (failure, cancel) the driver
    scores after the trials as before."""

    def __init__(self, cfg, tracking_uri: str, parent_run_id: str):
        self.cfg, self.uri, self.parent_run_id, self.ref = cfg, tracking_uri, parent_run_id, None

    def start(self) -> None:
        import ray

        if self.ref is not None:
            return
        res = worker_resources(self.cfg.base.scaling, False)
        task = ray.remote(_score_base_task).options(num_cpus=res["CPU"], max_retries=0)  # scores on the CPU
        self.ref = task.remote(self.cfg, self.uri, self.parent_run_id, max(1, int(res["CPU"])))

    def wait(self) -> None:
        import ray

        if self.ref is None:
            return
        try:
            ray.get(self.ref)
        except Exception as e:  # noqa: BLE001 - the driver scores it after the trials
            print(f"base model's held-out scoring, in the sweep's tail: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}"[:300] + " (scored after the trials instead)", flush=True)

    def cancel(self) -> None:
        import ray

        if self.ref is not None:
            ray.cancel(self.ref, force=True)


def _score_base_task(cfg, tracking_uri: str, parent_run_id: str, threads: int) -> None:
    from pipeline.sweep.base_scores import score_base  # lazy: loads peft, torch

    score_base(cfg, Tracker(tracking_uri, parent_run_id), threads=threads)
