"""``python -m pipeline.schedule sweeps/x.yaml --cron "0 2 * * *" [--kind raycronjob] [--gpus-per-node N] ...``

Prints ready-to-apply manifests for running a sweep on a schedule:

1. Kubernetes (KubeRay), ``--kind raycronjob``: KubeRay's native ``RayCronJob`` (KubeRay >= 1.6),
   which creates a ``RayJob`` on the schedule. ``--kind cronjob`` (the default, for older
   operators): a ``CronJob`` that creates the same ``RayJob`` (kept in a ``ConfigMap``;
   ``generateName`` gives every run its own name) with the RBAC it needs. Either RayJob brings up
   a Ray cluster from ``--image`` (an image with this project installed in ``--workdir``) with
   ``--worker-replicas`` worker pods of ``--cpu``/``--memory``/``--gpus-per-node``, runs the sweep as
   its entrypoint and shuts the cluster down afterwards (see ``pipeline.cluster.manifests``).
2. A plain Ray cluster: the crontab line that submits the same sweep with ``pipeline.cluster.submit``.

The RayJob's entrypoint is exactly the command ``pipeline.cluster.submit`` submits (with GPU worker pods,
plus ``--set base.scaling.use_gpu=true``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Optional

import yaml

from pipeline.cluster.manifests import (
    ClusterShape,
    ManifestError,
    add_cluster_args,
    gpu_overrides,
    k8s_name,
    raycronjob,
    rayjob,
    shape_from_args,
)
from pipeline.cluster.submit import ROOT, SubmitError, config_in_project, entrypoint
from pipeline.config.cli import fail, user_errors

CRON_FIELD = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?)*$")


class ScheduleError(ValueError):
    pass


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the RayJob inside the ConfigMap) as readable literal blocks."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def check_cron(expr: str) -> str:
    fields = expr.split()
    if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
        raise ScheduleError(f"--cron: {expr!r} is not a 5-field cron expression (minute hour day month weekday)")
    return " ".join(fields)


def manifests(config: str, cron: str, tracking_uri: Optional[str], overrides: list[str], shape: ClusterShape,
              namespace: str, data_dir: Optional[str], kind: str = "cronjob", time_zone: Optional[str] = None
              ) -> list[dict]:
    """``kind`` raycronjob: one KubeRay RayCronJob. cronjob: a Kubernetes CronJob that runs
    ``kubectl create`` on a RayJob kept in a ConfigMap, with the ServiceAccount/Role it needs
    (for KubeRay operators older than 1.6)."""
    from pipeline.config.sweep import load_sweep_config  # lazy: loads peft, torch

    cfg = load_sweep_config(config, overrides)
    name = k8s_name(cfg.name)
    ep = entrypoint(config_in_project(config), tracking_uri, gpu_overrides(shape, overrides))
    shape.env = {"PYTHONUNBUFFERED": "1", **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}),
                 **({"RLORA_DATA_DIR": data_dir} if data_dir else {})}
    if kind == "raycronjob":
        return [raycronjob(name, namespace, cron, ep, shape, time_zone)]
    if time_zone:
        raise ScheduleError("--time-zone: only with --kind raycronjob (a CronJob takes CRON_TZ in --cron)")
    job = rayjob(name, namespace, ep, shape, generate_name=True)
    sa = f"{name}-submitter"
    meta = {"namespace": namespace, "labels": {"app.kubernetes.io/name": name}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": sa, **meta},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": sa, **meta},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-rayjob", **meta},
         "data": {"rayjob.yaml": yaml.safe_dump(job, sort_keys=False)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name, **meta},
         "spec": {"schedule": cron, "concurrencyPolicy": "Forbid", "successfulJobsHistoryLimit": 3,
                  "failedJobsHistoryLimit": 3,
                  "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {
                      "serviceAccountName": sa, "restartPolicy": "Never",
                      "containers": [{"name": "create-rayjob", "image": "bitnami/kubectl:1.31",
                                      "command": ["kubectl", "create", "-f", "/manifests/rayjob.yaml"],
                                      "volumeMounts": [{"name": "manifests", "mountPath": "/manifests"}]}],
                      "volumes": [{"name": "manifests", "configMap": {"name": f"{name}-rayjob"}}]}}}}}},
    ]


def crontab_line(config: str, cron: str, address: str, tracking_uri: Optional[str], overrides: list[str],
                 name: str) -> str:
    cmd = ["python", "-m", "pipeline.submit", "--address", address, config_in_project(config), "--wait"]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    for o in overrides:
        cmd += ["--set", o]
    log = f"outputs/schedule/{name}.log"
    return (f"{cron} cd {shlex.quote(str(ROOT))} && mkdir -p outputs/schedule && .venv/bin/{shlex.join(cmd)} "
            f">> {log} 2>&1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.schedule", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="sweep YAML inside the project")
    ap.add_argument("--cron", required=True, help='5-field cron expression, e.g. "0 2 * * *"')
    ap.add_argument("--tracking-uri", default=None, help="shared MLflow server, e.g. http://mlflow.mlops:5000")
    ap.add_argument("--address", default="http://127.0.0.1:8265", help="Ray head for the crontab form")
    ap.add_argument("--kind", choices=["cronjob", "raycronjob"], default="cronjob",
                    help="raycronjob: KubeRay's native RayCronJob (KubeRay >= 1.6); cronjob: a CronJob creating "
                         "RayJobs (older operators)")
    ap.add_argument("--time-zone", default=None, help="RayCronJob's timeZone, e.g. Europe/Paris (default: UTC)")
    ap.add_argument("--data-dir", default=None, help="RLORA_DATA_DIR inside the pods")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--format", choices=["all", "k8s", "crontab"], default="all")
    add_cluster_args(ap)
    args = ap.parse_args(argv)
    try:
        cron = check_cron(args.cron)
        docs = manifests(args.config, cron, args.tracking_uri, args.overrides, shape_from_args(args, {}),
                         args.namespace, args.data_dir, args.kind, args.time_zone)
        line = crontab_line(args.config, cron, args.address, args.tracking_uri, args.overrides,
                            docs[-1]["metadata"]["name"])
    except (ScheduleError, SubmitError, ManifestError, *user_errors()) as e:
        return fail(e)
    if args.format in ("all", "k8s"):
        if args.format == "all":
            print("# --- Kubernetes (KubeRay): kubectl apply -f <this file>")
        print(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False).rstrip())
    if args.format in ("all", "crontab"):
        if args.format == "all":
            print("\n# --- plain Ray cluster: add this line with `crontab -e` on a machine that can reach the head")
            print("# " + line)
        else:
            print(line)
    return 0
