"""Demo of the R-LoRA tuner on the embedded default model (SmolLM2-135M-Instruct).

Fine-tunes the ``rlora`` preset on a slice of real SST-2 data, scores held-out accuracy
(log-likelihood of " negative" / " positive") before and after, saves the adapter, reloads
it on a fresh base and checks the logits match bit for bit, and writes the head-similarity
heatmap. ``python -m pipeline.demo --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import rlora
from pipeline.data import DataError, load_sst2
from pipeline.data.batching import LengthAwareBatches, encode_example
from pipeline.model.base import DEFAULT_MODEL, ModelSpecError, load_model
from pipeline.model.scoring import choice_accuracy_by_task
from rlora.analysis import head_similarity, plot_head_similarity, similarity_summary


def accuracy(model, tok, examples) -> float:
    return choice_accuracy_by_task(model, tok, examples)["sst2"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data-dir", default=None, help="default: $RLORA_DATA_DIR or ../shared/data")
    ap.add_argument("--preset", default="rlora", choices=sorted(rlora.PRESETS))
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train = load_sst2("train", args.data_dir)
        held_out = load_sst2("dev", args.data_dir)
        cfg_kw = {"r": args.rank}
        if args.preset != "lora":
            cfg_kw["num_heads"] = args.heads
        config = rlora.RLoraConfig.from_preset(args.preset, **cfg_kw)
        t0 = time.time()
        base, tok = load_model(args.model)
    except (DataError, ModelSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {args.model} loaded in {time.time() - t0:.1f}s")
    train = random.Random(args.seed).sample(train, min(args.train_examples, len(train)))
    held_out = held_out[: args.eval_examples]
    acc_before = accuracy(base, tok, held_out)
    print(f"held-out SST-2 accuracy, base model: {acc_before:.3f} ({len(held_out)} examples)")
    model = fine_tune(base, tok, config, train, args)
    acc_after = accuracy(model, tok, held_out)
    print(f"held-out SST-2 accuracy, {args.preset}: {acc_after:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    adapter_dir = args.out / "adapter"
    identical = reloads_exactly(model, tok, held_out, adapter_dir, args.model)
    print(f"save -> load on a fresh base reproduces the logits exactly: {identical}")
    summary = {"preset": args.preset, "accuracy_before": acc_before, "accuracy_after": acc_after,
               "reload_identical": identical, "adapter": str(adapter_dir)}
    sims = head_similarity(model)
    if sims:
        summary.update(similarity_summary(sims))
        fig = plot_head_similarity(sims, args.out / "head_similarity.png")
        print(f"head cosine similarity (mean over layers): {summary['head_cos/mean']:.3f} -> {fig}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'summary.json'}")
    return 0 if identical else 1


def fine_tune(base, tok, config, train, args):
    """``args.steps`` AdamW steps of the tuner on length-grouped batches of ``train``."""
    torch.manual_seed(args.seed)
    model = rlora.get_peft_model(base, config)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t0 = time.time()
    stream = LengthAwareBatches([encode_example(tok, ex, 256) for ex in train], args.batch_size, tok.pad_token_id,
                                seed=args.seed)
    for step, batch in zip(range(1, args.steps + 1), stream.for_rank(0, 1)):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    return model


def reloads_exactly(model, tok, held_out, adapter_dir: Path, model_spec: str) -> bool:
    """Save the adapter, load it on a fresh base: the same logits, bit for bit."""
    model.save_pretrained(adapter_dir)
    probe = tok([ex.prompt for ex in held_out[:4]], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        trained = model(**probe).logits
    fresh, _ = load_model(model_spec)
    reloaded = rlora.from_pretrained(fresh, adapter_dir)
    with torch.no_grad():
        return torch.equal(reloaded(**probe).logits, trained)


if __name__ == "__main__":
    sys.exit(main())
