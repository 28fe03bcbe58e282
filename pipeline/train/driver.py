"""One training run from a RunConfig: MLflow run, Ray Train (or in-trial) workers, the logged adapter."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import timeline
from pipeline.config.run import RunConfig
from pipeline.model import adapters
from pipeline.model.base import resolve_model
from pipeline.runs import plot_curves
from pipeline.runtime import (
    ensure_ray,
    error_line,
    torch_backend,
    use_gpu_for,
    worker_resources,
)
from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri
from pipeline.train.in_trial import InProcess
from pipeline.train.worker import train_loop_per_worker


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


def run_training(cfg: RunConfig, config_path: Optional[str] = None, parent_run_id: Optional[str] = None,
                 quiet: bool = False, trial_id: Optional[str] = None, callbacks: Optional[list] = None,
                 train_name: Optional[str] = None, storage_path: Optional[str] = None,
                 nan_metrics: Optional[dict[str, float]] = None, extra_tags: Optional[dict[str, str]] = None,
                 in_trial: bool = False, started_at: Optional[float] = None) -> dict[str, Any]:
    """Train one run; returns {'run_id', 'metrics', 'adapter_dir', 'result_dir', 'wall_s'}.

    Raises on failure (``FloatingPointError`` when the loss diverged). Inside a sweep trial,
    ``trial_id`` makes the MLflow child run unique per trial: a trial restarted after the
    driver died logs into its existing run instead of creating a second one. ``in_trial`` (the sweep's
    ``tune.train_in_trial``): one worker, run in this process (``pipeline.train.in_trial``), its checkpoints
    under the run's storage directory and its reports to Tune in place of ``callbacks``. ``started_at``
    (epoch seconds): when the caller started on this run, the start of its ``driver`` phase."""
    t_start = started_at or time.time()
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer


    out_dir = Path(cfg.output_dir).resolve()
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(tracking_uri)
    model_path = resolve_model(cfg.model)
    use_gpu = use_gpu_for(cfg.scaling.use_gpu)

    tracker = Tracker(tracking_uri)
    run_name = cfg.mlflow.run_name or cfg.adapter.label
    backend = torch_backend(cfg.scaling, use_gpu)
    params = {**cfg.model_dump(mode="json"), "resolved": {
        "model_path": model_path, "use_gpu": use_gpu, "backend": backend,
        "rlora" if cfg.adapter.uses_rlora else "peft" if cfg.adapter.uses_peft else "full":
            adapters.resolved(cfg.adapter, cfg.train.steps),
        "effective_batch_size": cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers}}
    # the process driving the run (in a sweep: the trial's actor, reused by later trials)
    tags = {"config_file": config_path or "", "ray.driver_pid": str(os.getpid()), **cfg.adapter.tags,
            **(extra_tags or {})}
    existing = tracker.find_trial_run(cfg.mlflow.experiment, trial_id, parent_run_id) if trial_id else None
    if existing:
        run_id = tracker.reopen(existing)
        tracker.set_tags({"ray.driver_pid": tags["ray.driver_pid"]})
    else:
        if trial_id:
            tags["rlora.trial_id"] = trial_id
        run_id = tracker.start_run(cfg.mlflow.experiment, run_name, params, tags=tags, parent_run_id=parent_run_id)
    model_id = adapter_model(tracker, run_name, cfg)
    if not quiet:
        print(f"MLflow run {run_id} ({tracking_uri})", flush=True)

    ensure_ray(quiet)
    name, storage = train_name or f"train-{run_id}", storage_path or cfg.storage or str(out_dir / "ray")
    t0 = time.time()  # the driver's stamps travel in every report, so a trial ASHA stops keeps its phases
    loop_config = {"run": cfg.model_dump(mode="json"), "model_path": model_path, "model_id": model_id,
                   "tracking_uri": tracking_uri, "run_id": run_id, "nan_metrics": nan_metrics or {},
                   "driver_stamps": {f"{timeline.PREFIX}start": t_start, f"{timeline.PREFIX}fit": t0}}
    trainer = None if in_trial else TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(cfg.scaling, use_gpu),
                                               placement_strategy=cfg.scaling.placement_strategy),
        torch_config=TorchConfig(backend=backend),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        if in_trial:
            result_metrics, checkpoint = _run_in_trial(cfg, loop_config, storage, name, callbacks)
        else:
            result = trainer.fit()
            result_metrics, checkpoint = result.metrics, result.checkpoint
    except BaseException as e:
        tracker.set_tags({"error": error_line(e)})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if not isinstance(e, KeyboardInterrupt):  # interrupted: --resume continues with this model
            tracker.client.finalize_logged_model(model_id, "FAILED")
        raise
    return _finish_run(cfg, tracker, run_id, model_id, run_name, t_start, t0, result_metrics or {}, checkpoint)


def _run_in_trial(cfg: RunConfig, loop_config: dict, storage: str, name: str, callbacks) -> tuple:
    import ray.train


    if cfg.scaling.num_workers != 1 or "://" in storage.removeprefix("file://"):
        raise ValueError("in_trial: one worker, and checkpoints on a local path")
    session = InProcess(Path(storage.removeprefix("file://")) / name, cfg.train.steps if callbacks else None)
    train_loop_per_worker(loop_config, session)
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
        import shutil

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
