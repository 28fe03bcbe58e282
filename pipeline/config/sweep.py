"""The schema of a sweep (sweeps/*.yaml): the base run, the search space, Tune and the eval stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config.loading import deep_merge, format_validation_error, validated
from pipeline.config.run import GpuShare, RunConfig, Strict
from pipeline.data.eval_names import local_names
from pipeline.model.adapters import PEFT_METHODS, configurable_fields


# ------------------------------------------------------------------------------------- sweeps
class ParamSpec(Strict):
    """One search dimension: exactly one of choice / grid / int / uniform / loguniform."""

    choice: Optional[list[Any]] = Field(None, min_length=1)
    grid: Optional[list[Any]] = Field(None, min_length=1)
    int_: Optional[tuple[int, int]] = Field(None, alias="int")
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("choice", "grid", "int_", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, grid, int, uniform, loguniform")
        lo_hi = getattr(self, kinds[0]) if kinds[0] in ("int_", "uniform", "loguniform") else None
        if lo_hi is not None:
            lo, hi = lo_hi
            if not lo < hi:
                raise ValueError(f"inverted or empty range [{lo}, {hi}]")
            if kinds[0] == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs a positive range, got [{lo}, {hi}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "int_", "uniform", "loguniform") if getattr(self, k) is not None).rstrip("_")

    def values_to_check(self) -> list[Any]:
        k = self.kind
        if k in ("choice", "grid"):
            return list(getattr(self, k))
        lo, hi = getattr(self, "int_" if k == "int" else k)
        return [lo, hi] if k == "int" else [lo, hi, lo + (hi - lo) * 0.3718]  # a non-integral sample too


class TuneSection(Strict):
    num_samples: int = Field(8, ge=1, description="Optuna trials (with search_alg: grid, repeats of the grid)")
    metric: str = "eval/mean_acc"
    mode: Literal["max", "min"] = "max"
    search_alg: Literal["optuna", "grid"] = "optuna"
    seed: int = 0
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(20, ge=1, description="ASHA: steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: Union[int, Literal["auto"]] = "auto"
    seeds: int = Field(1, ge=1, description="run every sampled configuration with this many train.seed values "
                                            "and rank by the mean over seeds (needs scheduler: none)")
    reuse_actors: Optional[bool] = Field(None, description="run later trials in earlier trials' Tune actors "
                                         "(saves their start-up); default: yes unless scheduler is asha")
    train_in_trial: bool = Field(False, description="train each trial in its own Tune process (pipeline.train.in_trial: no "
                                 "Ray Train controller or worker process to start; one worker, checkpoints "
                                 "on the trial's node; base.scaling.max_failures does not apply: a trial whose "
                                 "process died continues from its last checkpoint with --resume --retry-errored)")


class EvalSection(Strict):
    """The eval stage after a sweep: top-k trials plus the base model through lm-eval."""

    enabled: bool = True
    top_k: int = Field(2, ge=0, description="best trials (by tune.metric) to evaluate; 0: base model only")
    include_base: bool = True
    overlap: bool = Field(True, description="start scoring in the sweep's tail (once its last trial has started): the "
                                            "base model, and trials already sure to be in the top k, on slots "
                                            "finished trials leave idle")
    task_source: Literal["local", "stock"] = Field("local", description="stock: lm-eval's own tasks (needs the hub)")
    tasks: list[str] = Field(default_factory=lambda: ["bbh", "mmlu", "mmlu_continuation"], min_length=1)
    limit: Union[None, float, dict[str, float]] = Field(
        None, description="questions per subtask (or a fraction); one number, or per family, e.g. "
                          "{mmlu: 5, bbh_fewshot: 2} (a family left out: all); none: all")
    num_fewshot: Optional[int] = Field(None, ge=0)
    batch_size: int = Field(16, ge=1)
    gen_kwargs: Optional[str] = Field(None, description="lm-eval generation override, e.g. 'max_gen_toks=256'")
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: GpuShare = Field(1.0, description="on GPUs: each eval actor's share (0.5: two per GPU)")
    max_workers: Optional[int] = Field(None, ge=1, description="eval actors; default one per GPU share or CPU slot")
    registry_name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$",
                                         description="MLflow registered model; default rlora-<sweep name>")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str], info) -> list[str]:
        if info.data.get("task_source", "local") == "local":
            known = local_names()
            for t in v:
                if t not in known:
                    raise ValueError(f"unknown eval task {t!r}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _limits(self):
        limits = self.limit if isinstance(self.limit, dict) else {"": self.limit}
        for family, n in limits.items():
            if n is not None and n <= 0:
                raise ValueError(f"limit{'.' + family if family else ''}: must be > 0")
            if family and family not in self.tasks:
                raise ValueError(f"limit.{family}: not one of eval.tasks ({', '.join(self.tasks)})")
        return self

    def limit_for(self, family: str) -> Optional[float]:
        return self.limit.get(family) if isinstance(self.limit, dict) else self.limit


def _field_exists(path: str) -> bool:
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "adapter" and parts[1] in PEFT_METHODS:  # a field of PEFT's config class
        return parts[2] in configurable_fields(parts[1])
    model: Any = RunConfig
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


def set_path(data: dict, path: str, value: Any) -> dict:
    """``data`` with ``path`` set to ``value``; a mapping value is merged into the section already
    there (a search dimension ``adapter: {grid: [{method: lora, lora: {r: 24}}, ...]}`` changes
    those fields of the base adapter and keeps the rest)."""
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    last = parts[-1]
    node[last] = deep_merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) else value
    return data


class SweepConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][\w.-]*$")
    base: RunConfig = Field(default_factory=RunConfig)
    search: dict[str, ParamSpec] = Field(..., min_length=1)
    tune: TuneSection = Field(default_factory=TuneSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _search_matches_run_config(self):
        if self.tune.seeds > 1 and self.tune.scheduler == "asha":
            raise ValueError("tune.seeds: ASHA would stop trials on one seed's intermediate score; "
                             "use tune.scheduler: none with seeds > 1")
        if self.tune.reuse_actors and self.tune.scheduler == "asha":
            raise ValueError("tune.reuse_actors: not with scheduler asha (a stopped trial is still training when "
                             "Tune would hand its actor to the next trial); use tune.scheduler: none to reuse actors")
        if self.tune.train_in_trial and (self.base.scaling.num_workers != 1 or self.base.storage):
            raise ValueError("tune.train_in_trial: needs base.scaling.num_workers 1 and no base.storage (the trial "
                             "keeps its checkpoints on its own node)")
        if self.tune.seeds > 1 and "train.seed" in self.search:
            raise ValueError("tune.seeds: train.seed is also a search dimension; use one or the other")
        if self.base.data.confirm_per_task is None:  # a sweep confirms its claims unless told not to
            self.base.data.confirm_per_task = self.base.data.eval_per_task
        for key, spec in self.search.items():
            if not _field_exists(key):
                raise ValueError(f"search.{key}: not a run config field")
            for v in spec.values_to_check():  # every value must make a valid run config
                try:
                    RunConfig.model_validate(set_path(self.base.model_dump(mode="json"), key, v))
                except ValidationError as e:
                    raise ValueError(f"search.{key}: value {v!r} is invalid ({format_validation_error(e)})") from None
            if spec.kind == "grid" and self.tune.search_alg != "grid":
                raise ValueError(f"search.{key}: 'grid' needs tune.search_alg: grid")
            if spec.kind != "grid" and self.tune.search_alg == "grid" and spec.kind != "choice":
                raise ValueError(f"search.{key}: tune.search_alg grid takes only grid/choice dimensions")
            if self.tune.search_alg != "grid" and any(isinstance(v, dict) for v in spec.values_to_check()):
                raise ValueError(f"search.{key}: values that are sections (mappings) need tune.search_alg: grid")
        return self


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    return validated(SweepConfig, path, overrides)
