"""An unreachable MLflow server is reported in one line, exit 2, before any compute starts."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dead_uri() -> str:
    """An http URI on a loopback port where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("entry", ["train", "sweep", "eval.run", "eval.compare"])
def test_unreachable_tracking_server_is_one_line_before_compute(entry, tmp_path):
    uri = dead_uri()
    argv = {
        "train": ["pipeline.train", "configs/five_task.yaml", "--set", f"mlflow.tracking_uri={uri}",
                  "--set", f"output_dir={tmp_path}"],
        "sweep": ["pipeline.sweep", "sweeps/smoke.yaml", "--set", f"base.mlflow.tracking_uri={uri}",
                  "--set", f"base.output_dir={tmp_path}"],
        "eval.run": ["eval.run", "--adapter", "none", "--tasks", "mmlu", "--tracking-uri", uri,
                     "--out", str(tmp_path / "x.json")],
        "eval.compare": ["eval.compare", "a" * 32, "b" * 32, "--tracking-uri", uri],
    }[entry]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert err.count("\n") == 0 and err.startswith("error: ") and uri in err and "unreachable" in err, err
    assert time.time() - t0 < 120
    # nothing was started: no Ray, no sweep/run directories, no model conversion
    assert "Ray" not in proc.stdout + proc.stderr and not any(tmp_path.iterdir())
