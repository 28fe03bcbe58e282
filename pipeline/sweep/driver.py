"""One sweep: parent run, base-model scores, the Tuner, the summary and the stage after it."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__, timeline
from pipeline.config.loading import ConfigError
from pipeline.config.sweep import SweepConfig
from pipeline.model.base import resolve_model
from pipeline.runs import base_model_run
from pipeline.runtime import ensure_ray
from pipeline.stats import objective_column
from pipeline.sweep.base_scores import score_base
from pipeline.sweep.notes import precision_note
from pipeline.sweep.stages import find_eval_stage
from pipeline.sweep.summary import summarize
from pipeline.sweep.trial import trial_ended
from pipeline.sweep.tuner import build_tuner, concurrency, expected_trials
from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri

STATE_FILE = "sweep_state.json"
# The sweep directory's format. 2: pipeline/ laid out by stage (rlora-lab 0.2.0); Tune's saved state
# names the trainable and the searcher by module, so a directory of another format cannot resume.
STATE_FORMAT = 2


def resumable_state(sweep_dir: Path) -> dict[str, Any]:
    """The saved state of the sweep in ``sweep_dir``, or a ConfigError naming the version that wrote it."""
    path = sweep_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a sweep directory (no {STATE_FILE})")
    state = json.loads(path.read_text())
    if state.get("format", 1) != STATE_FORMAT:
        wrote = state.get("rlora_lab", "0.1.0 or earlier")
        raise ConfigError(f"--resume: {sweep_dir} was written by rlora-lab {wrote} (sweep format "
                          f"{state.get('format', 1)}); this version ({__version__}) resumes format {STATE_FORMAT} "
                          "only: run the sweep again without --resume")
    return state


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


QUIET_WORKERS = {"TQDM_DISABLE": "1"}  # lm-eval's and transformers' progress bars off inside workers


def run_sweep(cfg: SweepConfig, config_path: str, resume: Optional[str] = None, console=None,
              retry_errored: bool = False) -> dict[str, Any]:
    """The sweep, its summary and its eval stage. ``console`` (pipeline.sweep.console.Console): its log file
    goes in the sweep directory and is attached to the parent run. ``retry_errored`` (with ``resume``):
    trials that ended in an error run again, from their last checkpoint."""
    t0 = time.time()
    tracking_uri = resolve_tracking_uri(cfg.base.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    sweep_dir = _sweep_dir(cfg, resume)
    state = resumable_state(sweep_dir) if resume else None
    tracker = Tracker(tracking_uri)
    _open_parent(cfg, tracker, sweep_dir, config_path, state)
    if console is not None:
        console.log_to(sweep_dir / LOG_FILE)
        console.attach_to = (tracking_uri, tracker.run_id)
    print(f"sweep {cfg.name}: {sweep_dir}\nMLflow parent run {tracker.run_id} ({tracking_uri})", flush=True)
    print(precision_note(cfg), flush=True)
    # the eval stage's head start and the base model's held-out scoring in the sweep's tail
    # (not on --resume: Tune restores a sweep with the callbacks it started with)
    tail, base = (None, None) if resume else _tail_helpers(cfg, tracker.run_id, tracking_uri)
    helpers = [h for h in (tail, base) if h is not None]

    def stopped() -> dict[str, Any]:  # interrupted: the parent KILLED, and how to go on
        for started in helpers:
            started.cancel()
        tracker.client.update_run(tracker.run_id, status="KILLED")
        print(f"\nsweep interrupted; resume with:\n  python -m pipeline.sweep {config_path} --resume {sweep_dir}",
              file=sys.stderr)
        return {"interrupted": True, "sweep_dir": str(sweep_dir), "parent_run_id": tracker.run_id}

    results, slots = _fit(cfg, sweep_dir, tracker, tracking_uri, bool(resume), retry_errored, console, tail, base)
    if results is None or sum(map(trial_ended, results)) < expected_trials(cfg):
        return stopped()
    try:  # a Ctrl-C while the base model is scored or the summary written: --resume does both again
        if base is not None:
            base.wait()
        out = summarize(cfg, results, tracker, sweep_dir, score_base(cfg, tracker))
    except KeyboardInterrupt:
        return stopped()
    wall = time.time() - t0
    out["timing"] = _log_timing(tracker, out["rows"], wall, slots, resumed=bool(resume))
    tracker.finish("FINISHED")
    if cfg.eval.enabled:
        try:
            out["eval"] = _evaluate(cfg, tracker.run_id, tracking_uri, sweep_dir, tail=tail)
        finally:
            if tail is not None:
                tail.cancel()  # a no-op once the stage has waited for it
    return {**out, "wall_s": wall, "sweep_dir": str(sweep_dir), "parent_run_id": tracker.run_id,
            "tracking_uri": tracking_uri, "experiment": cfg.base.mlflow.experiment}


def _open_parent(cfg: SweepConfig, tracker: Tracker, sweep_dir: Path, config_path: str,
                 state: Optional[dict[str, Any]]) -> None:
    """The sweep's parent run: reopened from ``state`` (--resume), or started with the sweep's state
    file, its config as an artifact and the base model's child run."""
    if state is not None:
        tracker.run_id = state["parent_run_id"]
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        return
    resolve_model(cfg.base.model)  # convert an embedded model once, before any trial starts
    parent = tracker.start_run(cfg.base.mlflow.experiment, cfg.name, {
        "search": {k: v.model_dump(by_alias=True, exclude_none=True) for k, v in cfg.search.items()},
        "tune": cfg.tune.model_dump(mode="json"), "base": cfg.base.model_dump(mode="json")},
        tags={"rlora.sweep": cfg.name, "sweep_dir": str(sweep_dir), "config_file": config_path})
    state = {"format": STATE_FORMAT, "rlora_lab": __version__, "parent_run_id": parent,
             "config": cfg.model_dump(mode="json", by_alias=True), "tracking_uri": tracker.tracking_uri,
             "started": time.time()}
    (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    (sweep_dir / "sweep_config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
    tracker.log_artifact(sweep_dir / "sweep_config.json")  # what `eval.run --sweep` reads back
    # the base model's run, before anything in the sweep's tail (its scoring, the eval stage) looks for it
    base_model_run(tracker.client, parent, cfg.base.model)


def _tail_helpers(cfg: SweepConfig, parent_run_id: str, tracking_uri: str) -> tuple:
    """What the sweep starts in its tail as trial slots free up: the eval stage's head start (if the
    stage is installed and enabled) and the base model's held-out scoring (if the metric has one)."""
    from pipeline.sweep.tail import BaseHeldOut, tail_stage  # lazy: loads ray

    tail = tail_stage(cfg, parent_run_id, tracking_uri)
    return tail, BaseHeldOut(cfg, tracking_uri, parent_run_id) if objective_column(cfg.tune.metric) else None


def _fit(cfg: SweepConfig, sweep_dir: Path, tracker: Tracker, tracking_uri: str, resume: bool,
         retry_errored: bool, console, tail, base):
    """The Tuner's results (None after a Ctrl-C) and the trials it runs at once; any other failure
    marks the parent FAILED. A cluster too small for one trial fails here, before training."""
    from pipeline.sweep.tail import TailStart  # lazy: loads ray

    try:
        ensure_ray(worker_env=None if console is None or console.verbose else QUIET_WORKERS)
        slots = concurrency(cfg)
        in_tail = [TailStart(expected_trials(cfg), tail, base, slot_at_start=cfg.tune.train_in_trial)
                   ] if tail is not None or base is not None else None
        tuner = build_tuner(cfg, sweep_dir, tracker.run_id, tracking_uri, resume=resume, callbacks=in_tail,
                            retry_errored=retry_errored)
        try:
            return tuner.fit(), slots
        except KeyboardInterrupt:
            return None, slots
    except BaseException as e:
        for started in (tail, base):
            if started is not None:
                started.cancel()
        if not isinstance(e, KeyboardInterrupt):
            tracker.set_tags({"error": f"{type(e).__name__}: {e}"[:500]})
            tracker.finish("FAILED")
        raise


def _log_timing(tracker: Tracker, rows: list[dict], wall: float, slots: int, resumed: bool) -> dict[str, float]:
    """Where the sweep's time went, on the parent run: the share of slot-time spent in training
    loops (steps + evals; the rest is Ray and worker start-up, model loading, scheduling and idle
    slots) and each trial's start-up (run_training entered -> first step, pipeline.timeline)."""
    loop_s = sum((row.get("loop_s") or 0.0) for row in rows)
    busy = loop_s / (wall * slots) if wall > 0 else 0.0
    timing = {"sweep/wall_s": wall, "sweep/slots": slots, "sweep/train_loop_s": loop_s}
    if not resumed:  # a resumed sweep's clock starts at the resume: its trials' earlier loops do not fit in it
        timing["sweep/outside_training_fraction"] = 1.0 - busy
    timing.update(timeline.startup_summary([(row.get("started_at"), row.get("startup_s")) for row in rows]))
    tracker.log_metrics(timing, step=0)
    return timing


LOG_FILE = "sweep.log"


def _evaluate(cfg: SweepConfig, parent_run_id: str, tracking_uri: str, sweep_dir: Path, tail=None) -> dict[str, Any]:
    """The eval stage of the finished sweep (found through its entry point), with its wall time."""
    t0 = time.time()
    out = find_eval_stage().for_sweep(cfg, parent_run_id, tracking_uri, sweep_dir / "eval").run(tail=tail)
    out["wall_s"] = time.time() - t0
    return out
