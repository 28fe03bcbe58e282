"""Forward+backward time and activation memory of one adapted linear layer.

Compares, on a square d x d frozen projection:
  fused   - rlora.RLoraLinear, paper defaults (per-head dropout 0.05, Kaiming router, mean
            correction): one down GEMM [A; W_r; A0], one up GEMM [B | B0]
  loop    - the official code's structure: a Python loop over heads, each head dropping out
            the full input and recomputing A, y += w_i * s * B_i(A(drop_i(x)))
  loop_ax - a stricter loop: A x computed once, loop over heads only,
            y += w_i * s * B_i(drop_i(A x)) (isolates the value of the single up GEMM)
  peft_r  - PEFT LoRA of rank r (dropout 0.05 on the full input)
  peft_Nr - PEFT LoRA of rank N*r (same parameter count in B as R-LoRA)
  base    - the frozen projection alone (its own fwd + input-grad bwd)

"overhead" = layer time - base time (what the adapter adds), floored at NOISE_FLOOR x base
time: when the fused overhead is below that floor (within timing noise of the base GEMM)
the row is flagged and the loop/fused overhead ratio is a lower bound. Run:
  python -m benchmarks.layer            # the full grid
  python -m benchmarks.layer --quick    # d in {576, 1536}, 2048 tokens
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import device_label, peak_cuda_bytes, print_table, saved_activation_bytes, time_ms, write_json
from rlora import RLoraConfig, RLoraLinear

DROPOUT = 0.05
NOISE_FLOOR = 0.02


class LoopLayer(nn.Module):
    """Per-head Python loop, as in the official HydraLoRA / R-LoRA code."""

    def __init__(self, base: nn.Linear, r: int, n: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(n))
        self.router = nn.Linear(base.in_features, n, bias=False) if n > 1 else None
        self.drop = nn.ModuleList(nn.Dropout(DROPOUT) for _ in range(n))
        self.scaling = alpha / r
        for b in self.lora_B:
            nn.init.normal_(b.weight, std=0.02)

    def forward(self, x):
        y = self.base(x)
        w = torch.softmax(self.router(x), -1) if self.router is not None else None
        for i, b in enumerate(self.lora_B):
            head = b(self.lora_A(self.drop[i](x))) * self.scaling
            y = y + (head * w[..., i : i + 1] if w is not None else head)
        return y


class LoopAxLayer(LoopLayer):
    """Loop over heads on a shared A x (r-dim dropout per head)."""

    def forward(self, x):
        y = self.base(x)
        w = torch.softmax(self.router(x), -1) if self.router is not None else None
        h = self.lora_A(x)
        for i, b in enumerate(self.lora_B):
            head = b(self.drop[i](h)) * self.scaling
            y = y + (head * w[..., i : i + 1] if w is not None else head)
        return y


class _Wrap(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def peft_lora(base: nn.Linear, rank: int, alpha_per_rank: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha_per_rank * rank, lora_dropout=DROPOUT, target_modules=["proj"])
    model = get_peft_model(_Wrap(base), cfg)
    for m in model.modules():  # non-zero B so the backward is the real one
        if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.ModuleDict):
            nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    return model


def build(kind: str, d: int, n: int, r: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).to(device, dtype).requires_grad_(False)
    if kind == "base":
        return base
    if kind == "fused":
        return RLoraLinear(base, "default", RLoraConfig(r=r, num_heads=n, alpha=2 * r, head_dropout=DROPOUT)).to(device)
    # the loops run wholly in the base dtype (their best case); fused and PEFT keep fp32 adapters
    if kind == "loop":
        return LoopLayer(base, r, n, alpha=2 * r).to(device, dtype)
    if kind == "loop_ax":
        return LoopAxLayer(base, r, n, alpha=2 * r).to(device, dtype)
    if kind == "peft_r":
        return peft_lora(base, r, 2.0).to(device)
    if kind == "peft_Nr":
        return peft_lora(base, n * r, 2.0).to(device)
    raise ValueError(kind)


def measure(module: nn.Module, tokens: int, d: int, device, dtype, repeats: int) -> tuple[float, int]:
    module.train()
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, d, device=device, dtype=dtype)

    def step():
        y = module(x)
        y.backward(gy)

    ms = time_ms(step, device, repeats)
    if device.type == "cuda":
        mem = peak_cuda_bytes(step, device)
    else:
        mem = saved_activation_bytes(lambda: module(x))
    for p in list(module.parameters()) + [x]:
        p.grad = None
    return ms, mem


def run(grid, device, dtype, repeats_fn):
    rows = []
    for d in grid["d"]:
        for tokens in grid["tokens"]:
            reps = repeats_fn(d, tokens)
            base_ms, base_mem = measure(build("base", d, 1, 1, device, dtype), tokens, d, device, dtype, reps)
            for n in grid["N"]:
                for r in grid["r"]:
                    row = {"d": d, "tokens": tokens, "N": n, "r": r, "base_ms": base_ms}
                    for kind in ("fused", "loop", "loop_ax", "peft_r", "peft_Nr"):
                        ms, mem = measure(build(kind, d, n, r, device, dtype), tokens, d, device, dtype, reps)
                        row[f"{kind}_ms"] = ms
                        row[f"{kind}_mem_mb"] = mem / 2**20
                    derive(row)
                    rows.append(row)
                    print(
                        f"d={d:5d} T={tokens:5d} N={n} r={r}: fused {row['fused_ms']:8.2f} ms  loop {row['loop_ms']:8.2f}"
                        f"  loop_ax {row['loop_ax_ms']:8.2f}  peft_r {row['peft_r_ms']:8.2f}  peft_Nr {row['peft_Nr_ms']:8.2f}  base {base_ms:8.2f}",
                        flush=True,
                    )
    return rows


def flop_floor(d: int, n: int, r: int) -> float:
    """Fused layer / frozen base forward+backward time if the adapter ran at the base GEMM's FLOP
    rate and its element-wise work were free. Per token, multiply-adds: base d*d forward + d*d for
    the input gradient. Adapter (paper defaults, mean correction): forward down [A; W_r; A0]
    (2r+N)*d and up [B | B0] d*(N+1)*r; backward the input gradients of both GEMMs again, plus the
    weight gradients of A and W_r ((r+N)*d) and of B (d*N*r); A0 and B0 are frozen."""
    down, up = (2 * r + n) * d, d * (n + 1) * r
    adapter = (down + up) + (down + up) + (r + n) * d + d * n * r
    return 1.0 + adapter / (2 * d * d)


def derive(row: dict) -> dict:
    """Overheads and ratios of one row from its raw timings."""
    base = row["base_ms"]
    row["fused_vs_base"] = row["fused_ms"] / base
    row["floor_vs_base"] = flop_floor(row["d"], row["N"], row["r"])
    for kind in ("fused", "loop", "loop_ax", "peft_r", "peft_Nr"):
        row[f"{kind}_overhead_ms"] = max(row[f"{kind}_ms"] - base, NOISE_FLOOR * base)
    row["fused_overhead_resolved"] = row["fused_ms"] - base > NOISE_FLOOR * base
    row["fused_vs_peft_Nr"] = row["fused_ms"] / row["peft_Nr_ms"]
    row["fused_vs_peft_r"] = row["fused_ms"] / row["peft_r_ms"]
    row["loop_over_fused_overhead"] = row["loop_overhead_ms"] / row["fused_overhead_ms"]
    row["loop_ax_over_fused_overhead"] = row["loop_ax_overhead_ms"] / row["fused_overhead_ms"]
    row["fused_over_peft_Nr_overhead"] = row["fused_overhead_ms"] / row["peft_Nr_overhead_ms"]
    row["fused_mem_vs_peft_Nr"] = row["fused_mem_mb"] / row["peft_Nr_mem_mb"]
    return row


def summarize(rows):
    def gm(vals):
        vals = list(vals)
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    n5 = [r for r in rows if r["N"] == 5]
    return {
        "fused_vs_peft_Nr_whole_layer": {"max": max(r["fused_vs_peft_Nr"] for r in rows),
                                         "geomean": gm(r["fused_vs_peft_Nr"] for r in rows)},
        "loop_over_fused_overhead_N5": {"min": min(r["loop_over_fused_overhead"] for r in n5),
                                        "geomean": gm(r["loop_over_fused_overhead"] for r in n5)} if n5 else None,
        "loop_ax_over_fused_overhead_N5": {"min": min(r["loop_ax_over_fused_overhead"] for r in n5),
                                           "geomean": gm(r["loop_ax_over_fused_overhead"] for r in n5)} if n5 else None,
        "fused_mem_vs_peft_Nr": {"max": max(r["fused_mem_vs_peft_Nr"] for r in rows)},
        # the fused layer's target: fused / frozen base <= 1.10 on every row with d >= 1536 and N <= 5
        "fused_vs_base_d1536plus_N5orless": {
            "max": max((r["fused_vs_base"] for r in rows if r["d"] >= 1536 and r["N"] <= 5), default=None),
            "floor_max": max((r["floor_vs_base"] for r in rows if r["d"] >= 1536 and r["N"] <= 5), default=None)},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d in {576,1536}, 2048 tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="base dtype (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/layer-<device>.json)")
    ap.add_argument("--from-json", type=Path, default=None, help="re-derive ratios and re-print a saved run")
    args = ap.parse_args(argv)
    if args.from_json:
        import json

        saved = json.loads(args.from_json.read_text())
        rows = [derive(r) for r in saved["rows"]]
        dev = torch.device("cuda" if "cuda" in saved.get("memory_metric", "") else "cpu")
        report(rows, dev, getattr(torch, saved["dtype"].split(".")[-1]), saved["grid"], args.out or args.from_json,
               label=saved.get("device"))
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    grid = {"N": [1, 3, 5, 8], "r": [4, 8], "d": [576, 1536, 4096], "tokens": [2048, 8192]}
    if args.quick:
        grid.update(d=[576, 1536], tokens=[2048])

    def repeats(d, tokens):
        if device.type == "cuda":
            return 20
        return 3 if d * d * tokens >= 1536 * 1536 * 8192 else 7

    rows = run(grid, device, dtype, repeats)
    report(rows, device, dtype, grid, args.out or Path(__file__).parent / "results"
           / f"layer-{device.type}{'-quick' if args.quick else ''}.json")


def report(rows, device, dtype, grid, out: Path, label: str | None = None) -> None:
    print()
    print_table(rows, [
        ("d", "d", "d"), ("tokens", "T", "d"), ("N", "N", "d"), ("r", "r", "d"),
        ("base_ms", "base", ".1f"), ("fused_ms", "fused", ".1f"), ("fused_vs_base", "fused/base", ".2f"),
        ("floor_vs_base", "floor", ".3f"), ("loop_ms", "loop", ".1f"),
        ("loop_ax_ms", "loop_ax", ".1f"), ("peft_r_ms", "peft_r", ".1f"), ("peft_Nr_ms", "peft_Nr", ".1f"),
        ("fused_vs_peft_Nr", "fused/peftNr", ".2f"), ("loop_over_fused_overhead", "loop/fused ovh", ".1f"),
        ("loop_ax_over_fused_overhead", "loopAx/fused ovh", ".1f"),
        ("fused_over_peft_Nr_overhead", "fused/peftNr ovh", ".2f"), ("fused_mem_mb", "fused MB", ".1f"),
        ("loop_mem_mb", "loop MB", ".1f"), ("peft_Nr_mem_mb", "peftNr MB", ".1f"),
    ])
    summary = summarize(rows)
    print("\nsummary:", summary)
    write_json(out, {
        "device": label or device_label(device), "dtype": str(dtype), "dropout": DROPOUT,
        "memory_metric": "peak CUDA bytes over one step" if device.type == "cuda"
        else "bytes saved for backward (forward activations kept by autograd)",
        "grid": grid, "summary": summary, "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
