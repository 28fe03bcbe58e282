"""``python -m pipeline.server [--backend-store-uri URI] [--artifacts-destination DIR|URI] [--host H] [--port P]``

A lean shared MLflow tracking server for sweeps on a cluster: ``mlflow server`` with one
worker process (``--workers 1``) and job execution off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION
=false``), which together cut its resident memory from ~1.8 GB to ~450 MB; artifacts are
proxied (``mlflow-artifacts:/``), so clients need no access to the artifact store. Bound to
127.0.0.1 unless ``--host`` says otherwise. The backend store can be sqlite (one machine) or
PostgreSQL (``postgresql://user:pass@host/db``, several machines).

Point the pipeline at it with ``base.mlflow.tracking_uri: http://HOST:PORT`` (or
``--tracking-uri`` for ``pipeline.cluster.submit``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from pipeline.runtime import free_port


def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination, "--serve-artifacts", "--host", host,
            "--port", str(port), "--workers", "1"]


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _absolute(backend_store_uri: str, artifacts_destination: str) -> tuple[str, str]:
    if backend_store_uri.startswith("sqlite:///") and not backend_store_uri.startswith("sqlite:////"):
        backend_store_uri = f"sqlite:///{Path(backend_store_uri[len('sqlite:///'):]).resolve()}"
    if "://" not in artifacts_destination:
        artifacts_destination = str(Path(artifacts_destination).resolve())
    return backend_store_uri, artifacts_destination


def wait_healthy(url: str, timeout: float = 300.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited with code {proc.returncode} before answering at {url}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"MLflow server at {url} did not answer /health within {timeout:.0f}s")


def start_server(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
                 log_path: Optional[Path] = None, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start the server in its own process group and wait until it answers; (process, URL).

    ``port=0`` picks a free port; if another process takes it before the server binds it (the
    server then exits at once), a new one is picked, ``attempts`` times in all."""
    backend_store_uri, artifacts_destination = _absolute(backend_store_uri, artifacts_destination)
    for attempt in range(attempts if port == 0 else 1):
        p = port or free_port()
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(server_command(backend_store_uri, artifacts_destination, host, p), env=server_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{host}:{p}"
        try:
            wait_healthy(url, proc=proc)
            return proc, url
        except Exception:
            exited = proc.poll() is not None  # could not bind (or died), as opposed to a timeout
            stop_server(proc)
            if port or not exited or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn worker
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend-store-uri", default="sqlite:///mlflow-server.db")
    ap.add_argument("--artifacts-destination", default="mlartifacts-server")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (put it behind auth)")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    backend, artifacts = _absolute(args.backend_store_uri, args.artifacts_destination)
    cmd = server_command(backend, artifacts, args.host, args.port)
    print(f"MLflow server on http://{args.host}:{args.port} (backend {backend}, artifacts {artifacts}); "
          "1 worker, job execution off", flush=True)
    os.execve(sys.executable, cmd, server_env())  # replaces this process: signals reach mlflow directly
