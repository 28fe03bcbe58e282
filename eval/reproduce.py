"""``python -m eval.reproduce [sweeps/ablation.yaml] [--set KEY=VALUE ...] [--from-sweep RUN_ID]``

Runs the paper's five-arm ablation (LoRA, HydraLoRA, +multi-head dropout, +multi-head random
init, R-LoRA; ``sweeps/ablation.yaml``, every arm with the same budget and seeds) and writes one
report, logged to the sweep's MLflow parent run under ``reproduce/``:

- a per-task held-out accuracy table in the layout of the paper's Table 4: mean ± standard error,
  where the standard error combines the spread over seeds and the finite held-out sample
  (se² = sd²_seeds / K + se²_examples, the latter from the per-example outcomes averaged over seeds);
- each arm's paired difference to HydraLoRA and to LoRA (same examples, same seeds) with a 95 %
  interval that holds jointly over the arms compared with that reference (Bonferroni), from
  se² = se²_paired-examples + var_k(d_k) / K over the per-seed differences d_k;
- head cosine similarity per arm (paper Fig. 2/5: HydraLoRA ≈ 0.8, R-LoRA < 0.7);
- early gradient norms per arm (paper Fig. 6);
- one sentence per claim of the paper: reproduced / not resolved at this size / contradicted.

It reports what it measures, whether or not that agrees with the paper. ``--from-sweep`` builds
the report from an ablation sweep that already ran. ``--table baselines`` reports a sweep over
adapter methods instead (``sweeps/baselines.yaml``; eval/reports/baselines.py).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from eval.reports import baselines
from eval.reports.arms import (
    TASK_LABELS,
    arm_difference,
    arm_score,
    cell,
    delta_cell,
    mean_std,
    seed_record,
    seeds_mean_se,
    sweep_trials,
)
from pipeline.config.cli import base_parser, fail, user_errors
from pipeline.data.tasks import resolve_tasks
from pipeline.reports import pyplot, save_figure, write_table
from pipeline.tracking import Tracker, resolve_tracking_uri

ARMS = {  # preset -> row label, in the paper's order
    "lora": "LoRA",
    "hydralora": "HydraLoRA",
    "hydralora+mt": "+ multi-head dropout",
    "hydralora+init": "+ multi-head random init",
    "rlora": "R-LoRA",
}
PAPER = {"HydraLoRA avg (Qwen2.5-0.5B, Table 4)": 72.69, "R-LoRA avg (Qwen2.5-0.5B, Table 4)": 73.59,
         "head cosine HydraLoRA (Fig. 2/5)": "≈ 0.8", "head cosine R-LoRA (Fig. 2/5)": "< 0.7"}
EARLY_STEPS = 20


def collect(client, parent_run_id: str, tasks: list[str]) -> dict[str, list[dict[str, Any]]]:
    """preset -> one record per finished seed: final per-task accuracies, head cosine, early grad norms.
    Only R-LoRA runs (``adapter.method: rlora``): the presets are its ablation arms; a run of another
    method logs the default ``adapter.preset`` too and must not be counted as that arm."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in sweep_trials(client, parent_run_id):
        preset = r.data.params.get("adapter.preset")
        if r.data.params.get("adapter.method", "rlora") != "rlora" or preset is None:
            continue
        hist = sorted(client.get_metric_history(r.info.run_id, "train/grad_norm"), key=lambda x: x.step)
        arms.setdefault(preset, []).append({
            **seed_record(client, r, tasks), "head_cos": r.data.metrics.get("head_cos/mean"),
            "grad_norm": [(h.step, h.value) for h in hist if h.step <= EARLY_STEPS],
        })
    return arms


def table4(arms: dict[str, list[dict]], tasks: list[str]) -> tuple[list[str], list[dict]]:
    rows = []
    for preset, label in ARMS.items():
        recs = arms.get(preset, [])
        if not recs:
            continue
        row = {"method": label, "seeds": len(recs)}
        for t in tasks:
            row[TASK_LABELS.get(t, t)] = cell(*arm_score(recs, t))
        row["Avg"] = cell(*arm_score(recs))
        for ref in ("hydralora", "lora"):  # every other arm against one reference: a family of comparisons
            m = sum(1 for p in ARMS if p != ref and arms.get(p))
            row[f"Δ vs {ARMS[ref]}"] = "–" if preset == ref else delta_cell(arm_difference(recs, arms.get(ref, []), m))
        row["head cos"] = cell(*mean_std([r["head_cos"] for r in recs]), scale=1.0, digits=3) \
            if any(r["head_cos"] is not None for r in recs) else "– (1 head)"
        rows.append(row)
    cols = ["method", "seeds", *[TASK_LABELS.get(t, t) for t in tasks], "Avg", "Δ vs HydraLoRA", "Δ vs LoRA",
            "head cos"]
    return cols, rows


def _verdict_from(delta: float, se: Optional[float], expected_sign: int) -> str:
    """reproduced / contradicted when the difference is beyond 1.96 se in one direction, else not resolved."""
    if se is None or math.isnan(se) or se == 0:
        return "not resolved (no uncertainty estimate: one seed)" if se is None else \
            ("reproduced" if delta * expected_sign > 0 else "contradicted")
    z = delta / se
    if abs(z) < 1.959963984540054:
        return "not resolved at this size"
    return "reproduced" if z * expected_sign > 0 else "contradicted"


def claims(arms: dict[str, list[dict]]) -> list[str]:
    """One sentence per claim of the paper, with the numbers behind it."""
    out = []
    hyd, rl = arms.get("hydralora", []), arms.get("rlora", [])
    hc = [r["head_cos"] for r in hyd if r["head_cos"] is not None]
    rc = [r["head_cos"] for r in rl if r["head_cos"] is not None]
    if hc and rc:
        d = statistics.fmean(rc) - statistics.fmean(hc)
        se = math.sqrt(sum(statistics.variance(x) / len(x) for x in (hc, rc))) if min(len(hc), len(rc)) > 1 else None
        out.append(f"Heads less similar than HydraLoRA's (Fig. 2/5): **{_verdict_from(d, se, -1)}**: head cosine "
                   f"R-LoRA {statistics.fmean(rc):.3f} vs HydraLoRA {statistics.fmean(hc):.3f} "
                   f"(Δ = {d:+.3f}" + (f" ± {1.96 * se:.3f}" if se else "") + f", {min(len(hc), len(rc))} seed(s)).")
    g = {p: [v for r in arms.get(p, []) for s_, v in r["grad_norm"] if s_ == 1] for p in ("hydralora", "rlora")}
    if g["hydralora"] and g["rlora"]:
        d = statistics.fmean(g["rlora"]) - statistics.fmean(g["hydralora"])
        se = math.sqrt(sum(statistics.variance(x) / len(x) for x in g.values())) \
            if min(map(len, g.values())) > 1 else None
        out.append(f"Larger early gradient norms (Fig. 6): **{_verdict_from(d, se, +1)}**: step-1 gradient norm "
                   f"R-LoRA {statistics.fmean(g['rlora']):.3g} vs HydraLoRA {statistics.fmean(g['hydralora']):.3g} "
                   f"(Δ = {d:+.3g}" + (f" ± {1.96 * se:.2g}" if se else "") + ").")
    diff = arm_difference(rl, hyd) if hyd and rl else None
    if diff is not None:
        v = "reproduced" if diff["resolved"] and diff["delta"] > 0 else (
            "contradicted" if diff["resolved"] else "not resolved at this size")
        out.append(f"Better multi-task accuracy than HydraLoRA (Table 4, paper +0.9 points without error bars): "
                   f"**{v}**: R-LoRA − HydraLoRA = {100 * diff['delta']:+.1f} points, 95 % CI "
                   f"[{100 * diff['lo']:+.1f}, {100 * diff['hi']:+.1f}] ({diff['n']} paired examples × "
                   f"{diff['seeds']} seed(s)).")
    return out


def plot_head_cos(arms: dict[str, list[dict]], path: Path) -> Optional[Path]:
    plt = pyplot()

    labels, means, stds = [], [], []
    for preset, label in ARMS.items():
        m, s = mean_std([r["head_cos"] for r in arms.get(preset, [])])
        if m is not None:
            labels.append(label)
            means.append(m)
            stds.append(s if s is not None else 0.0)  # one seed: no spread to draw
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(labels)), means, yerr=stds, color=["C1" if "R-LoRA" in l else "C0" for l in labels], capsize=3)
    ax.axhline(0.8, ls="--", c="0.5", lw=1)
    ax.axhline(0.7, ls=":", c="0.5", lw=1)
    ax.text(len(labels) - 0.5, 0.805, "paper: HydraLoRA ≈ 0.8", fontsize=7, ha="right", va="bottom")
    ax.text(len(labels) - 0.5, 0.695, "paper: R-LoRA < 0.7", fontsize=7, ha="right", va="top")
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("mean pairwise head cosine")
    ax.set_ylim(0, 1.05)
    ax.set_title("head similarity after training (mean ± sd over seeds)", fontsize=9)
    return save_figure(fig, path)


def plot_grad_norms(arms: dict[str, list[dict]], path: Path) -> Optional[Path]:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for i, (preset, label) in enumerate(ARMS.items()):
        by_step: dict[int, list[float]] = {}
        for r in arms.get(preset, []):
            for step, v in r["grad_norm"]:
                by_step.setdefault(step, []).append(v)
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker="o", ms=3, label=label, color=f"C{i}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (adapter, before clipping)")
    ax.set_yscale("log")
    ax.set_title(f"early gradient norms, first {EARLY_STEPS} steps (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def early_grad_summary(arms: dict[str, list[dict]], first: int = 5) -> dict[str, dict[str, tuple]]:
    """label -> {"step1": (mean, se), "early": (mean, se)}: the gradient norm at step 1 and its mean
    over steps 1..first, one value per seed, then mean and standard error over seeds (se None
    from a single seed)."""
    out = {}
    for preset, label in ARMS.items():
        recs = arms.get(preset, [])
        step1 = [v for r in recs for s, v in r["grad_norm"] if s == 1]
        early = [statistics.fmean(vs) for r in recs if (vs := [v for s, v in r["grad_norm"] if s <= first])]
        out[label] = {"step1": seeds_mean_se(step1), "early": seeds_mean_se(early)}
    return out


def write_report(tracking_uri: str, parent_run_id: str, tasks: list[str], out_dir: Path, wall_s: Optional[float],
                 config_note: str) -> dict[str, Any]:
    t = Tracker(tracking_uri, parent_run_id)
    client = t.client
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = collect(client, parent_run_id, tasks)
    if not arms:
        raise RuntimeError(f"sweep {parent_run_id}: no finished ablation trials to report")
    cols, rows = table4(arms, tasks)
    tables = write_table(rows, cols, out_dir, "table4")
    figs = [plot_head_cos(arms, out_dir / "head_cosine.png"), plot_grad_norms(arms, out_dir / "early_grad_norms.png")]
    grads = early_grad_summary(arms)
    cos_se = {p: seeds_mean_se([r["head_cos"] for r in arms.get(p, []) if r["head_cos"] is not None])
              for p in ("hydralora", "rlora")}
    hyd, rl = cos_se["hydralora"][0], cos_se["rlora"][0]
    avg = {p: arm_score(arms[p]) for p in ARMS if arms.get(p)}
    lines = ["# R-LoRA ablation: reproduction report", "",
             f"MLflow sweep run `{parent_run_id}`. {config_note}" + (f" Wall time {wall_s / 60:.1f} min." if wall_s else ""),
             "", "## Table 4 layout: held-out accuracy (%) per task, mean ± standard error (seeds and examples)", "",
             tables[0].read_text().rstrip(), "",
             "*BoolQ stands in for QQP, which is not available offline. Accuracy is the training loop's held-out "
             "evaluation at the last step (log-likelihood choice among the task's answers). Δ columns: paired "
             "difference in points (examples and seeds) with a 95 % interval that holds jointly over the column's "
             "comparisons against the same reference (Bonferroni); n.r. = not resolved. The claims below are the "
             "paper's, each tested once, with a 95 % interval.", "",
             "## The paper's claims at this size", "", *[f"- {c}" for c in claims(arms)], "",
             "## What the paper reports, and what this run measured", "",
             "| quantity | paper | measured here |", "|---|---|---|",
             f"| Avg, HydraLoRA → R-LoRA | 72.69 → 73.59 (Qwen2.5-0.5B) | "
             f"{cell(*avg.get('hydralora', (None, None)))} → {cell(*avg.get('rlora', (None, None)))} |",
             f"| head cosine, HydraLoRA | ≈ 0.8 | {cell(*cos_se['hydralora'], scale=1, digits=3)} |",
             f"| head cosine, R-LoRA | < 0.7 | {cell(*cos_se['rlora'], scale=1, digits=3)} |", ""]
    verdict = []
    if hyd is not None and rl is not None:
        verdict.append(f"Head similarity: R-LoRA {'<' if rl < hyd else '≥'} HydraLoRA ({rl:.3f} vs {hyd:.3f}); "
                       f"R-LoRA {'is' if rl < 0.7 else 'is not'} below the paper's 0.7; HydraLoRA "
                       f"{'is' if abs(hyd - 0.8) <= 0.1 else 'is not'} within 0.1 of the paper's 0.8.")
    lines += verdict + ["", "## Early gradient norms (adapter parameters, before clipping; mean ± standard "
                        "error over seeds)", "", "| method | step 1 | mean of steps 1–5 |", "|---|---|---|"]
    lines += [f"| {k} | {cell(*g['step1'], scale=1, digits=2)} | {cell(*g['early'], scale=1, digits=2)} |"
              for k, g in grads.items()]
    lines += ["", "![head cosine](head_cosine.png)", "", "![early gradient norms](early_grad_norms.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    for f in [report, *tables, *[f for f in figs if f]]:
        t.log_artifact(f, "reproduce")
    return {"report": str(report), "rows": rows, "head_cos": {"hydralora": hyd, "rlora": rl}, "grad": grads,
            "avg": avg}


def main(argv=None) -> int:
    ap = base_parser("python -m eval.reproduce", __doc__, "ablation sweep YAML", "base.train.steps=60",
                     config_default="sweeps/ablation.yaml")
    ap.add_argument("--table", choices=["table4", "baselines"], default="table4",
                    help="table4: the five-arm ablation (default); baselines: every adapter of the sweep against "
                         "R-LoRA in the layout of Tables 2/3 (eval/reports/baselines.py; default config sweeps/baselines.yaml)")
    ap.add_argument("--from-sweep", default=None, metavar="RUN_ID", help="report on a sweep that already ran")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.table == "baselines" and args.config == ap.get_default("config"):
        args.config = "sweeps/baselines.yaml"
    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft, torch
    from pipeline.sweep.driver import run_sweep  # lazy: loads peft, torch

    try:
        cfg = load_sweep_config(args.config, args.overrides)
        tasks = resolve_tasks(cfg.base.data.tasks)
        t0 = time.time()
        if args.from_sweep:
            parent, wall = args.from_sweep, None
            uri = resolve_tracking_uri(cfg.base.mlflow.tracking_uri)
        else:
            out = run_sweep(cfg, args.config)
            if out.get("interrupted"):
                return 130
            parent, uri, wall = out["parent_run_id"], out["tracking_uri"], time.time() - t0
    except user_errors() as e:
        return fail(e)
    out_dir = args.out or Path("outputs") / "reproduce" / parent
    note = (f"{cfg.base.model}, mixture {cfg.base.data.tasks}, {cfg.base.train.steps} steps × batch "
            f"{cfg.base.train.batch_size}, {cfg.base.data.eval_per_task} held-out examples per task")
    if args.table == "baselines":
        res = baselines.write_report(uri, parent, tasks, out_dir, wall, note + f", {cfg.tune.seeds} seed(s) per adapter.")
        print(Path(res["report"]).read_text())
        print(f"wrote {res['report']} (logged to MLflow run {parent} under reproduce/)")
        return 0
    note += (f", r={cfg.base.adapter.r}, N={cfg.base.adapter.num_heads} heads (LoRA: 1), γ={cfg.base.adapter.gamma}.")
    res = write_report(uri, parent, tasks, out_dir, wall, note)
    print(Path(res["report"]).read_text())
    print(f"wrote {res['report']} (logged to MLflow run {parent} under reproduce/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
