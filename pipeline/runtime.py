"""Where the pipeline runs: the local Ray instance, worker resources, free ports and the cache root."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional


def error_line(e: BaseException) -> str:
    """One line for a run's ``error`` tag: the exception's first line, and for Ray Train's
    WorkerGroupError (whose first line only says that workers failed) the lowest failed rank's own."""
    def first(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0] if text else ''}"

    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError's original exception
        return f"{type(e).__name__} (rank {rank}): {first(cause)}"[:500]
    return first(e)[:500]


# ----------------------------------------------------------------------------------- driver side
def ensure_ray(quiet: bool = False, worker_env: Optional[dict[str, str]] = None,
               resources: Optional[dict[str, float]] = None) -> None:
    """Connect to RAY_ADDRESS if set, else start a local single-node Ray (dashboard bound to
    127.0.0.1). The dashboard stays on: Ray Train's placement-group cleaner queries the state
    API it serves. ``worker_env``: extra environment variables for every worker process;
    ``resources``: what a local Ray declares (``num_cpus``, ``num_gpus``), default the machine's."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("RLORA_", "HF_")) or k == "PYTHONPATH"}
    env.update(worker_env or {})
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray Job's driver: the job's runtime_env
        # (working_dir, env_vars) already reaches every worker
        ray.init(log_to_driver=not quiet, **({"runtime_env": {"env_vars": worker_env}} if worker_env else {}))
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not quiet, runtime_env={"env_vars": env})
        return
    _start_local_ray(env, quiet, resources=resources)


def _start_local_ray(env: dict[str, str], quiet: bool, attempts: int = 3,
                     resources: Optional[dict[str, float]] = None) -> None:
    """Start a single-node Ray on 127.0.0.1 whose workers know its address (RAY_ADDRESS).

    Ray's state API, which Ray Train's placement-group cleaner calls from inside the cluster,
    finds "the" local cluster by scanning processes when RAY_ADDRESS is unset: with a second Ray
    instance on the machine (a notebook, a test suite) it fails, the cleaner dies and a sweep with
    ASHA waits forever for resources its stopped trials still hold. So the GCS port is chosen here
    (retried if another process takes it first) and passed to every worker."""
    import ray

    for attempt in range(attempts):
        port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node ray.init starts
        try:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                     log_to_driver=not quiet, **(resources or {}),
                     runtime_env={"env_vars": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}})
            return
        except Exception:
            if ray.is_initialized() or attempt == attempts - 1:
                raise
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def use_gpu_for(setting) -> bool:
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return bool(setting)


def worker_resources(scaling, use_gpu: bool) -> dict[str, float]:
    """One Train worker's Ray resources: its CPUs, and its (possibly fractional) GPU share."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}


def torch_backend(scaling, use_gpu: bool) -> str:
    """``scaling.backend``; auto: nccl for GPU workers when this torch is a CUDA build (the driver may
    run on a node without GPUs), gloo otherwise (also for GPUs declared to Ray on a CPU-only build)."""
    if scaling.backend != "auto":
        return scaling.backend
    import torch

    return "nccl" if use_gpu and torch.backends.cuda.is_built() else "gloo"


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out for bind(0) and outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


# Ray's own defaults below this: its client server (10001) and its workers' ports (10002-19999)
RAY_RESERVED_BELOW = 20_000


def free_port(attempts: int = 200) -> int:
    """A free loopback port for a server started later: outside the kernel's ephemeral range, so no
    outgoing connection or bind(0) of any process can be given it between now and then (a port from
    bind(0) is one the kernel may hand to the next process that asks), and above the ports Ray
    reserves for its workers."""
    import random

    low, _ = ephemeral_ports()
    rng = random.SystemRandom()
    for _ in range(attempts if low > RAY_RESERVED_BELOW + 1000 else 0):
        port = rng.randrange(RAY_RESERVED_BELOW, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:  # the range below is full: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_root() -> Path:
    root = os.environ.get("RLORA_CACHE_DIR") or Path.home() / ".cache" / "rlora-lab"
    return Path(root)
