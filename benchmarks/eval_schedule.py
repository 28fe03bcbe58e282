"""Eval-stage wall time: whole models vs (model, task family) units on the same workers.

The eval stage queues (model, task family) units on its Ray actors rather than giving each actor
one whole model (every task family). With 3 models on 2 workers the whole-model schedule ends with one worker
scoring the last model alone. This benchmark runs both schedules through the same
``eval.harness.evaluate_jobs`` at equal settings (the sweep YAML's eval section, its model and
its adapter config; ``--limit`` scales the question counts down) and reports, per schedule, the
stage's wall time, the summed work of the units and the share of worker time left idle. Both
schedules must produce the same scores (checked, largest difference printed).

Models: the base plus ``--models - 1`` R-LoRA adapters built from the sweep's adapter section with
different seeds and moved off their initialisation (their cost is what a trained adapter costs).
Run: python -m benchmarks.eval_schedule [sweeps/heads_gamma.yaml] [--models 3] [--workers 2]
     [--limit bbh_fewshot=1 --limit mmlu=2 ...] [--order whole,units]
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_json
from eval.harness import EvalJob, Evaluator, evaluate_jobs, merge_results
from eval.stage import settings_from, unit_settings
from pipeline.model.base import load_model, resolve_model
from pipeline.runtime import ensure_ray


def make_adapters(cfg, n: int, out: Path) -> list[str]:
    import torch

    import rlora  # lazy: loads peft

    dirs = []
    for i in range(n):
        base, _ = load_model(resolve_model(cfg.base.model))
        torch.manual_seed(1000 + i)
        model = rlora.get_peft_model(base, cfg.base.adapter.to_rlora())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "rlora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(out / f"adapter{i}")
        dirs.append(str(out / f"adapter{i}"))
    return dirs


class _WholeModel:
    """The old schedule: an actor scores one model's every family before it takes the next model."""

    def __init__(self, settings):
        self.ev = Evaluator(settings, "cpu", 1)

    def evaluate_all(self, jobs):
        return [self.ev.evaluate(j) for j in jobs]


def whole_model_jobs(settings, jobs_by_model: list[list], workers: int) -> list[dict]:
    """Each model's jobs on one actor, models handed to the next free actor in queue order."""
    import ray
    from ray.util import ActorPool

    actors = [ray.remote(_WholeModel).options(num_cpus=1).remote(settings) for _ in range(workers)]
    try:
        per_model = ActorPool(actors).map(lambda a, jobs: a.evaluate_all.remote(jobs), jobs_by_model)
        return [r for rs in per_model for r in rs]  # model-major, in queue order
    finally:
        for a in actors:
            ray.kill(a)


def makespan(durations: list[float], workers: int) -> float:
    """Greedy list scheduling in queue order: each duration goes to the first free worker."""
    free = [0.0] * workers
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def policy_makespans(units: list[dict], workers: int) -> dict[str, float]:
    """Both policies replayed on one run's measured unit times (model order, family order kept), so
    the scheduling effect is seen without the run-to-run noise of the unit times themselves."""
    models = list(dict.fromkeys(u["model"] for u in units))
    families = list(dict.fromkeys(u["family"] for u in units))
    t = {(u["model"], u["family"]): u["wall_s"] for u in units}
    return {"whole": makespan([sum(t[m, f] for f in families) for m in models], workers),
            "units": makespan([t[m, f] for f in families for m in models], workers)}


def run_schedule(kind: str, settings, units, models: list[tuple[str, str | None]], workers: int) -> dict:
    t0 = time.perf_counter()
    if kind == "whole":
        by_model = [[EvalJob(name=name, adapter_dir=path, settings=u) for u in units] for name, path in models]
        results = whole_model_jobs(settings, by_model, workers)
        jobs = [j for js in by_model for j in js]  # results come back in this order
    else:  # family-major, as eval.stage queues them
        jobs = [EvalJob(name=name, adapter_dir=path, settings=u) for u in units for name, path in models]
        results = evaluate_jobs(settings, jobs, max_workers=workers, progress=False)
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise SystemExit(f"eval_schedule: {kind}: {errors[0]}")
    work = sum(r["wall_s"] for r in results)
    merged = merge_results(results)
    return {"schedule": kind, "jobs": len(models) if kind == "whole" else len(results), "workers": workers,
            "wall_s": wall, "work_s": work, "idle_share": 1.0 - work / (workers * wall),
            "unit_times": [{"model": r["name"], "family": s.tasks[0], "wall_s": round(r["wall_s"], 1)}
                           for r, s in zip(results, [j.settings for j in jobs])],
            "scores": {m["name"]: m["scores"] for m in merged},
            "questions": {m["name"]: sum(m["n_samples"].values()) for m in merged}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="sweeps/heads_gamma.yaml")
    ap.add_argument("--models", type=int, default=3, help="the base + this many minus one adapters")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", action="append", default=[], metavar="FAMILY=N",
                    help="override the config's per-family limit (repeatable)")
    ap.add_argument("--order", default="whole,units", help="schedules to run, in this order")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_schedule-cpu.json"))
    args = ap.parse_args(argv)

    import ray

    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft

    limits = {}
    for item in args.limit:
        family, _, n = item.partition("=")
        limits[family] = float(n) if "." in n else int(n)
    cfg = load_sweep_config(args.config)
    ev = cfg.eval
    if limits:
        base = ev.limit if isinstance(ev.limit, dict) else {f: ev.limit for f in ev.tasks}
        ev = ev.model_copy(update={"limit": {**base, **limits}})
    settings = settings_from(ev, cfg.base.model)
    units = unit_settings(ev, cfg.base.model)
    ensure_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(cfg, args.models - 1, Path(tmp))
        models = [("base", None)] + [(f"adapter{i}", d) for i, d in enumerate(adapters)]
        for kind in args.order.split(","):
            print(f"eval_schedule: {kind} ...", flush=True)
            rows.append(run_schedule(kind, settings, units, models, args.workers))
    ray.shutdown()
    ref = rows[0]["scores"]
    diff = max((abs(r["scores"][m][k] - v) for r in rows[1:] for m in ref for k, v in ref[m].items()
                if isinstance(v, float) and v == v), default=0.0)
    print(f"\n{args.models} models x {len(units)} families ({', '.join(ev.tasks)}; limit {ev.limit}), "
          f"{args.workers} workers; questions per model: {rows[0]['questions']['base']}")
    for r in rows:
        r.update({f"replay_{k}_s": v for k, v in policy_makespans(r["unit_times"], args.workers).items()})
    print_table(rows, [("schedule", "schedule", ""), ("jobs", "jobs", "d"), ("wall_s", "wall s", ".0f"),
                       ("work_s", "unit work s", ".0f"), ("idle_share", "idle share", ".1%"),
                       ("replay_whole_s", "replayed: whole s", ".0f"), ("replay_units_s", "replayed: units s", ".0f")])
    print("replayed: both policies on this run's measured unit times (greedy, queue order; no start-up)")
    if len(rows) == 2:
        print(f"wall time units / whole: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x "
              f"(one run each, order {args.order}); largest score difference between schedules: {diff:.2e}")
    write_json(args.out, {"config": args.config, "models": args.models, "workers": args.workers,
                          "limit": ev.limit, "families": list(ev.tasks), "max_score_diff": diff,
                          "rows": [{k: v for k, v in r.items() if k != "scores"} for r in rows]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
