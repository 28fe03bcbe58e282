"""``python -m benchmarks.claims [--sweeps N] [--trials K]``: how often a sweep's summary makes a
false claim, and how often it finds a real difference, on synthetic sweeps with a known truth.

Each simulated sweep has K trials scored on T tasks. Every example has a difficulty p ~ Beta(a, b)
(mean 0.6, U-shaped: most examples are easy or hard for every model, so two trials disagree on
about 10 % of them, as the main sweep's trials do); a trial answers it correctly with probability
p (plus its true advantage, where it has one), independently of the other trials.

- **null**: K equally good trials. A sweep makes a false claim when it calls any difference between
  the best trial and another resolved.
  *before*: the best is the maximum on the selection split and every "Δ vs best" is a separate
  95 % interval on that same split (what the sweep did before its claims were confirmed);
  *after*: the best is still chosen on the selection split, the claims are the confirmation
  split's simultaneous intervals (``pipeline.claims.family_claims``).
- **power**: two trials, one better by a known Δ. How often the confirmation split resolves the
  difference in the right direction, against the power ``pipeline.paired.power`` states for that
  Δ and the expected standard error.

Prints a table and writes ``benchmarks/results/claims.json`` (every rate with its binomial
standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.claims import SELECTION, family_claims
from pipeline.paired import power
from pipeline.stats import Z95

OUT = Path(__file__).parent / "results" / "claims.json"
BETA = (0.15, 0.10)  # difficulty distribution: mean 0.6, two trials disagree on ~10 % of examples


@dataclass
class Design:
    trials: int = 6
    tasks: int = 5
    selection_per_task: int = 80  # sweeps/heads_gamma.yaml's eval_per_task
    confirm_per_task: int = 60  # and its confirm_per_task
    n_boot: int = 1000


def _table(correct: np.ndarray, tasks: int):
    import pandas as pd

    n = len(correct)
    return pd.DataFrame({"task": np.repeat([f"t{i}" for i in range(tasks)], n // tasks),
                         "example_id": [f"e{i}" for i in range(n)], "correct": correct.astype(np.float64),
                         "gold_logprob": 0.0, "margin": 0.0})


def _split(rng, d: Design, per_task: int, advantage: np.ndarray) -> dict:
    """Per-example tables of every trial on a fresh sample of examples."""
    p = rng.beta(*BETA, size=d.tasks * per_task)
    return {f"trial{k}": _table(rng.random(len(p)) < np.clip(p + advantage[k], 0, 1), d.tasks)
            for k in range(len(advantage))}


def _ranked(tables: dict) -> list[str]:
    """Trials best first by their macro accuracy (ties by name, as the sweep breaks them)."""
    score = {k: t.groupby("task")["correct"].mean().mean() for k, t in tables.items()}
    return sorted(score, key=lambda k: (-score[k], k))


def false_claims(rng, d: Design, before: bool = True) -> tuple[Optional[bool], bool]:
    """(before, after): whether a sweep of equally good trials called a difference resolved (before:
    None where not computed)."""
    zero = np.zeros(d.trials)
    sel = _split(rng, d, d.selection_per_task, zero)
    order = _ranked(sel)
    conf = _split(rng, d, d.confirm_per_task, zero)
    after = family_claims(order, conf, n_boot=d.n_boot)
    if not before:
        return None, any(c.resolved for c in after.vs_best.values())
    old = family_claims(order, sel, split=SELECTION, simultaneous=False, n_boot=d.n_boot)
    return any(c.resolved for c in old.vs_best.values()), any(c.resolved for c in after.vs_best.values())


def truth(shift: float, draws: int = 2_000_000, seed: int = 1) -> tuple[float, float]:
    """(true accuracy difference, sd of a per-example paired difference) when the better trial's
    probability is p + shift (clipped at 1), by Monte Carlo over the difficulty distribution."""
    p = np.random.default_rng(seed).beta(*BETA, size=draws)
    q = np.clip(p + shift, 0, 1)
    var = np.mean(p * (1 - p) + q * (1 - q)) + np.var(q - p)
    return float(np.mean(q - p)), float(math.sqrt(var))


def detected(rng, d: Design, shift: float) -> bool:
    """Whether the confirmation split resolved a real difference, in its true direction."""
    adv = np.array([shift, 0.0])
    order = _ranked(_split(rng, d, d.selection_per_task, adv))
    claims = family_claims(order, _split(rng, d, d.confirm_per_task, adv), n_boot=d.n_boot)
    c = claims.vs_best[order[1]]  # runner-up − best
    better_first = order[0] == "trial0"
    return c.resolved and ((c.delta < 0) == better_first)


def rate(hits: int, n: int) -> dict:
    p = hits / n
    return {"rate": p, "se": math.sqrt(p * (1 - p) / n), "n": n}


def simulate(sweeps: int, d: Design, shift: float = 0.10, seed: int = 0, before_sweeps: Optional[int] = None) -> dict:
    """``before_sweeps``: how many of the sweeps also run the old rule (default: all)."""
    rng = np.random.default_rng(seed)
    n_before = sweeps if before_sweeps is None else min(before_sweeps, sweeps)
    before = after = 0
    for i in range(sweeps):
        b, a = false_claims(rng, d, before=i < n_before)
        before, after = before + bool(b), after + a
    delta, sd = truth(shift)
    se = sd / math.sqrt(d.tasks * d.confirm_per_task)
    found = sum(detected(rng, Design(2, d.tasks, d.selection_per_task, d.confirm_per_task, d.n_boot), shift)
                for _ in range(sweeps))
    return {"design": asdict(d), "sweeps": sweeps,
            "false_resolution_before": rate(before, n_before), "false_resolution_after": rate(after, sweeps),
            "power": {"true_delta": delta, "expected_se": se, "stated": power(delta, se, Z95), **rate(found, sweeps)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    r = simulate(args.sweeps, Design(trials=args.trials))
    b, a, pw = r["false_resolution_before"], r["false_resolution_after"], r["power"]
    print(f"{args.sweeps} simulated sweeps of {args.trials} equally good trials "
          f"({r['design']['tasks']} tasks x {r['design']['selection_per_task']} selection, "
          f"x {r['design']['confirm_per_task']} confirmation examples)")
    print("| | rate | ± se |\n|---|---:|---:|")
    print(f"| false 'resolved', best picked and compared on one split, 95 % each | {100 * b['rate']:.1f} % | "
          f"{100 * b['se']:.1f} |")
    print(f"| false 'resolved', confirmation split, simultaneous 95 % | {100 * a['rate']:.1f} % | {100 * a['se']:.1f} |")
    print(f"| true Δ = {100 * pw['true_delta']:.1f} points resolved (stated power {100 * pw['stated']:.0f} %) | "
          f"{100 * pw['rate']:.1f} % | {100 * pw['se']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
