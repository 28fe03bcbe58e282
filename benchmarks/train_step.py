"""Tokens/s and peak RSS of one training step on the embedded default (SmolLM2-135M-Instruct).

Variants (each in its own fresh process, so peak RSS is its own):
  base       - the frozen model's forward + backward alone (input-grad path, no adapter)
  peft_lora  - PEFT LoRA r=8 on all 7 projections (dropout 0.05)
  rlora_N3   - R-LoRA, 3 heads, r=8, paper defaults, all 7 projections
  rlora_N5   - R-LoRA, 5 heads, r=8
Run: python -m benchmarks.train_step [--batch 8 --seq 128 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import device_label, print_table, write_json

VARIANTS = ["base", "peft_lora", "rlora_N3", "rlora_N5"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(variant: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    from pipeline.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model("smollm2-135m-instruct")
    torch.manual_seed(0)
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    elif variant.startswith("rlora"):
        import rlora

        n = int(variant.split("_N")[1])
        model = rlora.get_peft_model(model, rlora.RLoraConfig.from_preset("rlora", r=8, num_heads=n, alpha=16))
    else:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # so backward runs through every layer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if variant != "base":
            opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "step_s": med, "tokens_per_s": batch * seq / med, "peak_rss_mb": rss_mb,
            "trainable_params": sum(p.numel() for p in params)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step-cpu.json")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.variant, args.batch, args.seq, args.steps, args.threads)))
        return
    from pipeline.models import resolve_model

    resolve_model("smollm2-135m-instruct")  # convert once, outside the timed children
    rows = []
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--variant", v, "--batch", str(args.batch),
                               "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{v:10s} {rows[-1]['tokens_per_s']:8.1f} tok/s  peak RSS {rows[-1]['peak_rss_mb']:7.0f} MB", flush=True)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["step_vs_peft_lora"] = r["step_s"] / by["peft_lora"]["step_s"]
    print()
    print_table(rows, [("variant", "variant", "s"), ("tokens_per_s", "tok/s", ".1f"), ("step_s", "step s", ".2f"),
                       ("step_vs_peft_lora", "x PEFT LoRA", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
                       ("trainable_params", "trainable", ",d")])
    import torch

    write_json(args.out, {"device": device_label(torch.device("cpu")), "batch": args.batch, "seq": args.seq,
                          "steps": args.steps, "threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
