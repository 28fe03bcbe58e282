"""Resident memory of the MLflow tracking server: stock settings vs the lean ones
``pipeline.cluster.server`` uses (``--workers 1``, job execution off).

``python -m benchmarks.mlflow_server`` starts each configuration on a free port, waits for
/health, logs a few runs with metrics and an artifact over HTTP, then sums the RSS of the
server's whole process tree (it forks workers). Prints a table, writes results/mlflow_server.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cluster.server import server_command, server_env, stop_server, wait_healthy
from pipeline.runtime import free_port

OUT = Path(__file__).parent / "results" / "mlflow_server.json"


def tree_rss_mb(pid: int) -> float:
    """Sum of RSS over the process and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def measure(name: str, lean: bool, work: Path) -> dict:
    from mlflow import MlflowClient

    port = free_port()
    cmd = server_command(f"sqlite:///{work / f'{name}.db'}", str(work / f"{name}-artifacts"), "127.0.0.1", port)
    if not lean:  # mlflow's defaults: 4 workers, job execution on
        i = cmd.index("--workers")
        del cmd[i : i + 2]
    env = server_env() if lean else {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        ready_s = time.time() - t0
        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("bench")
        (work / "a.txt").write_text("x" * 10000)
        for _ in range(5):
            r = client.create_run(exp)
            for step in range(20):
                client.log_metric(r.info.run_id, "loss", 1.0 / (step + 1), step=step)
            client.log_artifact(r.info.run_id, str(work / "a.txt"))
        time.sleep(3)
        return {"config": name, "workers": "1" if lean else "default (4)", "job_execution": not lean,
                "rss_mb": round(tree_rss_mb(proc.pid), 1), "ready_s": round(ready_s, 1)}
    finally:
        stop_server(proc)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        rows = [measure("stock", False, Path(d)), measure("lean", True, Path(d))]
    ratio = rows[1]["rss_mb"] / rows[0]["rss_mb"]
    print(f"{'config':8s} {'workers':12s} {'job exec':9s} {'RSS (MB)':>9s} {'ready (s)':>9s}")
    for r in rows:
        print(f"{r['config']:8s} {r['workers']:12s} {str(r['job_execution']):9s} {r['rss_mb']:9.0f} {r['ready_s']:9.1f}")
    print(f"lean / stock RSS: {ratio:.2f}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "lean_over_stock_rss": round(ratio, 3)}, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
