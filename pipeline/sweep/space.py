"""The search space: a sweep's ParamSpecs as Tune distributions, and one trial's RunConfig."""

from __future__ import annotations

import json
from typing import Any

from pipeline.config.run import RunConfig
from pipeline.config.sweep import SweepConfig, set_path


# -------------------------------------------------------------------------------- search space
def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in cfg.search.items():
        k = spec.kind
        if k == "choice":
            space[key] = tune.grid_search(spec.choice) if cfg.tune.search_alg == "grid" else tune.choice(spec.choice)
        elif k == "grid":
            space[key] = tune.grid_search(spec.grid)
        elif k == "int":
            space[key] = tune.randint(spec.int_[0], spec.int_[1] + 1)  # inclusive upper bound
        elif k == "uniform":
            space[key] = tune.uniform(*spec.uniform)
        else:
            space[key] = tune.loguniform(*spec.loguniform)
    return space


def trial_run_config(base: dict, params: dict[str, Any], sweep: dict) -> RunConfig:
    data = json.loads(json.dumps(base))
    for key, value in params.items():
        set_path(data, key, value)
    cfg = RunConfig.model_validate(data)
    # every report must carry the objective for ASHA/Optuna: checkpoint only at eval steps
    cfg.train.checkpoint_every = cfg.train.eval_every
    cfg.mlflow.experiment = sweep["experiment"]
    cfg.mlflow.run_name = sweep["trial_name"]
    return cfg
