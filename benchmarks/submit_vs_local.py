"""Wall time of one sweep run locally vs submitted as a Ray Job.

``python -m benchmarks.submit_vs_local [--config sweeps/smoke.yaml]`` starts a lean MLflow
server, runs the sweep with ``pipeline.sweep`` (local Ray, this machine's CPUs), then starts a
one-node loopback Ray cluster with the same CPUs and submits the same sweep with
``pipeline.cluster.submit --wait``. Both log to the server. Prints a table, writes
results/submit_vs_local.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cluster.loopback import LoopbackCluster
from pipeline.cluster.server import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "submit_vs_local.json"


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {rc}); see {log}")
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.submit_vs_local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sweeps/smoke.yaml")
    args = ap.parse_args(argv)
    cpus = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    server, url = start_server(f"sqlite:///{work / 'server.db'}", str(work / "artifacts"), port=0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    try:
        local = timed([sys.executable, "-m", "pipeline.sweep", args.config, "--set", f"base.mlflow.tracking_uri={url}",
                       "--set", "base.mlflow.experiment=bench-local", "--set", f"base.output_dir={work / 'local'}"],
                      env, work / "local.log")
        t0 = time.time()
        cluster = LoopbackCluster(nodes=1, cpus_per_node=cpus).start()
        cluster_start = time.time() - t0
        try:
            job = timed([sys.executable, "-m", "pipeline.submit", "--address", cluster.dashboard, args.config,
                         "--tracking-uri", url, "--wait", "--set", "base.mlflow.experiment=bench-job",
                         "--set", f"base.output_dir={work / 'job'}"], {**env, **cluster.client_env}, work / "job.log")
        finally:
            cluster.stop()
    finally:
        stop_server(server)
    row = {"config": args.config, "cpus": cpus, "local_s": round(local, 1), "job_s": round(job, 1),
           "cluster_start_s": round(cluster_start, 1), "job_over_local": round(job / local, 3)}
    print(f"{'sweep':22s} {'local (s)':>9s} {'Ray Job (s)':>11s} {'job/local':>9s} {'cluster start (s)':>17s}")
    print(f"{args.config:22s} {local:9.0f} {job:11.0f} {job / local:9.2f} {cluster_start:17.0f}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {OUT} (logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
