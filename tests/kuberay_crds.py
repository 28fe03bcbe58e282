"""KubeRay's official CRD schemas (``../shared/schemas/kuberay``, see its SOURCE.md) as JSON-schema
validators that, like the API server's strict field validation, reject unknown fields."""

import functools
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = Path(os.environ.get("RLORA_KUBERAY_CRDS", ROOT.parent / "shared" / "schemas" / "kuberay"))
FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def closed(schema):
    """OpenAPI v3 (with Kubernetes extensions) -> JSON schema: objects that list their properties
    accept no others unless marked x-kubernetes-preserve-unknown-fields; int-or-string accepts both."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "additionalProperties", "not") else v for k, v in schema.items()}
    for k in ("allOf", "anyOf", "oneOf"):
        if k in schema:
            out[k] = closed(schema[k])
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def validator(kind: str):
    import jsonschema

    path = SCHEMA_DIR / FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"KubeRay CRD {path} not found: put the shared schemas at ../shared/schemas/kuberay "
                                "beside this checkout or set RLORA_KUBERAY_CRDS")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def errors(doc: dict) -> list[str]:
    """Every reason the API server would refuse ``doc`` (a RayJob, RayCronJob or RayCluster)."""
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]
