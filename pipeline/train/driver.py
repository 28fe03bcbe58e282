"""One training run from a RunConfig: MLflow run, Ray Train (or in-trial) workers, the logged adapter."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import timeline
from pipeline.config.run import RunConfig
from pipeline.model import adapters
from pipeline.model.base import resolve_model
from pipeline.runs import plot_curves
from pipeline.runtime import ensure_ray, error_line, torch_backend, use_gpu_for, worker_resources
from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri
from pipeline.train.in_trial import InProcess
from pipeline.train.request import TrainRequest


def adapter_model(tracker, name: str, cfg: RunConfig) -> str:
    """The run's adapter as an MLflow logged model: its held-out evaluations are linked to it as they
    are logged, its files uploaded when training ends (``Tracker.finish_model``)."""
    if cfg.adapter.uses_rlora:
        params = {"preset": cfg.adapter.tuner_preset, "num_heads": cfg.adapter.num_heads, "r": cfg.adapter.r,
                  "alpha": cfg.adapter.alpha, "gamma": cfg.adapter.gamma, "head_dropout": cfg.adapter.head_dropout}
    else:
        params = {"method": cfg.adapter.method, **getattr(cfg.adapter, cfg.adapter.method, {})}
    return tracker.create_model(name, {**params, "base_model": cfg.model},
                                tags={"rlora.load": "pipeline.model.adapters.load(base, <downloaded dir>)"})


@dataclass
class TrialRun:
    """How a sweep trial runs its training; a plain ``python -m pipeline.train`` run has none."""

    trial_id: str  # the MLflow child run is found again by it: a restarted trial logs into its run
    name: str  # the Ray Train run's name under ``storage_path``
    storage_path: str
    parent_run_id: Optional[str] = None
    callbacks: list = field(default_factory=list)  # Ray Train callbacks: the reports to Tune
    nan_metrics: dict[str, float] = field(default_factory=dict)  # reported with a diverged loss
    tags: dict[str, str] = field(default_factory=dict)
    in_trial: bool = False  # tune.train_in_trial: one worker, in this process (pipeline.train.in_trial)
    started_at: Optional[float] = None  # when the trial started on this run: its driver phase's start


def run_training(cfg: RunConfig, config_path: Optional[str] = None, quiet: bool = False,
                 trial: Optional[TrialRun] = None) -> dict[str, Any]:
    """Train one run; returns {'run_id', 'metrics', 'adapter_dir', 'result_dir', 'wall_s'}.

    Raises on failure (``FloatingPointError`` when the loss diverged). ``trial``: the run is a sweep
    trial's (see ``TrialRun``); with ``in_trial`` its checkpoints go under the run's storage directory
    and its reports to Tune in place of ``callbacks``."""
    t_start = (trial and trial.started_at) or time.time()
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    model_path = resolve_model(cfg.model)
    tracker = Tracker(tracking_uri)
    run_id, model_id, run_name = _open_run(cfg, tracker, model_path, config_path, trial)
    if not quiet:
        print(f"MLflow run {run_id} ({tracking_uri})", flush=True)
    ensure_ray(quiet)
    t0 = time.time()  # the driver's stamps travel in every report, so a trial ASHA stops keeps its phases
    request = TrainRequest(run=cfg.model_dump(mode="json"), model_path=model_path, tracking_uri=tracking_uri,
                           run_id=run_id, model_id=model_id, nan_metrics=trial.nan_metrics if trial else {},
                           driver_stamps={f"{timeline.PREFIX}start": t_start, f"{timeline.PREFIX}fit": t0})
    name = trial.name if trial else f"train-{run_id}"
    storage = (trial and trial.storage_path) or cfg.storage or str(Path(cfg.output_dir).resolve() / "ray")
    try:
        if trial and trial.in_trial:
            result_metrics, checkpoint = _run_in_trial(cfg, request, storage, name, trial.callbacks)
        else:
            result = _trainer(cfg, request, name, storage, trial.callbacks if trial else None).fit()
            result_metrics, checkpoint = result.metrics, result.checkpoint
    except BaseException as e:
        tracker.set_tags({"error": error_line(e)})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if not isinstance(e, KeyboardInterrupt):  # interrupted: --resume continues with this model
            tracker.client.finalize_logged_model(model_id, "FAILED")
        raise
    return _finish_run(cfg, tracker, run_id, model_id, run_name, t_start, t0, result_metrics or {}, checkpoint)


def _open_run(cfg: RunConfig, tracker: Tracker, model_path: str, config_path: Optional[str],
              trial: Optional[TrialRun]) -> tuple[str, str, str]:
    """The run's MLflow run (a restarted trial's own, reopened) and logged model: their ids and the name."""
    use_gpu = use_gpu_for(cfg.scaling.use_gpu)
    run_name = cfg.mlflow.run_name or cfg.adapter.label
    params = {**cfg.model_dump(mode="json"), "resolved": {
        "model_path": model_path, "use_gpu": use_gpu, "backend": torch_backend(cfg.scaling, use_gpu),
        "rlora" if cfg.adapter.uses_rlora else "peft" if cfg.adapter.uses_peft else "full":
            adapters.resolved(cfg.adapter, cfg.train.steps),
        "effective_batch_size": cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers}}
    # the process driving the run (in a sweep: the trial's actor, reused by later trials)
    tags = {"config_file": config_path or "", "ray.driver_pid": str(os.getpid()), **cfg.adapter.tags,
            **(trial.tags if trial else {})}
    parent = trial.parent_run_id if trial else None
    existing = tracker.find_trial_run(cfg.mlflow.experiment, trial.trial_id, parent) if trial else None
    if existing:
        run_id = tracker.reopen(existing)
        tracker.set_tags({"ray.driver_pid": tags["ray.driver_pid"]})
    else:
        if trial:
            tags["rlora.trial_id"] = trial.trial_id
        run_id = tracker.start_run(cfg.mlflow.experiment, run_name, params, tags=tags, parent_run_id=parent)
    return run_id, adapter_model(tracker, run_name, cfg), run_name


def _trainer(cfg: RunConfig, request: TrainRequest, name: str, storage: str, callbacks: Optional[list]):
    """The Ray Train TorchTrainer of the run: its workers, their resources, failures and checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.worker import train_loop_per_worker  # lazy: loads ray.train

    use_gpu = use_gpu_for(cfg.scaling.use_gpu)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(request),  # Ray Train hands workers a dict
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(cfg.scaling, use_gpu),
                                               placement_strategy=cfg.scaling.placement_strategy),
        torch_config=TorchConfig(backend=torch_backend(cfg.scaling, use_gpu)),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def _run_in_trial(cfg: RunConfig, request: TrainRequest, storage: str, name: str, callbacks) -> tuple:
    import ray.train

    from pipeline.train.worker import train_loop_per_worker  # lazy: loads ray.train

    if cfg.scaling.num_workers != 1 or "://" in storage.removeprefix("file://"):
        raise ValueError("in_trial: one worker, and checkpoints on a local path")
    session = InProcess(Path(storage.removeprefix("file://")) / name, cfg.train.steps if callbacks else None)
    train_loop_per_worker(asdict(request), session)
    return session.metrics, ray.train.Checkpoint.from_directory(str(session.checkpoint)) if session.checkpoint else None


def _finish_run(cfg: RunConfig, tracker, run_id: str, model_id: str, run_name: str, t_start: float, t0: float,
                result_metrics: dict, checkpoint) -> dict[str, Any]:
    """After training: the failure checks, the adapter and figures logged, the run FINISHED."""
    out_dir = Path(cfg.output_dir).resolve()
    t_fit_end = time.time()
    wall = t_fit_end - t0
    nan_step = tracker.client.get_run(run_id).data.tags.get("nan_loss_step")  # set by rank 0
    failure = None
    if nan_step is not None:
        failure = FloatingPointError(f"loss went NaN/inf at step {nan_step}")
    elif checkpoint is None:
        failure = RuntimeError("training ended without a checkpoint")
    if failure is not None:
        tracker.set_tags({"error": str(failure)})
        tracker.finish("FAILED")
        tracker.client.finalize_logged_model(model_id, "FAILED")
        raise type(failure)(f"run {run_id}: {failure}")
    final_dir = out_dir / "runs" / run_id
    with checkpoint.as_directory() as d:
        shutil.copytree(d, final_dir, dirs_exist_ok=True)
    tracker.log_artifacts(final_dir / "adapter", "adapter")
    tracker.finish_model(model_id, final_dir / "adapter", cfg.train.steps)
    if (final_dir / "figures").is_dir():
        tracker.log_artifacts(final_dir / "figures", "figures")
    curves = plot_curves(tracker, ["train/loss", "train/grad_norm", "train/lr"], final_dir / "figures" / "curves.png",
                         title=run_name)
    if curves:
        tracker.log_artifact(curves, "figures")
    metrics = {k: v for k, v in result_metrics.items() if isinstance(v, (int, float))}
    metrics.update(timeline.metrics({**metrics, "start": t_start, "fit": t0, "fit_end": t_fit_end, "done": time.time()}))
    tracker.log_metrics({"train/wall_s": wall, **{k: v for k, v in metrics.items() if k.startswith("time/")
                                                  and not k.startswith(timeline.PREFIX)}}, step=cfg.train.steps)
    tracker.finish("FINISHED")
    (final_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {"run_id": run_id, "metrics": metrics, "adapter_dir": str(final_dir / "adapter"),
            "result_dir": str(final_dir), "wall_s": wall}
