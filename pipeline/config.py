"""One typed schema (pydantic) for every run YAML. Unknown keys and wrong types are errors;
``load_run_config`` turns any problem into one line naming the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import rlora
from pipeline.data import MIXTURES, TASKS
from pipeline.models import BUILTIN_MODELS, DEFAULT_MODEL


class ConfigError(ValueError):
    """A config that does not validate; the message is one line naming the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterSection(_Strict):
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

    def to_rlora(self) -> rlora.RLoraConfig:
        kw = self.model_dump(exclude={"preset"})
        fixed = rlora.PRESETS[self.preset]
        for key in fixed:  # the preset decides its structural fields
            kw.pop(key, None)
        return rlora.RLoraConfig.from_preset(self.preset, **kw)


class DataSection(_Strict):
    tasks: Union[str, list[str]] = "five_task"
    data_dir: Optional[str] = None
    train_per_task: int = Field(2000, ge=1, description="cap on training examples per task")
    eval_per_task: int = Field(100, ge=1, description="cap on held-out examples per task")
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
    dtype: Literal["float32", "bfloat16"] = "float32"


class ScalingSection(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)


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

    @model_validator(mode="after")
    def _lora_has_one_head(self):
        if self.adapter.preset == "lora" and self.adapter.num_heads != 1:
            self.adapter.num_heads = 1
        return self


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def format_validation_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = _loc(err) or "<root>"
    msg = err["msg"].replace("Value error, ", "")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {msg}{more}"


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
