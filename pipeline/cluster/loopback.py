"""A real multi-process Ray cluster on loopback (head plus workers) for tests and benchmarks."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from pipeline.runtime import free_port

RAY = str(Path(sys.executable).parent / "ray")


class LoopbackCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, base: Optional[Path] = None, token: bool = True,
                 gpus_per_node: int = 0):
        """``gpus_per_node``: GPUs each node declares to Ray (logical: Ray schedules them and sets
        CUDA_VISIBLE_DEVICES whether or not the machine has any)."""
        # short path: Ray's unix socket paths have a length limit
        self.base = Path(base or tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp"))
        self.nodes, self.cpus, self.gpus = nodes, cpus_per_node, gpus_per_node
        self.gcs_port, self.dash_port = free_port(), free_port()
        # as if `ray start` ran in the activated venv: a job's `python` is the cluster's interpreter
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path}
        self.env.pop("RAY_ADDRESS", None)
        if token:
            tok = self.base / "token"
            tok.write_text(secrets.token_hex(32))
            self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tok)})
        self.procs: list[subprocess.Popen] = []
        self.last_probe_error = ""

    @property
    def address(self) -> str:
        """The GCS address (RAY_ADDRESS for drivers)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard / Jobs API URL (``--address`` for pipeline.cluster.submit)."""
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (driver, ``pipeline.cluster.submit``) needs to talk to this cluster."""
        return {k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in self.env}

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        # the dashboard agent's HTTP port defaults to 52365 for every Ray on the machine: when another
        # instance holds it, this node's agent runs without HTTP and the Jobs API answers "No available
        # agent to submit job". 0 lets each node's agent bind a free port (Ray records it per node).
        p = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                              "--dashboard-agent-listen-port", "0",
                              "--num-cpus", str(self.cpus), "--num-gpus", str(self.gpus), *args], env=self.env,
                             start_new_session=True,
                             stdout=open(self.base / log, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start(self, attempts: int = 3) -> "LoopbackCluster":
        for attempt in range(attempts):
            self._start(["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dash_port), "--temp-dir", str(self.base / "head")], "head.log")
            try:
                self.wait(lambda: len(self.alive_nodes()) == 1, "head node")
                break
            except RuntimeError:  # `ray start` exited: a port it was given was taken in the meantime
                if attempt == attempts - 1:
                    raise
                self.stop(cleanup=False)
                self.procs = []
                self.gcs_port, self.dash_port = free_port(), free_port()
        for i in range(1, self.nodes):
            self._start(["--address", self.address, "--temp-dir", str(self.base / f"node{i}")], f"node{i}.log")
        self.wait(lambda: len(self.alive_nodes()) == self.nodes, f"{self.nodes} nodes")
        self.wait(self.jobs_api_up, "Jobs API")
        return self

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a `ray start` exited while waiting for the {what}: "
                                   + (self.base / "head.log").read_text()[-2000:])
            try:
                if cond():
                    return
            except Exception:
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not up in {timeout:.0f}s: {self.last_probe_error}")

    def _probe(self, code: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        self.last_probe_error = out.stderr[-1500:]
        return out

    def alive_nodes(self) -> list[str]:
        out = self._probe("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
                          "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def jobs_api_up(self) -> bool:
        return self._probe("from ray.job_submission import JobSubmissionClient; "
                           "JobSubmissionClient(%r).list_jobs()" % self.dashboard).returncode == 0

    def stop(self, cleanup: bool = True, grace_s: float = 5.0) -> list[int]:
        """Stop every process of this cluster; the PIDs still running afterwards (should be none).

        SIGTERM to every node's process group, then SIGKILL to what is left after ``grace_s``: a node
        whose peer is already gone (its head, or the last worker node) otherwise waits about 30 s
        for it before exiting."""
        for p in self.procs[::-1]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + grace_s
        for p in self.procs[::-1]:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs[::-1]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        for pid in self.leftovers():  # a process of the cluster outside its node's group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while time.time() < deadline and self.leftovers():
            time.sleep(0.2)
        left = self.leftovers()
        if cleanup and not left:
            shutil.rmtree(self.base, ignore_errors=True)
        return left

    def leftovers(self) -> list[int]:
        """PIDs whose command line points into this cluster's temp dir."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if str(self.base).encode() in (d / "cmdline").read_bytes():
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
