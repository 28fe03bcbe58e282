"""``python -m pipeline.submit --address http://HEAD:8265 sweeps/x.yaml [--tracking-uri http://MLFLOW:5000] [--wait]``

Submits a sweep (and its eval stage, which runs at its end) to a Ray cluster as a Ray Job,
through ``ray.job_submission.JobSubmissionClient``. The project directory is shipped as the
job's ``working_dir`` (virtual environments, caches, outputs, local MLflow stores and the git
directory excluded); the MLflow tracking URI and the data directory reach the job through its
entrypoint and environment. The sweep YAML is validated here first, and an HTTP tracking
server is checked for reachability before anything is submitted.

Prints the job id; with ``--wait`` streams the job's logs and exits non-zero unless the job
succeeds. Ray's token authentication (the default for clusters Ray starts locally, and for
all clusters from Ray 2.61) is used as Ray configures it (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); ``--token-file`` sends that token
explicitly. A cluster that rejects the token is reported in one line, never bypassed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline.cluster.manifests import (
    ManifestError,
    add_cluster_args,
    gpu_overrides,
    k8s_name,
    raycluster,
    rayjob,
    shape_from_args,
)
from pipeline.config.cli import fail, user_errors
from pipeline.data.core import ENV_VAR, DataError
from pipeline.data.core import data_dir as local_data_dir
from pipeline.tracking import check_reachable

ROOT = Path(__file__).resolve().parents[2]
EXCLUDES = [".git", ".venv", "venv", ".cache", "__pycache__", "*.pyc", "outputs", "mlruns", "mlartifacts",
            "mlartifacts-server", "*.db", ".pytest_cache", "benchmarks/results", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission problem worth one line (bad address, auth, unreachable MLflow)."""


def entrypoint(config: str, tracking_uri: Optional[str], overrides: list[str]) -> str:
    """The job's command line: the sweep, with the tracking URI pinned for every trial."""
    args = ["python", "-m", "pipeline.sweep", config]
    if tracking_uri:
        args += ["--set", f"base.mlflow.tracking_uri={tracking_uri}"]
    for o in overrides:
        args += ["--set", o]
    return shlex.join(args)


def runtime_env(tracking_uri: Optional[str], data_dir: Optional[str]) -> dict:
    env = {"PYTHONUNBUFFERED": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("HF_")})  # e.g. HF_HUB_OFFLINE
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if data_dir:
        env["RLORA_DATA_DIR"] = data_dir
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}


def config_in_project(config: str) -> str:
    """The sweep YAML as a path inside the shipped project (the job runs in the working_dir copy)."""
    p = Path(config).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        raise SubmitError(f"{config}: the sweep YAML must be inside the project ({ROOT}) to be shipped with it") from None


def check_tracking_uri(uri: str) -> None:
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_absolute():
        raise SubmitError(f"tracking URI {uri}: a relative sqlite path would land inside the job's temporary "
                          "working_dir; use a shared MLflow server (python -m pipeline.server) or an absolute path")
    check_reachable(uri)


def make_client(address: str, token_file: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    headers = None
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise SubmitError(f"--token-file: {e}") from None
        headers = {"Authorization": f"Bearer {token}"}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, auth rejected, not a Ray dashboard
        raise SubmitError(f"Ray cluster at {address}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def submit(address: str, config: str, tracking_uri: Optional[str], overrides: list[str],
           data_dir: Optional[str] = None, token_file: Optional[str] = None, job_id: Optional[str] = None) -> tuple:
    """Validate, then submit; returns (client, job id, entrypoint)."""
    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft, torch

    cfg = load_sweep_config(config, overrides)  # one-line ConfigError before anything leaves this machine
    uri = tracking_uri or cfg.base.mlflow.tracking_uri
    check_tracking_uri(uri)
    if data_dir is None:  # the path resolved here ($RLORA_DATA_DIR or ../shared/data), taken to be the
        try:
            data_dir = str(local_data_dir().resolve())
        except DataError:  # not here: $RLORA_DATA_DIR may still name the cluster's path
            data_dir = os.environ.get(ENV_VAR)
    ep = entrypoint(config_in_project(config), tracking_uri, overrides)
    client = make_client(address, token_file)
    try:
        jid = client.submit_job(entrypoint=ep, runtime_env=runtime_env(tracking_uri, data_dir), submission_id=job_id,
                                metadata={"rlora.sweep": cfg.name})
    except Exception as e:
        raise SubmitError(f"submitting to {address}: {_first_line(e)}") from None
    return client, jid, ep


def follow(client, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; its final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop; the status is what counts
        print(f"(log stream ended: {_first_line(e)})", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(1)


def yaml_manifest(args) -> str:
    """``--manifest``: the sweep validated, then a RayJob running exactly what ``submit`` would submit
    (GPU training switched on when the worker pods have GPUs), or a RayCluster to submit it to."""
    import yaml

    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft, torch

    cfg = load_sweep_config(args.config, args.overrides)
    env = runtime_env(args.tracking_uri, args.data_dir)["env_vars"]
    shape = shape_from_args(args, env)
    if args.manifest == "raycluster":
        doc = raycluster(k8s_name(cfg.name), args.namespace, shape)
    else:
        ep = entrypoint(config_in_project(args.config), args.tracking_uri, gpu_overrides(shape, args.overrides))
        doc = rayjob(k8s_name(cfg.name), args.namespace, ep, shape)
    return yaml.safe_dump(doc, sort_keys=False).rstrip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="sweep YAML inside the project (see sweeps/)")
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard / Jobs API address of the head node")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for the job (e.g. http://mlflow:5000)")
    ap.add_argument("--data-dir", default=None, help="data directory as seen on the cluster (RLORA_DATA_DIR)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--token-file", default=None, help="Ray auth token to send (default: Ray's own token lookup)")
    ap.add_argument("--job-id", default=None, help="submission id (default: generated by Ray)")
    ap.add_argument("--wait", action="store_true", help="stream logs; exit non-zero unless the job succeeds")
    ap.add_argument("--manifest", choices=["rayjob", "raycluster"], default=None,
                    help="print a KubeRay manifest instead of submitting: a RayJob that brings up its own cluster "
                         "and runs this sweep, or a RayCluster to submit sweeps to (cluster-shape options below)")
    add_cluster_args(ap)
    args = ap.parse_args(argv)
    if args.manifest:
        try:
            print(yaml_manifest(args))
        except (SubmitError, ManifestError, *user_errors()) as e:
            return fail(e)
        return 0
    try:
        client, jid, ep = submit(args.address, args.config, args.tracking_uri, args.overrides, args.data_dir,
                                 args.token_file, args.job_id)
    except (SubmitError, *user_errors()) as e:
        return fail(e)
    print(f"submitted job {jid} to {args.address}\n  entrypoint: {ep}", flush=True)
    if not args.wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {jid}")
        return 0
    status = follow(client, jid)
    print(f"\njob {jid}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
