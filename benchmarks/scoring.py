"""Held-out multiple-choice scoring on the embedded default (SmolLM2-135M-Instruct): examples/s of
the pairwise scorer (continuation_logprobs over every (prompt, choice) pair, then argmax) vs
score_choices (one forward per distinct context, choices scored against its KV cache).

Data: the five_task mixture's held-out examples (build_mixture("five_task", 0, n, seed=0)),
max_length 128 as in the sweep, one thread by default (what one Ray Train worker gets).
Run: python -m benchmarks.scoring [--n-per-task 40] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import device_label, print_table, sync, write_json
from pipeline.data.batching import build_mixture
from pipeline.model.base import load_model, resolve_model
from pipeline.model.scoring import continuation_logprobs, score_choices


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-task", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method (median)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/scoring-<device>.json")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok = load_model(resolve_model("smollm2-135m-instruct"))
    model.to(device).eval()
    examples = build_mixture("five_task", 0, args.n_per_task, seed=0).held_out
    pairs = [(e.prompt, c) for e in examples for c in e.choices]
    ml, bs = args.max_length, args.batch_size

    def old():
        flat = continuation_logprobs(model, tok, pairs, ml, bs)
        out, k = [], 0
        for e in examples:
            s = [lp for lp, _ in flat[k : k + len(e.choices)]]
            out.append((s, max(range(len(s)), key=s.__getitem__)))
            k += len(e.choices)
        return out

    def new():
        return [(r["choice_logprobs"], r["pred"]) for r in score_choices(model, tok, examples, ml, bs)]

    warm = examples[::max(1, len(examples) // bs)][:bs]  # warm-up on a slice of every task, not timed
    score_choices(model, tok, warm, ml, bs)
    continuation_logprobs(model, tok, [(e.prompt, c) for e in warm for c in e.choices], ml, bs)
    rows, results = [], {}
    for name, fn in (("pairwise", old), ("score_choices", new)):
        sec, results[name] = timed(fn, device, args.repeats)
        rows.append({"method": name, "seconds": sec, "examples_per_s": len(examples) / sec,
                     "pairs_per_s": len(pairs) / sec})
        print(f"{name:14s} {sec:8.2f} s  {len(examples) / sec:7.2f} examples/s", flush=True)
    report(args, device, examples, pairs, rows, results)


def timed(fn, device, repeats: int):
    """The median wall time of ``repeats`` runs of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def report(args, device, examples, pairs, rows: list[dict], results: dict) -> None:
    """The table, the agreement of the two scorers, and the JSON under benchmarks/results/."""
    ml, bs = args.max_length, args.batch_size
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    diffs = [abs(a - b) for (sa, _), (sb, _) in zip(results["pairwise"], results["score_choices"])
             for a, b in zip(sa, sb)]
    by_task: dict[str, float] = {}
    for e, (sa, _), (sb, _) in zip(examples, results["pairwise"], results["score_choices"]):
        by_task[e.task] = max(by_task.get(e.task, 0.0), *(abs(a - b) for a, b in zip(sa, sb)))
    same_pred = sum(pa == pb for (_, pa), (_, pb) in zip(results["pairwise"], results["score_choices"]))
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    print()
    print_table(rows, [("method", "method", "s"), ("examples_per_s", "examples/s", ".2f"),
                       ("pairs_per_s", "pairs/s", ".2f"), ("seconds", "seconds", ".2f"), ("speedup", "x pairwise", ".2f")])
    print(f"\n{len(examples)} examples, {len(pairs)} (prompt, choice) pairs, max_length {ml}, batch {bs}, "
          f"{args.threads} thread(s) on {device_label(device)}")
    print(f"speedup {speedup:.2f}x; max |log-prob difference| {max(diffs):.2e}; "
          f"same prediction on {same_pred}/{len(examples)}")
    out = args.out or Path(__file__).parent / "results" / f"scoring-{device.type}.json"
    write_json(out, {"device": device_label(device), "threads": args.threads, "n_per_task": args.n_per_task,
                     "examples": len(examples), "pairs": len(pairs), "max_length": ml, "batch_size": bs,
                     "repeats": args.repeats, "rows": rows, "speedup": speedup, "max_abs_logprob_diff": max(diffs),
                     "max_abs_logprob_diff_by_task": by_task, "same_prediction": same_pred})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
