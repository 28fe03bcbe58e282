"""Where the fused layer's time over the frozen projection goes.

For each row (d, tokens, N, r) it
  1. times the frozen base and the fused layer forward+backward *interleaved* (base, fused,
     base, fused, ...) and reports fused/base as the median of the per-pair ratios with its
     quartiles, so that the machine's drift between samples cancels;
  2. profiles both with ``torch.profiler`` (shapes recorded) and splits the self CPU time of
     every op into
       base_gemm   - GEMMs against the d x d frozen weight (forward and input gradient)
       adapter_gemm- the adapter's skinny GEMMs (down [A; W_r; A0], up [B | B0], their grads)
       full_width  - element-wise passes over a (tokens x d) tensor: adding the adapter's
                     output to the base output, summing the two input gradients, copies
       small_elem  - element-wise work on the (tokens x N x r) side: softmax, per-head dropout
                     masks, gating, concatenations, the correction block
       autograd    - the autograd engine's own bookkeeping
     The fused layer's overhead per category is its time in units of the base GEMMs' time in the
     same profile, minus the base layer's (so the machine's drift between profiles cancels).

``small_elem`` is all that fusing the element-wise work around the GEMMs can remove; the
"without small_elem" column is fused/base if it cost nothing. Run:
  python -m benchmarks.layer_breakdown           # d = 1536, N in {1,3,5}, r = 8, T in {2048, 8192}
  python -m benchmarks.layer_breakdown --quick   # T = 2048 only
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import device_label, print_table, write_json
from benchmarks.layer import build, flop_floor

CATEGORIES = ("base_gemm", "adapter_gemm", "full_width", "small_elem", "autograd")
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul_out", "aten::_mm"}


def categorize(name: str, shapes: list, d: int, tokens: int) -> str:
    if not name.startswith("aten::"):
        return "autograd"
    if name in GEMMS:
        return "base_gemm" if [d, d] in shapes else "adapter_gemm"
    if any(list(s[-2:]) == [tokens, d] and (len(s) < 3 or s[0] == 1) for s in shapes if len(s) >= 2):
        return "full_width"
    return "small_elem"


def profile_split(step, d: int, tokens: int, iters: int) -> dict:
    """Self CPU milliseconds per category in one step: the median over ``iters`` steps, each profiled
    on its own, so that one step the machine disturbed (a shared VM's stall lands in whichever op
    is running) does not move the split."""
    step()
    per_step = {c: [] for c in CATEGORIES}
    for _ in range(iters):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        split = dict.fromkeys(CATEGORIES, 0.0)
        for ev in prof.key_averages(group_by_input_shape=True):
            shapes = [list(s) for s in (ev.input_shapes or []) if isinstance(s, (list, tuple))]
            split[categorize(ev.key, shapes, d, tokens)] += ev.self_cpu_time_total / 1e3
        for c in CATEGORIES:
            per_step[c].append(split[c])
    return {c: statistics.median(v) for c, v in per_step.items()}


def paired_ratio(step_a, step_b, pairs: int) -> dict:
    """Median and quartiles of t_b / t_a over interleaved pairs (a, b, a, b, ...)."""
    step_a(), step_b()
    ta, tb = [], []
    for _ in range(pairs):
        for step, acc in ((step_a, ta), (step_b, tb)):
            t0 = time.perf_counter()
            step()
            acc.append((time.perf_counter() - t0) * 1e3)
    ratios = [b / a for a, b in zip(ta, tb)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"a_ms": statistics.median(ta), "b_ms": statistics.median(tb),
            "ratio": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3, "pairs": pairs}


def make_step(module, x, gy):
    def step():  # one training step: gradients set to None first, as optimizer.zero_grad() does
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(gy)
    return step


def breakdown_row(d: int, tokens: int, n: int, r: int, pairs: int, prof_iters: int) -> dict:
    device, dtype = torch.device("cpu"), torch.float32
    base, fused = build("base", d, n, r, device, dtype), build("fused", d, n, r, device, dtype).train()
    x = torch.randn(tokens, d, requires_grad=True)
    gy = torch.randn(tokens, d)
    sb, sf = make_step(base, x, gy), make_step(fused, x, gy)
    timing = paired_ratio(sb, sf, pairs)
    pb, pf = profile_split(sb, d, tokens, prof_iters), profile_split(sf, d, tokens, prof_iters)
    row = {"d": d, "tokens": tokens, "N": n, "r": r, "base_ms": timing["a_ms"], "fused_ms": timing["b_ms"],
           "fused_vs_base": timing["ratio"], "fused_vs_base_q1": timing["ratio_q1"],
           "fused_vs_base_q3": timing["ratio_q3"], "pairs": pairs, "floor_vs_base": flop_floor(d, n, r),
           "profiled_base_ms": sum(pb.values()), "profiled_fused_ms": sum(pf.values()), "profiled_steps": prof_iters}
    # Each category in units of the base GEMM time *of the same profile*: the machine's drift between
    # the two profiles (as large as the whole overhead on a shared VM) cancels.
    for c in CATEGORIES:
        row[f"base_{c}_ms"], row[f"fused_{c}_ms"] = pb[c], pf[c]
    for c in CATEGORIES[1:]:
        row[f"overhead_{c}"] = pf[c] / pf["base_gemm"] - pb[c] / pb["base_gemm"]
    total = sum(row[f"overhead_{c}"] for c in CATEGORIES[1:])
    row["profiled_fused_vs_base"] = 1.0 + total
    for c in CATEGORIES[1:]:
        row[f"overhead_{c}_share"] = row[f"overhead_{c}"] / total if total > 0 else float("nan")
    # the adapter's GEMMs' FLOP rate against the base GEMM's (the FLOP floor assumes 1.0)
    row["adapter_gemm_rate_vs_base"] = (row["floor_vs_base"] - 1.0) * pf["base_gemm"] / pf["adapter_gemm"]
    # the measured ratio if the small element-wise work cost nothing
    row["without_small_elem_vs_base"] = row["fused_vs_base"] - row["overhead_small_elem"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2048 tokens only")
    ap.add_argument("--d", type=int, nargs="+", default=[1536])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--r", type=int, nargs="+", default=[8])
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--pairs", type=int, default=15, help="interleaved timing pairs per row")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    tokens = args.tokens or ([2048] if args.quick else [2048, 8192])
    rows = []
    for d in args.d:
        for t in tokens:
            for n in args.heads:
                for r in args.r:
                    row = breakdown_row(d, t, n, r, args.pairs, prof_iters=5)
                    rows.append(row)
                    print(f"d={d} T={t} N={n} r={r}: fused/base {row['fused_vs_base']:.3f} "
                          f"[{row['fused_vs_base_q1']:.3f}, {row['fused_vs_base_q3']:.3f}]", flush=True)
    print()
    print_table(rows, [
        ("d", "d", "d"), ("tokens", "T", "d"), ("N", "N", "d"), ("r", "r", "d"),
        ("base_ms", "base ms", ".1f"), ("fused_vs_base", "fused/base", ".3f"), ("fused_vs_base_q1", "q1", ".3f"),
        ("fused_vs_base_q3", "q3", ".3f"), ("floor_vs_base", "FLOP floor", ".3f"),
        ("overhead_adapter_gemm_share", "adapter GEMMs", ".0%"), ("overhead_full_width_share", "T x d passes", ".0%"),
        ("overhead_small_elem_share", "small elem", ".0%"), ("overhead_autograd_share", "autograd", ".0%"),
        ("profiled_fused_vs_base", "profiled", ".3f"), ("adapter_gemm_rate_vs_base", "GEMM rate", ".2f"),
        ("without_small_elem_vs_base", "w/o small elem", ".3f"),
    ])
    out = args.out or Path(__file__).parent / "results" / f"layer_breakdown-cpu{'-quick' if args.quick else ''}.json"
    write_json(out, {"device": device_label(torch.device("cpu")), "dtype": "torch.float32",
                     "timing": "median of per-pair ratios over interleaved base/fused steps, with quartiles",
                     "profile": "torch.profiler self CPU time per op, split by op and input shape, median over 5 separately profiled steps; overhead_<category> in units of the base GEMM time of the same profile",
                     "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
