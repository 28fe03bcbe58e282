"""RLoraLinear: all heads of a multi-head LoRA in one fused GEMM.

Shapes (per adapter): A (r, d_in) shared, B (d_out, N*r) = [B_1 | ... | B_N] stacked
column-wise, router W_r (N, d_in), and the frozen correction factors A0 (r, d_in) and
B0 (d_out, r) for ``correction='mean'`` (B0 = mean_i B_i at init) or (d_out, N*r) for
``'routed'``. With ``down_projection='per_head'`` (LoRA-MoE) A is [A_1; ...; A_N] (N*r, d_in),
still one GEMM, and both corrections keep the init copies A0 = A, B0 = B (mean: the 1/N applied in
the forward). Adapter weights are kept in fp32 whatever the base dtype.

Forward for one adapter, with u the concatenated gated, dropped r-vectors::

    z  = x @ [A; W_r; A0]^T                      one down-projection GEMM
    w  = s * softmax(z_router)                    router in fp32 (also under autocast), scaling folded in
    u  = [w_1 drop_1(Ax), ..., w_N drop_N(Ax), -correction coefficients * A0x]
    dy = u @ [B | B0]^T                           one up-projection GEMM over N*r (+ r or N*r)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .config import RLoraConfig


@dataclass(frozen=True)
class HeadSettings:
    r: int
    num_heads: int
    scaling: float
    dropout: float
    per_head_dropout: bool
    correction: str  # "mean" | "routed" | "none" (effective: "none" when heads start at zero)


def init_std(d_in: int, d_out: int, gamma: float) -> tuple[float, float]:
    """Paper Table 1: std of A and of each B_i for multi-head random init."""
    c = d_out**0.25 / math.sqrt(gamma)
    return c / math.sqrt(d_in), c / math.sqrt(d_out)


def fused_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router: Optional[torch.Tensor],
    A0: Optional[torch.Tensor],
    B0: Optional[torch.Tensor],
    settings: HeadSettings,
    training: bool,
) -> torch.Tensor:
    """s * sum_i w_i B_i drop_i(A x) - correction, computed in the dtype of A (fp32)."""
    r, n, s = settings.r, settings.num_heads, settings.scaling
    xf = x.to(A.dtype)
    down = [A]
    if router is not None:
        down.append(router)
    if A0 is not None:
        down.append(A0)
    z = F.linear(xf, torch.cat(down, 0) if len(down) > 1 else A)
    rd = A.shape[0]  # r, or N*r with an A per head
    h = z[..., :rd]
    p = settings.dropout if training else 0.0

    if router is None:  # a single head: plain LoRA path
        g = (F.dropout(h, p, True) if p > 0 else h) * s
        w = None
    else:
        zr = z[..., rd : rd + n]  # router logits; bf16 under autocast: the softmax runs in fp32 (fp64 stays fp64)
        w = torch.softmax(zr.to(torch.promote_types(zr.dtype, torch.float32)), dim=-1) * s  # (..., N)
        if rd != r:  # per-head A: the heads' inputs are already distinct, one dropout call masks each
            g = (F.dropout(h, p, True) if p > 0 else h).unflatten(-1, (n, r)) * w.unsqueeze(-1)
        elif p > 0 and settings.per_head_dropout:
            hh = h.unsqueeze(-2).expand(*h.shape[:-1], n, r)
            g = F.dropout(hh, p, True) * w.unsqueeze(-1)  # independent mask per head
        else:
            hd = F.dropout(h, p, True) if p > 0 else h
            g = hd.unsqueeze(-2) * w.unsqueeze(-1)
        g = g.flatten(-2)  # (..., N*r), head-major like B's columns

    if A0 is None:
        return F.linear(g, B)
    h0 = z[..., -A0.shape[0]:]
    if settings.correction == "routed" and w is not None:
        h0 = h0.unflatten(-1, (n, r)) if A0.shape[0] != r else h0.unsqueeze(-2)
        c = (h0 * w.unsqueeze(-1)).flatten(-2)
    elif A0.shape[0] != r:  # mean over experts: (1/N) sum_i B0_i A0_i x
        c = h0 * (s / n)
    else:
        c = h0 * s
    return F.linear(torch.cat([g, c.neg()], -1), torch.cat([B, B0], 1))


ADAPTER_CONTAINERS = ("rlora_A", "rlora_B", "rlora_router", "rlora_A0", "rlora_B0")


class RLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("rlora_A", "rlora_B", "rlora_router")
    other_param_names = ("rlora_A0", "rlora_B0", "rlora_settings")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.rlora_A = nn.ParameterDict({})
        self.rlora_B = nn.ParameterDict({})
        self.rlora_router = nn.ParameterDict({})
        self.rlora_A0 = BufferDict({}, persistent=True)
        self.rlora_B0 = BufferDict({}, persistent=True)
        self.rlora_settings: dict[str, HeadSettings] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"R-LoRA adapts torch.nn.Linear only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    @torch.no_grad()
    def update_layer(self, adapter_name: str, config: RLoraConfig) -> None:
        d_in, d_out, r, n = self.in_features, self.out_features, config.r, config.num_heads
        device = self.get_base_layer().weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        f32 = dict(dtype=torch.float32, device=device)
        per_head_down = config.down_projection == "per_head" and n > 1
        A = torch.empty(n * r if per_head_down else r, d_in, **f32)
        B = torch.empty(d_out, n * r, **f32)
        if config.head_init == "random":
            std_a, std_b = init_std(d_in, d_out, config.gamma)
            A.normal_(0.0, std_a)
            B.normal_(0.0, std_b)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B.zero_()
        self.rlora_A[adapter_name] = nn.Parameter(A)
        self.rlora_B[adapter_name] = nn.Parameter(B)
        if n > 1:
            W_r = torch.zeros(n, d_in, **f32)
            if config.router_init == "kaiming":
                nn.init.kaiming_uniform_(W_r, a=math.sqrt(5))  # what nn.Linear does
            self.rlora_router[adapter_name] = nn.Parameter(W_r)

        correction = config.correction if config.uses_correction else "none"
        if correction == "routed" and n == 1:
            correction = "mean"  # identical for one head
        if correction != "none":
            self.rlora_A0[adapter_name] = A.clone()
            if correction == "mean" and not per_head_down:  # rank-r factor of C = (1/N) sum_i B_i A, in fp64 then fp32
                self.rlora_B0[adapter_name] = B.double().view(d_out, n, r).mean(1).float()
            else:
                self.rlora_B0[adapter_name] = B.clone()
        self.rlora_settings[adapter_name] = HeadSettings(
            r=r,
            num_heads=n,
            scaling=config.scaling,
            dropout=float(config.head_dropout),
            per_head_dropout=config.dropout_mode == "per_head",
            correction=correction,
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapter_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return fused_delta(
            x,
            self.rlora_A[adapter_name],
            self.rlora_B[adapter_name],
            self.rlora_router[adapter_name] if adapter_name in self.rlora_router else None,
            self.rlora_A0[adapter_name] if adapter_name in self.rlora_A0 else None,
            self.rlora_B0[adapter_name] if adapter_name in self.rlora_B0 else None,
            self.rlora_settings[adapter_name],
            self.training,
        )

    def head_weights(self, adapter_name: str = "default") -> torch.Tensor:
        """The heads as an (N, d_out, r) view of the stacked B."""
        st = self.rlora_settings[adapter_name]
        B = self.rlora_B[adapter_name]
        return B.view(B.shape[0], st.num_heads, st.r).permute(1, 0, 2)


class RLoraLinear(nn.Module, RLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLoraConfig, **kwargs: Any) -> None:
        super().__init__()
        RLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.rlora_A:
                result = result + self.adapter_delta(x, name).to(result.dtype)
        return result

    # -- merging: only a single-head adapter is a fixed matrix; a routed mixture depends on x --
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        st = self.rlora_settings[adapter_name]
        if st.num_heads != 1:
            raise ValueError(
                "R-LoRA with num_heads > 1 cannot be merged into the base weight: the router makes "
                "the update input-dependent"
            )
        delta = st.scaling * (self.rlora_B[adapter_name] @ self.rlora_A[adapter_name])
        if adapter_name in self.rlora_A0:
            delta = delta - st.scaling * (self.rlora_B0[adapter_name] @ self.rlora_A0[adapter_name])
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.rlora_A:
                continue
            merged = base.weight.data.float() + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
            base.weight.data = merged.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.rlora_A:
                base.weight.data = (base.weight.data.float() - self.get_delta_weight(name)).to(base.weight.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()``... reach the base layer as usual; the adapter's tensors
        follow device moves but never drop below fp32 (a cast to bf16/fp16 asked of the whole model
        is ignored for them; ``.double()`` still applies), so ``PeftModel.to(torch.bfloat16)`` gives
        a bf16 base with fp32 adapters."""
        def keep_dtype(t):
            new = fn(t)
            if new.dtype != t.dtype and new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
                return t.to(device=new.device)
            return new

        for name, child in self.named_children():
            child._apply(keep_dtype if name in ADAPTER_CONTAINERS else fn, recurse)
        return self

    def __repr__(self) -> str:
        return "rlora." + super().__repr__()
