"""``python -m pipeline.sweep SWEEP.yaml [--set ...] [--resume DIR]``: run a sweep, print where it went."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from pipeline.claims import confirm_metric
from pipeline.config.cli import base_parser, fail, user_errors
from pipeline.config.sweep import SweepConfig, load_sweep_config
from pipeline.sweep.console import Console
from pipeline.sweep.driver import LOG_FILE, run_sweep
from pipeline.sweep.stages import PostSweepError


def main(argv=None) -> int:
    ap = base_parser("python -m pipeline.sweep", __doc__, "sweep YAML (see sweeps/)", "tune.num_samples=16")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                    help="continue an interrupted sweep (default: the latest one of this name)")
    ap.add_argument("--retry-errored", action="store_true",
                    help="with --resume: run the trials that ended in an error again, each from its last "
                         "checkpoint (finished trials are never rerun)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every worker's output, warnings and Ray's log lines live (they are always in "
                         f"the sweep directory's {LOG_FILE}, attached to the parent run)")
    args = ap.parse_args(argv)
    if args.retry_errored and args.resume is None:
        ap.error("--retry-errored only applies with --resume")
    try:
        cfg = load_sweep_config(args.config, args.overrides)
    except user_errors() as e:
        return fail(e)

    if not args.verbose:  # third-party progress bars in this process, at their source
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = Console(verbose=args.verbose)
    try:
        with console:
            try:
                code = _run_and_report(cfg, args, console)
            except Exception:  # the traceback goes in the log too
                import traceback

                traceback.print_exc()
                return 1
            finally:  # Ray flushes its deduplicated worker lines at shutdown: through the console, not after it
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            if console.path:
                print(f"log: {console.path}")
            return code
    finally:
        _attach_log(console)


def _attach_log(console) -> None:
    """The whole console log (what the terminal showed and what it did not) on the parent run."""
    if not (console.path and console.attach_to):
        return
    try:
        from mlflow.tracking import MlflowClient

        uri, run_id = console.attach_to
        MlflowClient(uri).log_artifact(run_id, str(console.path), "logs")
    except Exception as e:  # the log stays in the sweep directory
        print(f"warning: could not attach {console.path} to the parent run: {e}", file=sys.stderr)


def _run_and_report(cfg: SweepConfig, args, console) -> int:
    try:
        out = run_sweep(cfg, args.config, args.resume, console, retry_errored=args.retry_errored)
    except user_errors() as e:
        return fail(e)
    except PostSweepError as e:  # the sweep itself is complete and recorded
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out.get("interrupted"):
        return 130
    s, best = out["summary"], out["best"]
    print(f"\nsweep {cfg.name} finished in {out['wall_s']:.0f}s: {s['trials']} trials "
          f"({s['done']} done, {s['stopped']} stopped early by ASHA, {s['errored']} failed)")
    if best:
        params = ", ".join(f"{k}={best[k]}" for k in cfg.search)
        se = best.get(f"{cfg.tune.metric}_stderr")
        cm = confirm_metric(cfg.tune.metric)
        confirmed = (f"; on the confirmation split {cm} = {best[cm]:.4f} ± {best.get(cm + '_stderr', math.nan):.4f}"
                     if best.get(cm) is not None else "")
        print(f"best {cfg.tune.metric} = {best[cfg.tune.metric]:.4f}" + (f" ± {se:.4f}" if se is not None else "")
              + f" on the selection split (trial {best['trial_id']}){confirmed}: {params}")
        for sentence in (out.get("verdict"), out.get("vs_base")):
            if sentence:
                print(sentence[0].upper() + sentence[1:] + ".")
        print(open(Path(out["sweep_dir"]) / "report" / "trials.md").read().rstrip())
    t = out["timing"]
    share = t.get("sweep/outside_training_fraction")
    print(f"time outside training loops (Ray/worker start-up, model load, scheduling, idle slots): "
          + (f"{100 * share:.1f}% of {t['sweep/slots']} slot(s) x {t['sweep/wall_s']:.0f}s" if share is not None
             else "not measured (a resumed sweep)")
          + (f"; a trial's start-up before its first step: median {t['sweep/trial_startup_median_s']:.1f}s"
             if "sweep/trial_startup_median_s" in t else "")
          + (f" (first trial {t['sweep/trial_startup_first_s']:.1f}s, later trials median "
             f"{t['sweep/trial_startup_later_median_s']:.1f}s)" if "sweep/trial_startup_later_median_s" in t else ""))
    if out.get("eval"):
        ev = out["eval"]
        head = f", {len(ev['tail'])} of them started in the sweep's tail" if ev.get("tail") else ""
        print(f"eval stage ({ev['wall_s']:.0f}s after the trials{head}): {len(ev['rows'])} model(s) -> {cfg.eval.tasks}; "
              f"adapters registered as '{ev['registry']}' versions {sorted(ev['versions'].values(), key=int)}")
        print(open(Path(out["sweep_dir"]) / "eval" / "comparison.md").read().rstrip())
    uri = out["tracking_uri"]
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    how = "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}, then "
    print(f"MLflow: {how}open {ui}/{out['ui_view']} (experiment '{out['experiment']}', parent run "
          f"{out['parent_run_id']}: its description has this summary)")
    return 0
