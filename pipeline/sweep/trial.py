"""The function Tune runs for one trial: train (once per seed), score, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.run import RunConfig
from pipeline.runs import run_examples
from pipeline.runtime import error_line
from pipeline.stats import examples_file, save_examples, score_metrics, seed_average, seed_metrics
from pipeline.sweep.space import trial_run_config
from pipeline.sweep.tune_state import await_recorded
from pipeline.tracking import EXAMPLES_DIR, Tracker
from pipeline.train.driver import TrialRun, adapter_model, run_training


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


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares, handed to Tune once (``tune.with_parameters``)."""

    base: dict[str, Any]  # the sweep's base RunConfig as JSON, its tracking URI resolved
    parent_run_id: str
    metric: str
    mode: str  # "max" or "min"
    experiment: str
    sweep_name: str
    train_storage: str  # where the trials' Ray Train runs keep their checkpoints
    tune_storage: str  # the Tuner's experiment directory
    seeds: int = 1  # tune.seeds: runs per trial, seeds train.seed, +1, ...
    in_trial: bool = False  # tune.train_in_trial

    @property
    def worst(self) -> dict[str, float]:
        """The objective a diverged run reports: worse than any real score."""
        return {self.metric: -1.0 if self.mode == "max" else 1e9}


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """Tune trainable: one Ray Train run per trial."""
    t_start = time.time()
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    await_recorded(ctx.tune_storage, trial_id)  # before the trial's MLflow run: --resume must know it
    cfg = trial_run_config(ctx.base, params, {"experiment": ctx.experiment, "trial_name": f"trial-{trial_id}"})
    if ctx.seeds > 1:
        tune.report(_seeded_trial(cfg, ctx, trial_id))
        return
    out = run_training(cfg, quiet=True, trial=TrialRun(
        trial_id, f"trial-{trial_id}", ctx.train_storage, parent_run_id=ctx.parent_run_id,
        callbacks=[_intermediate_reports(cfg.train.steps)], nan_metrics=ctx.worst,
        tags={"rlora.sweep": ctx.sweep_name}, in_trial=ctx.in_trial, started_at=t_start))
    # The final step's metrics, now that everything is saved (also right for a trial re-run by
    # --resume whose Train run had already finished, which reports nothing through the callback).
    tune.report({k: v for k, v in out["metrics"].items() if k != "checkpoint_path"})


def _seeded_trial(cfg: RunConfig, ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    """``tune.seeds`` > 1: the configuration trained with seeds train.seed, +1, ... one Ray Train run
    each, nested under the trial's child run. The child run gets the held-out scores of the
    seed-averaged per-example table (= means over seeds) with standard errors over seeds and
    examples, that table, and seed 0's adapter (what the eval stage scores)."""
    import tempfile

    t = Tracker(cfg.mlflow.tracking_uri)
    existing = t.find_trial_run(ctx.experiment, trial_id, ctx.parent_run_id)
    if existing:  # a trial restarted by --resume
        t.reopen(existing)
    else:
        t.start_run(ctx.experiment, f"trial-{trial_id}", cfg.model_dump(mode="json"),
                    tags={"rlora.trial_id": trial_id, "rlora.sweep": ctx.sweep_name, "rlora.seeds": str(ctx.seeds),
                          **cfg.adapter.tags},
                    parent_run_id=ctx.parent_run_id)
    outs = []
    for k in range(ctx.seeds):
        seeded = cfg.model_copy(deep=True)
        seeded.train.seed = cfg.train.seed + k
        seeded.mlflow.run_name = f"trial-{trial_id}-seed{seeded.train.seed}"
        try:
            outs.append(run_training(seeded, quiet=True, trial=TrialRun(
                f"{trial_id}/seed{k}", seeded.mlflow.run_name, ctx.train_storage, parent_run_id=t.run_id,
                nan_metrics=ctx.worst, tags={"rlora.sweep": ctx.sweep_name}, in_trial=ctx.in_trial)))
        except BaseException as e:
            t.set_tags({"error": f"seed {seeded.train.seed}: {error_line(e)}"[:500]})
            t.finish("FAILED")
            raise
    averaged = seed_average([run_examples(t.client, o["run_id"], "heldout").get("heldout") for o in outs])
    metrics = seed_metrics([o["metrics"] for o in outs], averaged)
    steps = cfg.train.steps
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


def trial_ended(result) -> bool:
    """A trial that ran to its end: an error, or a report with its step (finished, diverged or
    stopped by ASHA). After a Ctrl-C, Tune may list a trial it interrupted before its first report
    as terminated, with no metrics and no config: that one still has to run (--resume)."""
    return result.error is not None or (result.metrics or {}).get("step") is not None
