"""``python -m benchmarks.ui_screenshots``: what a person sees in the MLflow UI after a sweep, as PNGs.

Starts an MLflow server on the project's store (``--tracking-uri``, default ``sqlite:///mlflow.db``),
takes the latest sweep of ``--experiment`` (its parent run, or ``--parent``) and opens in headless
Chromium (Debian's ``chromium``): the experiment as it opens, the sweep's runs table (the view the
sweep stores: trials expanded, metric and parameter columns), the chart view, the parent run (its
description holds the sweep's summary) and the best trial's run (dataset, logged model). Writes
``docs/ui-*.png``; the README's "Comparing runs in the MLflow UI" section shows them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.cluster.server import start_server, stop_server
from pipeline.tracking import UI_MODEL_TRAINING, default_artifact_root, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("error: no Chromium here: apt-get install -y chromium")


def screenshot(browser: str, url: str, out: Path, size: str = "1600,1000", budget_ms: int = 20000) -> Path:
    """The page after ``budget_ms`` of virtual time (the UI is a single-page app that loads its data)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    return out


def latest_sweep(client, experiment: str, parent: str | None):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in this store (run `make sweep` first)")
    if parent:
        return exp, client.get_run(parent)
    runs = client.search_runs([exp.experiment_id], "tags.`rlora.ui_view` != ''", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"error: no finished sweep in experiment {experiment!r}")
    return exp, runs[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default=None, help="default: the one sweeps/heads_gamma.yaml logs to")
    ap.add_argument("--parent", default=None, help="the sweep's parent run id (default: the latest sweep)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    from mlflow import MlflowClient

    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft, torch

    browser = chromium()
    uri = resolve_tracking_uri(args.tracking_uri)
    experiment = args.experiment or load_sweep_config(ROOT / "sweeps" / "heads_gamma.yaml").base.mlflow.experiment
    client = MlflowClient(tracking_uri=uri)
    exp, parent = latest_sweep(client, experiment, args.parent)
    best = parent.data.tags.get("best_run")
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(uri, default_artifact_root(uri) or str(Path(tmp) / "artifacts"), port=0,
                                   log_path=Path(tmp) / "server.log")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            view = parent.data.tags["rlora.ui_view"]
            pages = {
                "ui-experiment-default.png": f"{url}/#/experiments/{exp.experiment_id}",  # a new browser: GenAI
                "ui-experiment.png": f"{url}/#/experiments/{exp.experiment_id}?{UI_MODEL_TRAINING}",
                "ui-runs.png": f"{url}/{view}",
                "ui-charts.png": f"{url}/{view}&compareRunsMode=CHART",
                "ui-parent-run.png": f"{url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}?{UI_MODEL_TRAINING}",
            }
            if best:
                pages["ui-best-trial.png"] = f"{url}/#/experiments/{exp.experiment_id}/runs/{best}?{UI_MODEL_TRAINING}"
            for name, page in pages.items():
                screenshot(browser, page, args.out / name, size="2200,1300" if "run" in name else "2200,1000")
                print(f"{args.out / name}  <- {page}", flush=True)
        finally:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
