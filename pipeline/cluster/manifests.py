"""KubeRay manifests (``ray.io/v1``) for running a sweep on Kubernetes: a ``RayCluster`` to submit to,
a ``RayJob`` that brings up its own cluster, runs the sweep and shuts the cluster down, and a
``RayCronJob`` (KubeRay >= 1.6) that creates such a RayJob on a schedule. All three share one
cluster shape: a head pod and ``workers`` worker pods with their CPUs, memory and GPUs
(``nvidia.com/gpu`` limits and Ray's ``num-gpus``), node selectors and tolerations.

The tests validate every manifest emitted here against KubeRay's own CRD schemas, closed to
unknown fields as the API server's strict validation is.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Optional

GPU_RESOURCE = "nvidia.com/gpu"


class ManifestError(ValueError):
    """A cluster-shape option that cannot become a valid manifest (one line)."""


@dataclass
class ClusterShape:
    image: str = "rlora-lab:latest"
    workdir: str = "/app"
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1  # worker pods besides the head
    cpu: str = "4"  # per worker pod (the head gets the same CPU and memory, and no GPU)
    memory: str = "16Gi"
    gpus_per_node: int = 0  # per worker pod
    node_selector: dict[str, str] = field(default_factory=dict)  # worker pods
    tolerations: list[dict] = field(default_factory=list)  # worker pods
    ray_version: str = ""

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_node > 0


def _container(name: str, shape: ClusterShape, gpus: int, ports=None) -> dict:
    amounts = {"cpu": shape.cpu, "memory": shape.memory, **({GPU_RESOURCE: str(gpus)} if gpus else {})}
    c = {"name": name, "image": shape.image, "workingDir": shape.workdir,
         "env": [{"name": k, "value": v} for k, v in shape.env.items()],
         "resources": {"requests": dict(amounts), "limits": dict(amounts)}}
    if ports:
        c["ports"] = ports
    return c


def ray_cluster_spec(shape: ClusterShape) -> dict:
    """``spec`` of a RayCluster (``rayClusterSpec`` of a RayJob): token auth, one head, one worker group."""
    head = _container("ray-head", shape, 0,
                      ports=[{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}])
    worker_pod: dict = {"containers": [_container("ray-worker", shape, shape.gpus_per_node)]}
    if shape.node_selector:
        worker_pod["nodeSelector"] = dict(shape.node_selector)
    if shape.tolerations:
        worker_pod["tolerations"] = [dict(t) for t in shape.tolerations]
    # the head schedules no GPU work (it has none): Ray is told so, like the workers' GPU count
    head_params = {"num-gpus": "0"} if shape.uses_gpus else {}
    worker_params = {"num-gpus": str(shape.gpus_per_node)} if shape.uses_gpus else {}
    spec = {
        "authOptions": {"mode": "token"},  # KubeRay >= 1.5.1 creates the token Secret
        "headGroupSpec": {"rayStartParams": head_params, "template": {"spec": {"containers": [head]}}},
        "workerGroupSpecs": [{"groupName": "gpu-workers" if shape.uses_gpus else "workers",
                              "replicas": shape.workers, "minReplicas": shape.workers,
                              "maxReplicas": shape.workers, "rayStartParams": worker_params,
                              "template": {"spec": worker_pod}}],
    }
    if shape.ray_version:
        spec = {"rayVersion": shape.ray_version, **spec}
    return spec


def rayjob_spec(entrypoint: str, shape: ClusterShape) -> dict:
    return {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 86400,
            "rayClusterSpec": ray_cluster_spec(shape)}


def _meta(name: str, namespace: str, generate: bool = False) -> dict:
    return {("generateName" if generate else "name"): f"{name}-" if generate else name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": name}}


def rayjob(name: str, namespace: str, entrypoint: str, shape: ClusterShape, generate_name: bool = True) -> dict:
    """A RayJob; with ``generate_name`` every ``kubectl create`` makes a new one (scheduled runs)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(name, namespace, generate_name),
            "spec": rayjob_spec(entrypoint, shape)}


def raycronjob(name: str, namespace: str, cron: str, entrypoint: str, shape: ClusterShape,
               time_zone: Optional[str] = None) -> dict:
    """KubeRay's native scheduled RayJob (KubeRay >= 1.6): no CronJob, kubectl image or RBAC needed."""
    spec = {"schedule": cron, "jobTemplate": rayjob_spec(entrypoint, shape)}
    if time_zone:
        spec["timeZone"] = time_zone
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": _meta(name, namespace), "spec": spec}


def raycluster(name: str, namespace: str, shape: ClusterShape) -> dict:
    """A long-lived RayCluster to submit sweeps to (``pipeline.cluster.submit --address http://<head svc>:8265``)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(name, namespace),
            "spec": ray_cluster_spec(shape)}


# ------------------------------------------------------------------------------------ CLI options
_LABEL = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def parse_node_selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL.match(key):
            raise ManifestError(f"--node-selector {item!r}: expected LABEL=VALUE, e.g. "
                                "cloud.google.com/gke-accelerator=nvidia-h100-80gb")
        out[key] = value
    return out


def parse_toleration(item: str) -> dict:
    """``KEY[=VALUE]:EFFECT`` -> a toleration (operator Equal with a value, Exists without)."""
    spec, sep, effect = item.rpartition(":")
    key, eq, value = spec.partition("=")
    if not sep or effect not in _EFFECTS or not _LABEL.match(key):
        raise ManifestError(f"--toleration {item!r}: expected KEY[=VALUE]:EFFECT with EFFECT one of {', '.join(_EFFECTS)}")
    t = {"key": key, "operator": "Equal" if eq else "Exists", "effect": effect}
    if eq:
        t["value"] = value
    return t


def add_cluster_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("cluster shape (KubeRay manifests)")
    g.add_argument("--image", default="rlora-lab:latest", help="image with this project installed in --workdir")
    g.add_argument("--workdir", default="/app")
    g.add_argument("--namespace", default="default")
    g.add_argument("--worker-replicas", "--workers", dest="workers", type=int, default=1,
                   help="Ray worker pods besides the head")
    g.add_argument("--cpu", default="4", help="CPUs per pod (head and workers)")
    g.add_argument("--memory", default="16Gi", help="memory per pod (head and workers)")
    g.add_argument("--gpus-per-node", type=int, default=0,
                   help=f"GPUs per worker pod ({GPU_RESOURCE} limit and Ray num-gpus); > 0 also trains on GPUs")
    g.add_argument("--node-selector", action="append", default=[], metavar="LABEL=VALUE",
                   help="worker pods' nodeSelector (repeatable)")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help=f"worker pods' tolerations (repeatable; with GPUs, {GPU_RESOURCE}:NoSchedule is added)")


def shape_from_args(args, env: dict[str, str]) -> ClusterShape:
    import ray

    if args.workers < 1:
        raise ManifestError(f"--worker-replicas: {args.workers}: at least 1")
    if args.gpus_per_node < 0:
        raise ManifestError(f"--gpus-per-node: {args.gpus_per_node}: not negative")
    tolerations = [parse_toleration(t) for t in args.toleration]
    if args.gpus_per_node and not any(t["key"] == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})  # GPU node taints
    return ClusterShape(image=args.image, workdir=args.workdir, env=env, workers=args.workers, cpu=args.cpu,
                        memory=args.memory, gpus_per_node=args.gpus_per_node,
                        node_selector=parse_node_selector(args.node_selector), tolerations=tolerations,
                        ray_version=ray.__version__)


def gpu_overrides(shape: ClusterShape, overrides: list[str]) -> list[str]:
    """The sweep's ``--set`` list, with GPU training switched on when the worker pods have GPUs (the
    driver runs on the GPU-less head, where ``use_gpu: auto`` would say no)."""
    if shape.uses_gpus and not any(o.split("=", 1)[0].strip() == "base.scaling.use_gpu" for o in overrides):
        return [*overrides, "base.scaling.use_gpu=true"]
    return list(overrides)


def k8s_name(name: str) -> str:
    """A sweep's name as a Kubernetes object name (lower-case letters, digits and '-', at most 40)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "sweep"
