"""``python -m benchmarks.gpu_check``: the GPU figures, measured the day a GPU is there.

With CUDA: (0) the fused layer's output against fp64 in each precision; (1) the layer benchmark in bf16 (fused R-LoRA vs the per-head loop and PEFT LoRA);
(2) training steps of the pipeline's own step function for every variant at fp32, bf16-mixed and
bf16, on the SmolLM2-135M and Qwen2.5-0.5B architectures, and Qwen2.5-3B with and without
activation checkpointing (random weights: speed and memory do not depend on them); (3) packing,
the point of fractional GPUs: 1, 2 and 4 training processes sharing the GPU, aggregate tokens/s;
(4) a two-trial fractional-GPU smoke sweep (``gpus_per_worker: 0.5``) when Ray and MLflow are
installed. Writes ``benchmarks/results/gpu_check-cuda.json`` (``--out``).

Without CUDA it says so in one line and exits 0. ``--smoke`` runs every part at toy sizes on the
CPU (to check the script before spending GPU time).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import device_label, print_table, write_json
from benchmarks.train_step import build_variant, load_base, measure
from pipeline.model.precision import autocast
from pipeline.train.step import accumulate_gradients

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STEP_VARIANTS = ("base", "peft_lora", "peft_lora_Nr", "rlora_N3", "rlora_N5")


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def numerics_part(device, smoke: bool) -> list[dict]:
    """The fused layer on this device against the same layer in fp64 on the CPU (relative error of the
    output), in fp32, under bf16 autocast (bf16-mixed) and with a bf16 base; random inputs, trained-
    looking adapters (heads and router moved off their init), per-head dropout off."""
    import torch
    from torch import nn

    from rlora import RLoraConfig, RLoraLinear  # lazy: loads peft

    d, tokens = (64, 32) if smoke else (1536, 4096)
    rows = []
    for n in (1, 3, 5):
        torch.manual_seed(n)
        layer = RLoraLinear(nn.Linear(d, d), "default", RLoraConfig(r=8, num_heads=n, alpha=16, head_dropout=0.0))
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        x = torch.randn(tokens, d)
        ref = layer.double().eval()(x.double())
        for precision in PRECISIONS:
            m = layer.float().to(device).eval()
            if precision == "bf16":
                m = m.to(torch.bfloat16)  # the base only: adapters stay fp32
            with torch.no_grad(), autocast(precision, device):
                y = m(x.to(device, next(m.get_base_layer().parameters()).dtype)).double().cpu()
            rows.append({"N": n, "precision": precision, "rel_error": ((y - ref).norm() / ref.norm()).item()})
            layer = m.float().cpu()
            print(f"  N={n} {precision:10s} relative error {rows[-1]['rel_error']:.2e}", flush=True)
    return rows


def layer_part(device, smoke: bool) -> dict:
    import torch

    from benchmarks.layer import run, summarize  # lazy: loads peft

    grid = ({"N": [1, 3], "r": [4], "d": [64], "tokens": [128]} if smoke
            else {"N": [1, 3, 5, 8], "r": [4, 8], "d": [1536, 4096], "tokens": [2048, 8192]})
    rows = run(grid, torch.device(device), torch.bfloat16, lambda d, t: 3 if smoke else 30)
    return {"grid": grid, "dtype": "bfloat16", "summary": summarize(rows), "rows": rows}


def _one_step_row(device, arch: str, precision: str, variant: str, batch: int, seq: int, steps: int,
                  checkpointing: bool) -> dict:
    """One measured configuration; out of memory is a row that says so, not the end of the part."""
    import torch

    row = {"model": arch, "batch": batch, "seq": seq, "checkpointing": checkpointing}
    model = params = None
    try:
        model, params = build_variant(variant, load_base(f"arch:{arch}", precision, device), checkpointing)
        row.update(measure(model, params, variant, batch, seq, steps, device, precision))
    except torch.cuda.OutOfMemoryError as e:
        row.update({"variant": variant, "precision": precision, "error": f"out of memory: {str(e)[:200]}",
                    "tokens_per_s": float("nan"), "peak_mem_mb": float("nan")})
    del model, params
    _free(device)
    print(f"  {arch} {precision:10s} {variant:12s} ckpt={checkpointing!s:5s} {row['tokens_per_s']:10.0f} tok/s",
          flush=True)
    return row


def step_part(device, smoke: bool) -> list[dict]:
    rows = []
    archs = [("tiny", 2, 32)] if smoke else [("smollm2-135m", 8, 512), ("qwen2.5-0.5b", 8, 512)]
    steps = 2 if smoke else 10
    for arch, batch, seq in archs:
        for precision in PRECISIONS:
            for variant in STEP_VARIANTS:
                rows.append(_one_step_row(device, arch, precision, variant, batch, seq, steps, False))
    big, batch, seq = ("tiny", 2, 64) if smoke else ("qwen2.5-3b", 4, 2048)
    for precision in ("bf16-mixed", "bf16"):
        for ckpt in (False, True):
            rows.append(_one_step_row(device, big, precision, "rlora_N3", batch, seq, steps, ckpt))
    by = {(r["model"], r["precision"], r["variant"], r["checkpointing"]): r for r in rows}
    for r in rows:
        ref = by.get((r["model"], r["precision"], "peft_lora_Nr", False))
        if ref:
            r["step_vs_peft_lora_Nr"] = r["step_s"] / ref["step_s"]
    return rows


def _pack_worker(rank: int, k: int, arch: str, batch: int, seq: int, steps: int, device: str, out: str, barrier):
    import torch

    model, params = build_variant("rlora_N3", load_base(f"arch:{arch}", "bf16-mixed", device))
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(rank))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]

    def step():
        accumulate_gradients(model.train(), data, device, "bf16-mixed")
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    barrier.wait()  # all k processes start timing together
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    Path(out, f"pack{k}-{rank}.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                             "tokens": steps * batch * seq}))


def pack_part(device, smoke: bool) -> list[dict]:
    """k independent trials training at once on one device: aggregate throughput against one alone."""
    import torch.multiprocessing as mp

    arch, batch, seq, steps = ("tiny", 2, 32, 3) if smoke else ("qwen2.5-0.5b", 4, 512, 20)
    rows = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        for k in (1, 2, 4):
            barrier = ctx.Barrier(k)
            procs = [ctx.Process(target=_pack_worker, args=(i, k, arch, batch, seq, steps, str(device), out, barrier))
                     for i in range(k)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(600)
            if any(p.exitcode != 0 for p in procs):
                rows.append({"trials": k, "error": f"exit codes {[p.exitcode for p in procs]}"})
                continue
            parts = [json.loads(Path(out, f"pack{k}-{i}.json").read_text()) for i in range(k)]
            wall = max(p["seconds"] for p in parts)
            rows.append({"trials": k, "model": arch, "batch": batch, "seq": seq,
                         "aggregate_tokens_per_s": sum(p["tokens"] for p in parts) / wall,
                         "per_trial_tokens_per_s": [p["tokens"] / p["seconds"] for p in parts]})
            print(f"  {k} trial(s) on one device: {rows[-1]['aggregate_tokens_per_s']:10.0f} tok/s in all", flush=True)
    one = next((r["aggregate_tokens_per_s"] for r in rows if r["trials"] == 1 and "error" not in r), None)
    for r in rows:
        if one and "error" not in r:
            r["vs_one_trial"] = r["aggregate_tokens_per_s"] / one
    return rows


def sweep_part(smoke: bool) -> dict:
    """Two trials of the smoke sweep at gpus_per_worker 0.5: both on one GPU at once."""
    missing = [m for m in ("ray", "mlflow", "optuna", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)}"}
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["base.scaling.use_gpu=true", "base.scaling.gpus_per_worker=0.5", "tune.max_concurrent_trials=2",
                "base.train.precision=bf16-mixed", f"base.output_dir={tmp}/out", "eval.enabled=false",
                f"base.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db"]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", "sweeps/smoke.yaml",
                               *[x for s in sets for x in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        return {"returncode": proc.returncode, "wall_s": time.time() - t0, "tail": proc.stdout[-1500:] + proc.stderr[-1500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: check the script itself")
    ap.add_argument("--parts", default="numerics,layer,step,pack,sweep")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        kind = "a CPU-only build" if not torch.backends.cuda.is_built() else "no visible GPU"
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, {kind}); nothing measured, GPU figures stay "
              "unmeasured")
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    import peft
    import transformers

    result = {"device": device_label(torch.device(device)), "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "smoke": args.smoke,
              "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = args.out or Path(__file__).parent / "results" / f"gpu_check-{'smoke' if args.smoke else 'cuda'}.json"
    parts = args.parts.split(",")
    for name, fn in (("numerics", lambda: numerics_part(device, args.smoke)),
                     ("layer", lambda: layer_part(device, args.smoke)), ("step", lambda: step_part(device, args.smoke)),
                     ("pack", lambda: pack_part(device, args.smoke)), ("sweep", lambda: sweep_part(args.smoke))):
        if name not in parts:
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            result[name] = fn()
        except Exception as e:  # keep what the other parts measured
            import traceback

            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(result[name]["traceback"], flush=True)
        result[f"{name}_wall_s"] = time.time() - t0
        write_json(out, result)  # after every part: a run cut short keeps what it measured
    report(result)
    print(f"wrote {out}")
    if os.environ.get("OUT"):
        write_json(Path(os.environ["OUT"]) / out.name, result)
    return 0


def report(result: dict) -> None:
    if isinstance(result.get("numerics"), list):
        print("\nfused layer vs fp64 (relative error of the output):")
        print_table(result["numerics"], [("N", "N", "d"), ("precision", "precision", "s"), ("rel_error", "rel. error", ".2e")])
    layer = result.get("layer")
    if isinstance(layer, dict) and "rows" in layer:
        print("\nlayer, bf16 (ms, forward + backward):")
        print_table(layer["rows"], [("d", "d", "d"), ("tokens", "T", "d"), ("N", "N", "d"), ("r", "r", "d"),
                                    ("base_ms", "base", ".3f"), ("fused_ms", "fused", ".3f"), ("loop_ms", "loop", ".3f"),
                                    ("peft_Nr_ms", "peft_Nr", ".3f"), ("fused_vs_peft_Nr", "fused/peftNr", ".2f"),
                                    ("loop_over_fused_overhead", "loop/fused ovh", ".1f")])
        print("summary:", layer["summary"])
    steps = result.get("step")
    if isinstance(steps, list):
        print("\ntraining step:")
        print_table(steps, [("model", "model", "s"), ("precision", "precision", "s"), ("variant", "variant", "s"),
                            ("checkpointing", "ckpt", "s"), ("tokens_per_s", "tok/s", ".0f"),
                            ("peak_mem_mb" if "peak_mem_mb" in steps[0] else "peak_rss_mb", "peak MB", ".0f")])
    pack = result.get("pack")
    if isinstance(pack, list):
        print("\npacking trials on one device:")
        print_table([r for r in pack if "error" not in r],
                    [("trials", "trials", "d"), ("aggregate_tokens_per_s", "tok/s in all", ".0f"),
                     ("vs_one_trial", "x one trial", ".2f")])
    if result.get("sweep"):
        print("\nfractional-GPU sweep:", {k: v for k, v in result["sweep"].items() if k != "tail"})


if __name__ == "__main__":
    sys.exit(main())
