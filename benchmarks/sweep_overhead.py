"""``python -m benchmarks.sweep_overhead [sweep.yaml] [--set key=value ...]``: where a sweep's
slot-time goes.

Runs the sweep (``python -m pipeline.sweep``, eval stage off, a fresh sqlite store, output
directory and tokenised-mixture cache), then reads every trial's phase times (``time/phase/*``, see ``pipeline.timeline``) from
its MLflow run and splits the slot-time (slots x sweep wall time) into: the sweep's own set-up
before the first trial (Ray start, parent run, Tune), each trial phase summed over trials (start-up:
driver, Ray Train, worker init, model, adapter, data, tracking; training loop; finish and upload),
between-trial gaps of busy slots (Tune's trial start/stop), idle slots while fewer trials than
slots run, and the summary after the last trial. ``--with-eval`` keeps the eval stage and adds
the whole command's wall time and the stage's time after the trials. ``--before KEY=VALUE`` adds a second arm with
those overrides (e.g. ``tune.reuse_actors=false``), ``--before-rev REV`` one on an earlier commit's
code (a git worktree; both at once: that code with those overrides); ``--repeats`` runs each arm that many times,
alternating, and the table shows mean ± standard error over the repeats. ``--read TRACKING_URI
PARENT_RUN_ID`` runs nothing and breaks down a finished sweep (e.g. a ``make sweep``). Writes JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_json
from pipeline.data import data_dir
from pipeline.timeline import PHASES, startup_summary


def slot_breakdown(parent: tuple[float, float], trials: list[dict], slots: int) -> dict[str, float]:
    """Seconds of slot-time per category. ``parent``: the sweep's (start, end) (epoch s);
    ``trials``: ``{"span": (start, end), "phases": {name: s}}`` per trial."""
    first = min(t["span"][0] for t in trials)
    last = max(t["span"][1] for t in trials)
    out = {"sweep set-up (before the first trial)": slots * (first - parent[0])}
    names = {k for t in trials for k in t["phases"]}

    for name in [p for p in PHASES if p in names]:
        out[f"trial: {name}"] = sum(t["phases"].get(name, 0.0) for t in trials)
    in_trials = sum(t["span"][1] - t["span"][0] for t in trials)
    out["trial: unaccounted"] = in_trials - sum(v for k, v in out.items() if k.startswith("trial: "))
    # a slot is idle where fewer trials than slots run: slot-time in the trial window minus the
    # trials' own time (gaps between one trial's end and the next one's start included)
    out["between/idle slots"] = slots * (last - first) - in_trials
    out["summary (after the last trial)"] = slots * (parent[1] - last)
    return out


def read_sweep(tracking_uri: str, parent_id: str) -> tuple[tuple[float, float], list[dict], int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    if not parent.info.end_time or "sweep/slots" not in parent.data.metrics:
        sys.exit(f"error: sweep {parent_id} has not finished (run {parent.info.status}): nothing to break down")
    exp = parent.info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
    trials, missing = [], 0
    for r in runs:
        phases = {k.removeprefix("time/phase/").removesuffix("_s"): v for k, v in r.data.metrics.items()
                  if k.startswith("time/phase/")}
        if r.info.end_time and phases:
            end = r.info.end_time / 1e3  # FINISHED right after the last stamp; the phases tile the run
            trials.append({"run_id": r.info.run_id, "span": (end - sum(phases.values()), end),
                           "phases": phases, "setup_s": r.data.metrics.get("time/startup_s")})
        elif r.data.tags.get("rlora.trial_id"):  # e.g. a stopped trial of a version that did not log its phases
            missing += 1
    if missing:
        print(f"warning: {missing} trial run(s) without phase times: their slot-time counts as idle", file=sys.stderr)
    if not trials:
        sys.exit(f"error: sweep {parent_id} has no trial runs with phase times (e.g. tune.seeds > 1: "
                 "its seed runs are not broken down)")
    trials.sort(key=lambda t: t["span"][0])
    slots = int(parent.data.metrics["sweep/slots"])
    return (parent.info.start_time / 1e3, parent.info.end_time / 1e3), trials, slots


def run_once(config: str, overrides: list[str], with_eval: bool = False, code: str | None = None) -> dict:
    """One sweep in a fresh store, output directory and mixture cache; its slot-time breakdown
    (``with_eval``: its eval stage too, and the whole command's wall time). ``code``: a checkout
    whose ``pipeline``/``eval`` packages run instead of the installed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAY_ADDRESS": "", "RLORA_MIXTURE_DIR": f"{tmp}/mixtures"}
        if code:  # the data directory this checkout finds (the default is relative to a checkout)
            env.setdefault("RLORA_DATA_DIR", str(data_dir()))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [sys.executable, "-m", "pipeline.sweep", str(Path(config).resolve()),
               *([] if with_eval else ["--set", "eval.enabled=false"]), "--set", f"base.mlflow.tracking_uri={uri}",
               "--set", f"base.output_dir={tmp}/out", *[x for o in overrides for x in ("--set", o)]]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        parent_id = re.search(r"MLflow parent run (\w+)", proc.stdout).group(1)
        out = analyse(uri, parent_id)
    if with_eval:  # the stage after the trials, and how many models it found already started in the tail
        stage = re.search(r"^eval stage \((\d+)s after the trials", proc.stdout, re.M)
        tail = re.search(r"(\d+) started in the sweep's tail", proc.stdout)
        out.update({"command_wall_s": wall, "eval_after_trials_s": float(stage.group(1)) if stage else None,
                    "models_started_in_tail": int(tail.group(1)) if tail else 0})
    return out


def analyse(tracking_uri: str, parent_id: str) -> dict:
    """The slot-time breakdown of a finished sweep, from its MLflow runs."""
    parent, trials, slots = read_sweep(tracking_uri, parent_id)
    total = slots * (parent[1] - parent[0])
    cats = slot_breakdown(parent, trials, slots)
    startup = startup_summary([(t["span"][0], t["setup_s"]) for t in trials])  # the sweep's own split
    return {"trials": len(trials), "slots": slots, "sweep_s": parent[1] - parent[0], "slot_s": total,
            "outside_training_share": 1 - cats.get("trial: loop", 0.0) / total, "categories": cats,
            "startup_first_s": startup.get("sweep/trial_startup_first_s"),
            "startup_later_median_s": startup.get("sweep/trial_startup_later_median_s"),
            "trial_phases": [t["phases"] for t in trials]}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def cell(values: list[float | None], fmt: str) -> str:
    if any(v is None for v in values):  # e.g. no later trials
        return "–"
    m, se = mean_se(values)
    return format(m, fmt) + (f" ± {format(se, fmt)}" if se is not None else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="sweeps/smoke.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="sweep config override for every arm (repeatable), e.g. tune.num_samples=6")
    ap.add_argument("--before", action="append", default=[], metavar="KEY=VALUE",
                    help="also run a 'before' arm with these overrides (repeatable), e.g. tune.reuse_actors=false")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps per arm (arms alternate)")
    ap.add_argument("--with-eval", action="store_true",
                    help="keep the sweep's eval stage on and report the whole command's wall time (e.g. with "
                         "--before eval.overlap=false: the stage's head start in the sweep's tail)")
    ap.add_argument("--before-rev", metavar="REV",
                    help="also run a 'before' arm on git revision REV's code (a temporary worktree), e.g. HEAD~3")
    ap.add_argument("--read", nargs=2, metavar=("TRACKING_URI", "PARENT_RUN_ID"),
                    help="run nothing: break down a finished sweep (e.g. the main job's) from its MLflow runs")
    ap.add_argument("--out", type=Path, help="JSON written (default benchmarks/results/sweep_overhead-cpu.json, "
                                             "with --read sweep_overhead-read-cpu.json)")
    args = ap.parse_args(argv)
    if args.read:
        if args.before or args.before_rev or args.overrides or args.with_eval or args.repeats != 1:
            ap.error("--read takes no sweep settings: it runs nothing")
        return report({"read": [analyse(*args.read)]}, args, args.out or Path("benchmarks/results/sweep_overhead-read-cpu.json"))

    arms = {"before": args.overrides + args.before, "as configured": args.overrides} \
        if args.before or args.before_rev else {"as configured": args.overrides}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as wt:
        code = None
        if args.before_rev:
            code = f"{wt}/code"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", code, args.before_rev], check=True)
        try:
            for k in range(args.repeats):
                for arm, overrides in arms.items():
                    print(f"sweep_overhead: {arm} #{k + 1} ...", flush=True)
                    runs[arm].append(run_once(args.config, overrides, args.with_eval,
                                              code if arm == "before" else None))
        finally:
            if code:
                subprocess.run(["git", "worktree", "remove", "--force", code], check=False)
    report(runs, args, args.out or Path("benchmarks/results/sweep_overhead-cpu.json"))


def report(runs: dict[str, list[dict]], args, out: Path) -> None:
    first = next(iter(runs.values()))[0]
    what = f"sweep {args.read[1]} ({args.read[0]})" if args.read else f"{args.config} {' '.join(args.overrides)}"
    print(f"\n{what}: {first['trials']} trials, {first['slots']} slot(s); "
          f"mean ± se over {args.repeats} sweep(s) per arm; slot-seconds")
    cats = list(dict.fromkeys(c for rs in runs.values() for r in rs for c in r["categories"]))
    rows = [{"category": c, **{a: cell([r["categories"].get(c, 0.0) for r in rs], ".1f") for a, rs in runs.items()}}
            for c in cats]
    for key, label, fmt in [("slot_s", "slot-time", ".0f"), ("outside_training_share", "outside training loops", ".3f"),
                            ("startup_first_s", "start-up, first trial (s)", ".1f"),
                            ("startup_later_median_s", "start-up, later trials, median (s)", ".1f"),
                            *([("command_wall_s", "sweep + eval stage, wall (s)", ".0f"),
                               ("eval_after_trials_s", "eval stage after the trials (s)", ".0f"),
                               ("models_started_in_tail", "models started in the sweep's tail", ".1f")]
                              if args.with_eval else [])]:
        rows.append({"category": label, **{a: cell([r[key] for r in rs], fmt) for a, rs in runs.items()}})
    print_table(rows, [("category", "where the slot-time went", ""), *[(a, a, "") for a in runs]])
    write_json(out, {"config": None if args.read else args.config, "read": args.read, "overrides": args.overrides, "before": args.before,
                     "before_rev": args.before_rev and subprocess.run(
                         ["git", "rev-parse", "--short", args.before_rev], capture_output=True,
                         text=True).stdout.strip(),
                     "with_eval": args.with_eval, "repeats": args.repeats, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
