"""One typed schema (pydantic) for every run YAML. Unknown keys and wrong types are errors;
``load_run_config`` turns any problem into one line naming the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import rlora
from pipeline.data import MIXTURES, TASKS
from pipeline.models import BUILTIN_MODELS, DEFAULT_MODEL


class ConfigError(ValueError):
    """A config that does not validate; the message is one line naming the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterSection(_Strict):
    method: Literal["rlora", "lora_moe", "lora", "dora", "adalora", "ia3", "prompt_tuning", "p_tuning",
                    "prefix_tuning", "full"] = Field(
        "rlora", description="rlora: the fields below (presets); lora_moe: the same fields, N independent LoRA "
        "experts (A_i, B_i) under the router; full: every weight of the base trains (no adapter); otherwise "
        "PEFT's method, configured by its own section")
    preset: Literal["lora", "hydralora", "hydralora+mt", "hydralora+init", "rlora"] = "rlora"
    r: int = Field(8, ge=1)
    num_heads: int = Field(3, ge=1)
    alpha: float = Field(16.0, gt=0)
    use_rslora: bool = False
    gamma: float = Field(64.0, gt=0)
    head_dropout: float = Field(0.05, ge=0, lt=1)
    router_init: Literal["kaiming", "zero"] = "kaiming"
    correction: Literal["mean", "routed", "none"] = "mean"
    target_modules: list[str] = Field(default_factory=lambda: list(rlora.DEFAULT_TARGET_MODULES), min_length=1)

    # PEFT's methods: each section holds fields of that method's PEFT config class (only the chosen
    # method's section is used; every given one is validated); target_modules above is their default
    lora: dict[str, Any] = Field(default_factory=dict, description="peft.LoraConfig fields")
    dora: dict[str, Any] = Field(default_factory=dict, description="peft.LoraConfig fields (use_dora is set)")
    adalora: dict[str, Any] = Field(default_factory=dict, description="peft.AdaLoraConfig fields (total_step: train.steps)")
    ia3: dict[str, Any] = Field(default_factory=dict, description="peft.IA3Config fields")
    prompt_tuning: dict[str, Any] = Field(default_factory=dict, description="peft.PromptTuningConfig fields "
                                          "(num_virtual_tokens: 20 unless set)")
    p_tuning: dict[str, Any] = Field(default_factory=dict, description="peft.PromptEncoderConfig fields "
                                     "(num_virtual_tokens: 20, encoder_hidden_size: 128 unless set)")
    prefix_tuning: dict[str, Any] = Field(default_factory=dict, description="peft.PrefixTuningConfig fields "
                                          "(num_virtual_tokens: 20 unless set)")

    @field_validator("lora", "dora", "adalora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
    @classmethod
    def _peft_fields(cls, v, info):
        from pipeline.adapters import peft_config

        if v:
            # names and types (the step schedule against train.steps: RunConfig)
            peft_config(info.field_name, v, None, total_step=10**9)
        return v

    def to_peft(self, total_steps: Optional[int] = None):
        from pipeline.adapters import peft_config

        return peft_config(self.method, getattr(self, self.method), self.target_modules, total_steps)

    @property
    def uses_rlora(self) -> bool:
        """Built by this project's tuner (``rlora/``) from the fields above, not by a PEFT config class."""
        from pipeline.adapters import RLORA_METHODS

        return self.method in RLORA_METHODS

    @property
    def uses_peft(self) -> bool:
        """Built by one of PEFT's config classes from the method's own section."""
        from pipeline.adapters import PEFT_METHODS

        return self.method in PEFT_METHODS

    @property
    def tuner_preset(self) -> str:
        """The ``rlora`` preset the adapter is built from (``lora_moe`` for that method)."""
        return "lora_moe" if self.method == "lora_moe" else self.preset

    @property
    def tags(self) -> dict[str, str]:
        """The run tags naming the adapter: its method, label and (this project's tuner) preset."""
        return {"rlora.method": self.method, "rlora.adapter": self.label,
                **({"rlora.preset": self.tuner_preset} if self.uses_rlora else {})}

    @property
    def label(self) -> str:
        """Short name of the adapter (run names, tags)."""
        if self.uses_rlora:
            return f"{self.tuner_preset}-N{self.num_heads}-r{self.r}"
        from pipeline.adapters import PEFT_DEFAULTS

        fields = {**PEFT_DEFAULTS.get(self.method, {}), **getattr(self, self.method, {})}
        r = fields.get("r", fields.get("init_r"))
        v = fields.get("num_virtual_tokens")
        return f"{self.method}" + (f"-r{r}" if r is not None else "") + (f"-v{v}" if v is not None else "")

    def to_rlora(self) -> rlora.RLoraConfig:
        from pipeline.adapters import PEFT_METHODS

        if not self.uses_rlora:
            raise ValueError(f"adapter.method is {self.method}, not rlora")
        kw = self.model_dump(exclude={"preset", "method", *PEFT_METHODS})
        fixed = rlora.PRESETS[self.tuner_preset]
        for key in fixed:  # the preset decides its structural fields
            kw.pop(key, None)
        return rlora.RLoraConfig.from_preset(self.tuner_preset, **kw)


class DataSection(_Strict):
    tasks: Union[str, list[str]] = "five_task"
    data_dir: Optional[str] = None
    train_per_task: int = Field(2000, ge=1, description="cap on training examples per task")
    eval_per_task: int = Field(100, ge=1, description="cap on held-out examples per task")
    confirm_per_task: Optional[int] = Field(
        None, ge=0, description="confirmation examples per task, disjoint from the held-out ones and from training, "
                                "scored once at the end of training (confirm/<metric>); a sweep's claims come from "
                                "them. null: off for a training run, eval_per_task in a sweep; 0: off")
    max_length: int = Field(256, ge=16)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        names = [v] if isinstance(v, str) else v
        if isinstance(v, str) and v in MIXTURES:
            return v
        if not names:
            raise ValueError("must name a mixture or at least one task")
        for n in names:
            if n not in TASKS:
                raise ValueError(f"unknown task {n!r} (tasks: {', '.join(TASKS)}; mixtures: {', '.join(MIXTURES)})")
        return v


class TrainSection(_Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1, description="per worker")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_at_start: bool = True  # step-0 held-out eval: the base model's scores in the same run
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16-mixed", "bf16"] = Field(
        "fp32", description="fp32; bf16-mixed: fp32 weights, forward under bf16 autocast (CPU or CUDA), router "
                            "softmax and adapter master weights fp32; bf16: a bf16 base with fp32 adapters")
    grad_accum: int = Field(1, ge=1, description="micro-batches of batch_size per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute the base model's activations in backward")

    @model_validator(mode="before")
    @classmethod
    def _dtype_is_precision(cls, data):
        """``dtype`` (earlier configs and sweeps): float32 is precision fp32, bfloat16 is bf16."""
        if isinstance(data, dict) and "dtype" in data:
            data = dict(data)
            dtype = data.pop("dtype")
            if "precision" in data:
                raise ValueError("give train.precision only (train.dtype is its old name)")
            if dtype not in ("float32", "bfloat16"):
                raise ValueError(f"dtype: {dtype!r} is not float32 or bfloat16 (better: train.precision)")
            data["precision"] = "bf16" if dtype == "bfloat16" else "fp32"
        return data


def _check_gpu_share(v: float) -> float:
    if v > 1 and v != int(v):
        raise ValueError(f"{v}: a share above one GPU must be a whole number (Ray allocates fractions of one GPU only)")
    return v


GpuShare = Annotated[float, Field(gt=0), AfterValidator(_check_gpu_share)]


class ScalingSection(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: GpuShare = Field(1.0, description="with use_gpu: GPUs per Train worker; 0.25 packs four "
                                                          "trials' workers on one GPU")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: nccl when training on GPUs with a CUDA build of torch")
    max_failures: int = Field(2, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers; STRICT_SPREAD puts each on its own node")


class MlflowSection(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "rlora"
    run_name: Optional[str] = None


class RunConfig(_Strict):
    model: str = DEFAULT_MODEL
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    output_dir: str = "outputs"
    storage: Optional[str] = Field(
        None, description="where Ray keeps checkpoints and Tune state: a path or a URI of a pyarrow filesystem "
                          "(file://, s3://, gs://, ...) that every node reaches; default: under output_dir")

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v):
        import re

        if v is not None and ":/" in v and not re.match(r"^[a-z][a-z0-9+.-]*://[^/]*/?", v):
            raise ValueError(f"{v!r}: not a URI (scheme://...) or a path")
        return v

    @model_validator(mode="after")
    def _lora_has_one_head(self):
        if self.adapter.tuner_preset == "lora" and self.adapter.num_heads != 1:
            self.adapter.num_heads = 1
        return self

    @model_validator(mode="after")
    def _peft_method_builds(self):
        if self.adapter.uses_peft:  # e.g. AdaLoRA's tinit/tfinal against train.steps
            try:
                self.adapter.to_peft(self.train.steps)
            except ValueError as e:
                raise ValueError(f"adapter.{self.adapter.method}: {e}") from None
        return self


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def format_validation_error(e: ValidationError) -> str:
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # a typo explains the rest
    err = errors[0]
    where = _loc(err)
    msg = err["msg"].replace("Value error, ", "")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


__all__ = [
    "AdapterSection", "BUILTIN_MODELS", "ConfigError", "DataSection", "MlflowSection", "RunConfig",
    "ScalingSection", "TrainSection", "load_run_config", "load_yaml", "parse_overrides",
]


# ------------------------------------------------------------------------------------- sweeps
class ParamSpec(_Strict):
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


class TuneSection(_Strict):
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
    train_in_trial: bool = Field(False, description="train each trial in its own Tune process (pipeline.in_trial: no "
                                 "Ray Train controller or worker process to start; one worker, checkpoints "
                                 "on the trial's node; base.scaling.max_failures does not apply: a trial whose "
                                 "process died continues from its last checkpoint with --resume --retry-errored)")


class EvalSection(_Strict):
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
        from pipeline.eval_names import local_names

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
    from pipeline.adapters import PEFT_METHODS, configurable_fields

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


class SweepConfig(_Strict):
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
    data = deep_merge(load_yaml(path), parse_overrides(overrides or []))
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
