"""The Tuner for a sweep: concurrency, storage, searcher, scheduler, checkpoint and failure settings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.config.loading import ConfigError
from pipeline.config.sweep import SweepConfig
from pipeline.runtime import use_gpu_for, worker_resources
from pipeline.sweep.space import param_space
from pipeline.sweep.trial import TrialContext, run_trial
from pipeline.sweep.tune_state import save_often


def expected_trials(cfg: SweepConfig) -> int:
    if cfg.tune.search_alg == "optuna":
        return cfg.tune.num_samples
    n = cfg.tune.num_samples
    for spec in cfg.search.values():
        n *= len(spec.grid if spec.kind == "grid" else spec.choice)
    return n


def _trial_dirname(trial) -> str:
    return trial.trial_id


# -------------------------------------------------------------------------------- driver
def concurrency(cfg: SweepConfig) -> int:
    """Trials that fit the cluster at once: for each resource a trial's workers take (CPUs, and GPU
    shares when training on GPUs), how many trials' worth the cluster has; the smallest count."""
    import ray

    if cfg.tune.max_concurrent_trials != "auto":
        return int(cfg.tune.max_concurrent_trials)
    sc = cfg.base.scaling
    have = ray.cluster_resources()  # trials hold no CPU themselves
    slots = []
    for res, per_worker in worker_resources(sc, use_gpu_for(sc.use_gpu)).items():
        need, avail = sc.num_workers * per_worker, have.get(res, 0)
        if need > avail + 1e-9:
            raise ConfigError(f"base.scaling: a trial needs {need:g} {res} but the cluster has {avail:g}")
        slots.append(int(avail / need + 1e-9))
    return max(1, min(slots))


def ray_storage(cfg: SweepConfig, sweep_dir: Path) -> str:
    """Where this sweep's Tune state and trial checkpoints live: the sweep directory, or with
    ``base.storage`` (a URI every node reaches) the same sweep's place there."""
    if cfg.base.storage:
        return f"{cfg.base.storage.rstrip('/')}/sweeps/{cfg.name}/{sweep_dir.name}"
    return str(sweep_dir)


def build_tuner(cfg: SweepConfig, sweep_dir: Path, parent_run_id: str, tracking_uri: str, resume: bool,
                callbacks: Optional[list] = None, retry_errored: bool = False):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.sweep.optuna_search import ResumableOptunaSearch  # lazy: loads optuna, ray

    where = ray_storage(cfg, sweep_dir)
    base = cfg.base.model_dump(mode="json")
    base["mlflow"]["tracking_uri"] = tracking_uri
    ctx = TrialContext(base=base, parent_run_id=parent_run_id, metric=cfg.tune.metric, mode=cfg.tune.mode,
                       experiment=cfg.base.mlflow.experiment, sweep_name=cfg.name, train_storage=f"{where}/train",
                       tune_storage=f"{where}/tune", seeds=cfg.tune.seeds, in_trial=cfg.tune.train_in_trial)
    # The trial process itself holds no CPU (Ray refuses an empty bundle, and any CPU share would
    # starve its own workers on a small cluster): only a token of the memory resource. Trained in
    # the trial's own process, the trial holds what its one worker would have.
    resources = {"CPU": 0, "memory": 2**20}
    if cfg.tune.train_in_trial:
        resources.update(worker_resources(cfg.base.scaling, use_gpu_for(cfg.base.scaling.use_gpu)))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)

    save_often(ctx.tune_storage)
    if resume:
        # an errored trial, with retry_errored, runs its trial function again: its Ray Train runs
        # resume from their own last checkpoints (the function reports no Tune checkpoint)
        return tune.Tuner.restore(ctx.tune_storage, trainable=trainable, resume_unfinished=True,
                                  resume_errored=retry_errored, restart_errored=False)
    search_alg = None
    if cfg.tune.search_alg == "optuna":
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
        search_alg = ResumableOptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed,
                                           sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
                                           study_name=cfg.name, storage=storage)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.base.train.steps, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=concurrency(cfg), trial_dirname_creator=_trial_dirname,
                                    reuse_actors=reuse_trial_actors(cfg)),
        run_config=tune.RunConfig(name="tune", storage_path=where,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks),
    )


def reuse_trial_actors(cfg: SweepConfig) -> bool:
    """``tune.reuse_actors``; by default a trial's actor (the process that drives its Ray Train run:
    imports, MLflow client) runs a later trial too, saving that trial's actor start-up, unless the
    scheduler is ASHA (refused by the schema): a trial ASHA stops is still inside
    ``trainer.fit()`` when Tune would reset its actor, and with Ray 2.60 a 1-slot ASHA sweep with
    reused actors stops starting trials after its second. Without early
    stopping every trial's function has returned before its actor is reused."""
    if cfg.tune.reuse_actors is not None:
        return cfg.tune.reuse_actors
    return cfg.tune.scheduler != "asha"
