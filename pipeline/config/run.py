"""The schema of one training run (configs/*.yaml and a sweep's base): adapter, data, train, scaling, mlflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

import rlora
from pipeline.config.loading import validated
from pipeline.data import MIXTURES, TASKS
from pipeline.model.adapters import PEFT_DEFAULTS, PEFT_METHODS, RLORA_METHODS, peft_config
from pipeline.model.base import DEFAULT_MODEL


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterSection(Strict):
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
        if v:
            # names and types (the step schedule against train.steps: RunConfig)
            peft_config(info.field_name, v, None, total_step=10**9)
        return v

    def to_peft(self, total_steps: Optional[int] = None):
        return peft_config(self.method, getattr(self, self.method), self.target_modules, total_steps)

    @property
    def uses_rlora(self) -> bool:
        """Built by this project's tuner (``rlora/``) from the fields above, not by a PEFT config class."""
        return self.method in RLORA_METHODS

    @property
    def uses_peft(self) -> bool:
        """Built by one of PEFT's config classes from the method's own section."""
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

        fields = {**PEFT_DEFAULTS.get(self.method, {}), **getattr(self, self.method, {})}
        r = fields.get("r", fields.get("init_r"))
        v = fields.get("num_virtual_tokens")
        return f"{self.method}" + (f"-r{r}" if r is not None else "") + (f"-v{v}" if v is not None else "")

    def to_rlora(self) -> rlora.RLoraConfig:
        if not self.uses_rlora:
            raise ValueError(f"adapter.method is {self.method}, not rlora")
        kw = self.model_dump(exclude={"preset", "method", *PEFT_METHODS})
        fixed = rlora.PRESETS[self.tuner_preset]
        for key in fixed:  # the preset decides its structural fields
            kw.pop(key, None)
        return rlora.RLoraConfig.from_preset(self.tuner_preset, **kw)


class DataSection(Strict):
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


class TrainSection(Strict):
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


class ScalingSection(Strict):
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


class MlflowSection(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "rlora"
    run_name: Optional[str] = None


class RunConfig(Strict):
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


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return validated(RunConfig, path, overrides)
