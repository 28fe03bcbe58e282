"""RLoraConfig: every knob of R-LoRA / HydraLoRA, validated, plus the paper's ablation presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

HEAD_INITS = ("random", "zero")
DROPOUT_MODES = ("per_head", "shared")
ROUTER_INITS = ("kaiming", "zero")
CORRECTIONS = ("mean", "routed", "none")
DOWN_PROJECTIONS = ("shared", "per_head")

# The paper's ablation arms (Table 4/5). Each preset fixes the method's structure; r, num_heads,
# alpha, gamma, dropout rate, targets, ... stay free and can be overridden.
# "lora_moe" is the paper's LoRA-MoE baseline (its Table 3): N independent LoRA experts (A_i, B_i)
# under the same per-token softmax router.
PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"num_heads": 1, "head_init": "zero", "dropout_mode": "shared", "correction": "none",
             "down_projection": "shared"},
    "hydralora": {"head_init": "zero", "dropout_mode": "shared", "correction": "none", "down_projection": "shared"},
    "hydralora+mt": {"head_init": "zero", "dropout_mode": "per_head", "correction": "none",
                     "down_projection": "shared"},
    "hydralora+init": {"head_init": "random", "dropout_mode": "shared", "down_projection": "shared"},
    "rlora": {"head_init": "random", "dropout_mode": "per_head", "down_projection": "shared"},
    "lora_moe": {"head_init": "zero", "dropout_mode": "per_head", "correction": "none", "down_projection": "per_head"},
}


def _fail(name: str, msg: str, value: Any) -> None:
    raise ValueError(f"RLoraConfig.{name}: {msg}, got {value!r}")


@dataclass
class RLoraConfig(PeftConfig):
    """Configuration of an R-LoRA adapter (arXiv 2502.15455).

    Output of an adapted linear layer ``W`` (d_out x d_in)::

        y = W x + s * sum_i w_i(x) B_i drop_i(A x) - s * C x

    with A (r x d_in) shared, B_i (d_out x r) per head, w = softmax(W_r x) per token and
    C the frozen initial-delta correction (see ``correction``). ``s = alpha / r``
    (``alpha / sqrt(r)`` with ``use_rslora``).

    Args:
        r: rank of the shared down-projection A.
        num_heads: number of heads N (B matrices). N=1 is plain LoRA: no router.
        alpha: scaling numerator.
        use_rslora: use s = alpha/sqrt(r) instead of alpha/r.
        gamma: init scale divisor: A ~ d_out^(1/4)/sqrt(gamma) N(0, 1/d_in),
            B_i ~ d_out^(1/4)/sqrt(gamma) N(0, 1/d_out) (paper Table 1, default 64).
        head_init: ``random`` (R-LoRA multi-head random init) or ``zero`` (LoRA/HydraLoRA:
            Kaiming-uniform A, zero B).
        head_dropout: dropout probability applied to A x (r-dim), never to the full input.
        dropout_mode: ``per_head`` (an independent mask per head, R-LoRA) or ``shared``.
        router_init: ``kaiming`` (paper, like nn.Linear) or ``zero`` (uniform router at init,
            so the mean correction cancels the initial delta exactly).
        correction: ``mean`` subtracts s (1/N) sum_i B_i0 A0 x (paper Eq. 4, exact only for a
            uniform router); ``routed`` subtracts s sum_i w_i(x) B_i0 A0 x (exact for any
            router); ``none`` keeps the initial delta. Only used with ``head_init='random'``.
        down_projection: ``shared`` (one A for all heads: R-LoRA, HydraLoRA) or ``per_head`` (an
            A_i per head, stacked as one (N*r, d_in) matrix so the down projection stays one GEMM:
            LoRA-MoE). Per-head A needs ``dropout_mode='per_head'`` (the heads' inputs differ).
        target_modules: names (or a regex string) of ``nn.Linear`` modules to adapt.
    """

    r: int = field(default=8, metadata={"help": "rank of the shared A"})
    num_heads: int = field(default=3, metadata={"help": "number of B heads (N)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator, s = alpha/r"})
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha/sqrt(r)"})
    gamma: float = field(default=64.0, metadata={"help": "init scale divisor (paper: 64)"})
    head_init: Literal["random", "zero"] = field(default="random")
    head_dropout: float = field(default=0.05)
    dropout_mode: Literal["per_head", "shared"] = field(default="per_head")
    router_init: Literal["kaiming", "zero"] = field(default="kaiming")
    correction: Literal["mean", "routed", "none"] = field(default="mean")
    down_projection: Literal["shared", "per_head"] = field(default="shared")
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES)
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    bias: str = field(default="none", metadata={"help": "only 'none' is supported"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RLORA
        self.validate()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("r", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, "must be an integer >= 1", v)
        for name in ("alpha", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, "must be a finite number > 0", v)
        p = self.head_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            _fail("head_dropout", "must be a number in [0, 1)", p)
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", "must be a bool", self.use_rslora)
        for name, allowed in (
            ("head_init", HEAD_INITS),
            ("dropout_mode", DROPOUT_MODES),
            ("router_init", ROUTER_INITS),
            ("correction", CORRECTIONS),
            ("down_projection", DOWN_PROJECTIONS),
        ):
            v = getattr(self, name)
            if v not in allowed:
                _fail(name, f"must be one of {list(allowed)}", v)
        if self.down_projection == "per_head" and self.num_heads > 1 and self.dropout_mode == "shared":
            _fail("dropout_mode", "must be 'per_head' with down_projection='per_head' (each head has its own A x)",
                  self.dropout_mode)
        if self.bias != "none":
            _fail("bias", "only 'none' is supported", self.bias)
        tm = self.target_modules
        if tm is None or (isinstance(tm, str) and not tm) or (
            not isinstance(tm, str) and (len(tm) == 0 or not all(isinstance(t, str) and t for t in tm))
        ):
            _fail("target_modules", "must be a non-empty list of module names or a regex string", tm)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs) -> "RLoraConfig":
        """PEFT's loader, plus a note of the adapter directory so load errors can name it."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = str(pretrained_model_name_or_path)
        config._source_dir = f"{path}/{subfolder}" if subfolder else path  # not a field: never saved
        return config

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def uses_correction(self) -> bool:
        """A correction term exists only when the heads start non-zero."""
        return self.head_init == "random" and self.correction != "none"

    # -- presets ----------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "RLoraConfig":
        """Build the config of one of the paper's ablation arms, e.g. ``from_preset("rlora", r=8)``."""
        if preset not in PRESETS:
            raise ValueError(f"RLoraConfig.preset: must be one of {list(PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"RLoraConfig.{key}: unknown field")
        fixed = PRESETS[preset]
        for key, value in overrides.items():
            if key in fixed and value != fixed[key]:
                _fail(key, f"is fixed to {fixed[key]!r} by the {preset!r} preset", value)
        return cls(**{**fixed, **overrides})
