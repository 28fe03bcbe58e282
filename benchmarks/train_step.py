"""Tokens/s and peak memory of one training step (forward + backward + AdamW) of a causal LM.

Variants:
  base       - the frozen model's forward + backward alone (input-grad path, no adapter)
  peft_lora  - PEFT LoRA r=8 on all 7 projections (dropout 0.05)
  peft_lora_Nr - PEFT LoRA of rank N*r = 24 (the rank-matched single LoRA of rlora_N3)
  rlora_N3   - R-LoRA, 3 heads, r=8, paper defaults, all 7 projections
  rlora_N5   - R-LoRA, 5 heads, r=8
  with --variants methods, also every other adapter.method the pipeline trains, built by its own code
  (pipeline.model.adapters): peft_dora (r=8), peft_adalora (init_r 12 -> target_r 8, its budget
  allocation after every step, as in training), peft_ia3 (PEFT's default targets), peft_prompt_tuning,
  peft_p_tuning and peft_prefix_tuning (20 virtual tokens each, the pipeline's default; the step's
  sequence is 20 tokens longer for prompt and P-tuning, tokens/s counts the input's), lora_moe_N3
  (3 experts of r=8 under the router), full (full fine-tuning: every weight trains, AdamW state for all)
The step is the training loop's own (``pipeline.train.step.accumulate_gradients``) under a
``train.precision`` (fp32 | bf16-mixed | bf16), optionally with activation checkpointing.

On the CPU every variant runs in its own fresh process, so peak RSS is its own; on CUDA they run in
one process and peak memory is the allocator's high-water mark per variant. ``--model`` is the
embedded model by default, or ``arch:<name>`` for an architecture from ``MODEL_ARCHS`` with random
weights (throughput and memory do not depend on the weights; nothing to download).
Run: python -m benchmarks.train_step [--batch 8 --seq 128 --steps 5] [--device cuda --precision bf16-mixed]
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
from pipeline.model.adapters import after_optimizer_step, peft_config
from pipeline.model.base import load_model, resolve_model
from pipeline.model.precision import load_dtype
from pipeline.train.step import accumulate_gradients, enable_gradient_checkpointing

VARIANTS = ["base", "peft_lora", "rlora_N3", "rlora_N5"]
METHOD_VARIANTS = ["base", "peft_lora", "peft_lora_Nr", "peft_dora", "peft_adalora", "peft_ia3", "peft_prompt_tuning",
                   "peft_p_tuning", "peft_prefix_tuning", "rlora_N3", "lora_moe_N3", "full"]
# the PEFT method sections of pipeline.model.adapters.peft_config for the method variants
PEFT_SECTIONS = {"peft_dora": ("dora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}),
                 "peft_adalora": ("adalora", {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}),
                 "peft_ia3": ("ia3", {}),
                 # the pipeline's defaults: 20 virtual tokens (P-tuning: an MLP encoder of width 128)
                 "peft_prompt_tuning": ("prompt_tuning", {}), "peft_p_tuning": ("p_tuning", {}),
                 "peft_prefix_tuning": ("prefix_tuning", {})}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Architectures by their published configs (weights drawn at random)
MODEL_ARCHS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "qwen2.5-3b": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                           max_position_embeddings=512)),
}


def load_base(model: str, precision: str, device):
    """The base model, in the dtype the precision loads it in, on ``device``."""
    import torch

    dtype = getattr(torch, load_dtype(precision))
    if model.startswith("arch:"):
        from transformers import AutoConfig, AutoModelForCausalLM

        kind, kw = MODEL_ARCHS[model.split(":", 1)[1]]
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw), dtype=dtype)

    return load_model(model, dtype=load_dtype(precision))[0].to(device)


def build_variant(variant: str, base, checkpointing: bool = False):
    """The model a variant trains, and its trainable parameters."""
    import torch

    if checkpointing:
        enable_gradient_checkpointing(base)
    torch.manual_seed(0)
    if variant in PEFT_SECTIONS:
        from peft import get_peft_model

        method, fields = PEFT_SECTIONS[variant]
        targets = None if method == "ia3" else TARGETS  # IA³: PEFT's own targets for the architecture
        model = get_peft_model(base, peft_config(method, fields, targets, total_step=10_000))
    elif variant.startswith("lora_moe"):
        import rlora  # lazy: loads peft

        n = int(variant.split("_N")[1])
        model = rlora.get_peft_model(base, rlora.RLoraConfig.from_preset("lora_moe", r=8, num_heads=n, alpha=16))
    elif variant.startswith("peft_lora"):
        from peft import LoraConfig, get_peft_model

        r = 24 if variant == "peft_lora_Nr" else 8
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS))
    elif variant.startswith("rlora"):
        import rlora  # lazy: loads peft

        n = int(variant.split("_N")[1])
        model = rlora.get_peft_model(base, rlora.RLoraConfig.from_preset("rlora", r=8, num_heads=n, alpha=16))
    elif variant == "full":
        model = base.requires_grad_(True)
    else:
        model = base
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # so backward runs through every layer
    return model, [p for p in model.parameters() if p.requires_grad]


def measure(model, params, variant: str, batch: int, seq: int, steps: int, device, precision: str) -> dict:
    """Median step time over ``steps`` timed steps after one warm-up, and peak memory."""
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    cuda = torch.device(device).type == "cuda"

    count = [0]

    def step():
        accumulate_gradients(model, data, device, precision)
        if variant != "base":
            opt.step()
            count[0] += 1
            after_optimizer_step(model, count[0])  # AdaLoRA's budget allocation; nothing for the others
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    row = {"variant": variant, "precision": precision, "step_s": med, "tokens_per_s": batch * seq / med,
           "step_s_q1": times[len(times) // 4], "step_s_q3": times[(3 * len(times)) // 4], "step_times_s": times,
           "trainable_params": sum(p.numel() for p in params)}
    if cuda:
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def one(variant: str, batch: int, seq: int, steps: int, threads: int, device: str = "cpu", precision: str = "fp32",
        model: str = "smollm2-135m-instruct", checkpointing: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    built, params = build_variant(variant, load_base(model, precision, device), checkpointing)
    return {**measure(built, params, variant, batch, seq, steps, device, precision), "checkpointing": checkpointing}


def add_ratio(row: dict, ref: dict, key: str) -> None:
    """``row[key]``: the ratio of median step times, with its range from the quartiles of both
    (``key_lo`` = row's Q1 / ref's Q3, ``key_hi`` = row's Q3 / ref's Q1); ``key_range`` as text, and
    ``key_resolved``: False when the range includes 1 (the two are not told apart by these steps)."""
    row[key] = row["step_s"] / ref["step_s"]
    if "step_s_q1" in row and "step_s_q1" in ref:
        lo, hi = row["step_s_q1"] / ref["step_s_q3"], row["step_s_q3"] / ref["step_s_q1"]
        row[f"{key}_lo"], row[f"{key}_hi"] = lo, hi
        row[f"{key}_range"] = f"{lo:.2f}–{hi:.2f}" if row is not ref else "–"
        row[f"{key}_resolved"] = row is not ref and not lo <= 1.0 <= hi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "bf16"])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model spec, or arch:<name> (random weights)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the base")
    ap.add_argument("--variants", default="default", help="default (R-LoRA vs PEFT LoRA), methods (every "
                    "adapter.method), or a comma-separated list of variants")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    run = dict(batch=args.batch, seq=args.seq, steps=args.steps, threads=args.threads, device=args.device,
               precision=args.precision, model=args.model, checkpointing=args.checkpointing)
    if args.variant:
        print(json.dumps(one(args.variant, **run)))
        return
    if not args.model.startswith("arch:"):
        resolve_model(args.model)  # convert once, outside the timed children
    variants = {"default": VARIANTS, "methods": METHOD_VARIANTS}.get(args.variants) or args.variants.split(",")
    rows = []
    for v in variants:
        if args.device == "cpu":  # a fresh process per variant: peak RSS is its own
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--variant", v,
                   *[x for k, val in run.items() if k != "checkpointing" for x in (f"--{k}", str(val))],
                   *(["--checkpointing"] if args.checkpointing else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            rows.append(one(v, **run))
        mem = rows[-1].get("peak_rss_mb", rows[-1].get("peak_mem_mb"))
        print(f"{v:10s} {rows[-1]['tokens_per_s']:8.1f} tok/s  peak memory {mem:7.0f} MB", flush=True)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for ref, key in (("peft_lora", "step_vs_peft_lora"), ("rlora_N3", "step_vs_rlora_N3")):
            if ref in by:
                add_ratio(r, by[ref], key)
    mem_key = "peak_rss_mb" if args.device == "cpu" else "peak_mem_mb"
    print()
    print_table(rows, [c for c in [("variant", "variant", "s"), ("tokens_per_s", "tok/s", ".1f"), ("step_s", "step s", ".3f"),
                       ("step_vs_peft_lora", "x PEFT LoRA", ".3f"), ("step_vs_rlora_N3", "x R-LoRA N3", ".3f"),
                       ("step_vs_rlora_N3_range", "x R-LoRA N3 (Q1–Q3)", "s"),
                       (mem_key, "peak MB", ".0f"),
                       ("trainable_params", "trainable", ",d")] if all(c[0] in r for r in rows)])
    import torch

    dev = torch.device(args.device)
    stem = "train_step" if args.variants == "default" else f"train_step-{args.variants.replace(',', '+')}"
    out = args.out or Path(__file__).parent / "results" / f"{stem}-{dev.type}.json"
    write_json(out, {"device": device_label(dev), **{k: v for k, v in run.items()}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
