"""The sweep's tail: once its last trial has started, slots that finished trials leave idle would
wait for the stragglers. With ``eval.overlap`` (default on) the eval stage starts there instead:
the base model at once, and every finished trial as soon as it is sure to be among the final
top-k whatever the trials still running score. The stage after the sweep then only scores the
rest and waits for what the tail started (``eval.stage.TailEval``, found through the
``rlora_lab.post_sweep`` entry point ``eval_tail``: ``pipeline/`` does not import ``eval/``).
"""

from __future__ import annotations

from typing import Any, Optional

from ray.tune import Callback

TAIL_ENTRY = "eval_tail"


def tail_stage(cfg, parent_run_id: str, tracking_uri: str) -> Optional[Any]:
    """The eval stage's tail worker for this sweep, or None (overlap off, eval off, not installed)."""
    from importlib.metadata import entry_points

    from pipeline.sweep import POST_SWEEP

    if not (cfg.eval.enabled and cfg.eval.overlap):
        return None
    found = list(entry_points(group=POST_SWEEP, name=TAIL_ENTRY))
    if not found:
        print(f"eval.overlap: no '{POST_SWEEP}' entry point named '{TAIL_ENTRY}' is installed (pip install -e .); "
              "the eval stage runs after the trials", flush=True)
        return None
    return found[0].load()(cfg, parent_run_id, tracking_uri)


class TailStart(Callback):
    """A Tune callback that calls ``tail.update()`` whenever a trial ends after the sweep's last
    trial has started (every configuration has a trial and none is waiting for resources). An
    error there is printed in one line and never stops the sweep: what the tail did not score,
    the stage after the sweep does. Tune pickles its callbacks with the experiment state:
    the tail (threads, Ray actors) stays out of the pickle, so a restored sweep has none."""

    def __init__(self, expected_trials: int, tail):
        self.expected_trials, self.tail, self.started = expected_trials, tail, False

    def __getstate__(self):
        return {**self.__dict__, "tail": None}

    def _update(self) -> None:
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
        # eval actor asking at the same moment could take it (seen: the last trial's worker group
        # timed out waiting); the tail begins at the next trial's end.
        if not self.started and len(trials) >= self.expected_trials and all(
                t is trial or t.status != "PENDING" for t in trials):
            self.started = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.started:
            self._update()

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.started:
            self._update()
