"""Cluster runs: schedule manifests, submission checks, the MLflow server, and a real two-node
Ray cluster on loopback (pipeline.loopback: Train with STRICT_SPREAD, a sweep submitted through
the Jobs API)."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.loopback import RAY, LoopbackCluster
from pipeline.submit import entrypoint

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args, env=None, timeout=720):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


# -- schedule ---------------------------------------------------------------------------------------

def test_schedule_manifests_parse_and_run_the_submit_entrypoint():
    uri = "http://mlflow.mlops:5000"
    proc = run("pipeline.schedule", "sweeps/heads_gamma.yaml", "--cron", "30 2 * * 1-5", "--tracking-uri", uri,
               "--image", "registry.example/rlora-lab:1.0", "--workers", "2", "--format", "k8s")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]
    cron = docs[-1]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["schedule"] == "30 2 * * 1-5"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs[0]["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["command"] == ["kubectl", "create", "-f", "/manifests/rayjob.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == docs[3]["metadata"]["name"]
    role = docs[1]["rules"][0]
    assert role["apiGroups"] == ["ray.io"] and "create" in role["verbs"] and role["resources"] == ["rayjobs"]
    job = yaml.safe_load(docs[3]["data"]["rayjob.yaml"])
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"] == "heads-gamma-"  # a fresh name for every scheduled run
    spec = job["spec"]
    assert spec["entrypoint"] == entrypoint("sweeps/heads_gamma.yaml", uri, [])
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example/rlora-lab:1.0"
    assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in head["env"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    assert cluster["authOptions"] == {"mode": "token"}


def test_schedule_crontab_line_is_the_submit_command():
    proc = run("pipeline.schedule", "sweeps/smoke.yaml", "--cron", "0 2 * * *", "--address", "http://head:8265",
               "--tracking-uri", "http://mlflow:5000", "--format", "crontab")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    fields = line.split()
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    assert (".venv/bin/python -m pipeline.submit --address http://head:8265 sweeps/smoke.yaml --wait "
            "--tracking-uri http://mlflow:5000") in line
    assert f"cd {ROOT}" in line and line.endswith("2>&1")


@pytest.mark.parametrize("args, msg", [
    (["sweeps/smoke.yaml", "--cron", "0 2 * *"], "not a 5-field cron expression"),
    (["sweeps/smoke.yaml", "--cron", "0 2 * * * *"], "not a 5-field cron expression"),
    (["sweeps/smoke.yaml", "--cron", "0 2 * * *", "--set", "tune.num_samples=0"], "tune.num_samples"),
])
def test_schedule_bad_input_is_one_line(args, msg):
    proc = run("pipeline.schedule", *args)
    assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr


# -- KubeRay manifests: validated against the official CRDs ----------------------------------------

GPU_SHAPE = ["--gpus-per-node", "2", "--worker-replicas", "3", "--cpu", "12", "--memory", "96Gi",
             "--node-selector", "cloud.google.com/gke-accelerator=nvidia-h100-80gb",
             "--toleration", "dedicated=ml:NoSchedule"]


def main_of(module):
    import importlib

    return importlib.import_module(module).main


def emitted(capsys, module, *args):
    """The ray.io/v1 documents a CLI prints (run in process: these tests need no subprocess)."""
    capsys.readouterr()
    code = main_of(module)(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    docs = [d for d in yaml.safe_load_all(out.out) if d]
    for d in list(docs):  # the RayJob a CronJob creates lives inside its ConfigMap
        if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}):
            docs.append(yaml.safe_load(d["data"]["rayjob.yaml"]))
    return [d for d in docs if d["apiVersion"] == "ray.io/v1"]


MANIFESTS = {
    "raycronjob": ("pipeline.schedule", str(ROOT / "sweeps/smoke.yaml"), "--cron", "0 2 * * *", "--kind", "raycronjob",
                   "--time-zone", "Europe/Paris", "--format", "k8s"),
    "cronjob": ("pipeline.schedule", str(ROOT / "sweeps/smoke.yaml"), "--cron", "0 2 * * *", "--format", "k8s"),
    "rayjob": ("pipeline.submit", str(ROOT / "sweeps/smoke.yaml"), "--manifest", "rayjob"),
    "raycluster": ("pipeline.submit", str(ROOT / "sweeps/smoke.yaml"), "--manifest", "raycluster"),
}


@pytest.mark.parametrize("gpus", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("form", list(MANIFESTS))
def test_every_kuberay_manifest_validates_against_the_official_crds(capsys, form, gpus):
    from kuberay_crds import errors

    docs = emitted(capsys, *MANIFESTS[form], "--tracking-uri", "http://mlflow:5000", *(GPU_SHAPE if gpus else []))
    kind = {"raycronjob": "RayCronJob", "cronjob": "RayJob", "rayjob": "RayJob", "raycluster": "RayCluster"}[form]
    assert [d["kind"] for d in docs] == [kind]
    assert errors(docs[0]) == []


def test_the_crd_validator_refuses_what_the_api_server_would(capsys):
    """The check above can fail: a field KubeRay does not know, a wrong type or a number where Ray's
    start parameters take strings are all refused."""
    import copy

    from kuberay_crds import errors

    (good,) = emitted(capsys, *MANIFESTS["rayjob"], *GPU_SHAPE)
    assert errors(good) == []
    group = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]

    def broken(path, key, value):
        doc = copy.deepcopy(good)
        node = doc
        for p in path:
            node = node[p]
        node[key] = value
        return errors(doc)

    assert any("'gpus' was unexpected" in e for e in broken(group, "gpus", 2))
    assert any("'two' is not of type 'integer'" in e for e in broken(group, "replicas", "two"))
    assert any("2 is not of type 'string'" in e for e in broken(group + ["rayStartParams"], "num-gpus", 2))
    assert any("'cronSchedule' was unexpected" in e for e in broken(["spec"], "cronSchedule", "0 2 * * *"))


def test_gpu_worker_pods_request_gpus_and_the_sweep_trains_on_them(capsys):
    (job,) = emitted(capsys, *MANIFESTS["raycronjob"], *GPU_SHAPE)
    spec = job["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["timeZone"] == "Europe/Paris"
    cluster = spec["jobTemplate"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert group["rayStartParams"] == {"num-gpus": "2"}
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"] == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "2"}
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0"}
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # the driver runs on the GPU-less head, so the sweep is told to train on GPUs
    assert spec["jobTemplate"]["entrypoint"] == entrypoint("sweeps/smoke.yaml", None, ["base.scaling.use_gpu=true"])
    (cpu_job,) = emitted(capsys, *MANIFESTS["raycronjob"])
    cpu_group = cpu_job["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cpu_group["rayStartParams"] == {} and "tolerations" not in cpu_group["template"]["spec"]
    assert cpu_job["spec"]["jobTemplate"]["entrypoint"] == entrypoint("sweeps/smoke.yaml", None, [])


@pytest.mark.parametrize("args, msg", [
    (["--gpus-per-node", "-1"], "--gpus-per-node: -1"),
    (["--toleration", "nvidia.com/gpu"], "--toleration 'nvidia.com/gpu': expected KEY[=VALUE]:EFFECT"),
    (["--node-selector", "gpu"], "--node-selector 'gpu': expected LABEL=VALUE"),
    (["--worker-replicas", "0"], "--worker-replicas: 0"),
])
def test_bad_cluster_shape_is_one_line(capsys, args, msg):
    code = main_of("pipeline.submit")([str(ROOT / "sweeps/smoke.yaml"), "--manifest", "rayjob", *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


# -- submit: checks before anything is sent ----------------------------------------------------------

@pytest.mark.parametrize("extra, msg", [
    (["--tracking-uri", "sqlite:///rel.db"], "relative sqlite path"),
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    (["--set", "tune.mode=up"], "tune.mode"),
])
def test_submit_rejects_bad_input_before_contacting_ray(extra, msg):
    # no Ray cluster at this address: each error must come first
    proc = run("pipeline.submit", "sweeps/smoke.yaml", "--address", "http://127.0.0.1:9", *extra, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert msg in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_submit_to_no_cluster_is_one_line(tmp_path):
    proc = run("pipeline.submit", "sweeps/smoke.yaml", "--address", "http://127.0.0.1:9",
               "--tracking-uri", f"sqlite:///{tmp_path}/m.db", timeout=120)
    assert proc.returncode == 2 and "error: Ray cluster at http://127.0.0.1:9" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- MLflow server ----------------------------------------------------------------------------------

def test_lean_mlflow_server_stores_runs_and_proxied_artifacts(tmp_path):
    from mlflow import MlflowClient

    from pipeline.server import start_server, stop_server

    proc, url = start_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), port=0,
                             log_path=tmp_path / "server.log")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert url.startswith("http://127.0.0.1:") and 1024 <= port < 65536
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--workers" in cmdline and cmdline[cmdline.index(b"--workers") + 1] == b"1"
        assert b"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in Path(f"/proc/{proc.pid}/environ").read_bytes()
        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("srv")
        run_ = client.create_run(exp)
        client.log_metric(run_.info.run_id, "m", 0.5)
        (tmp_path / "a.txt").write_text("hello")
        client.log_artifact(run_.info.run_id, str(tmp_path / "a.txt"))
        assert client.get_run(run_.info.run_id).data.metrics["m"] == 0.5
        assert run_.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        stored = list((tmp_path / "artifacts").rglob("a.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "hello"
    finally:
        stop_server(proc)
    assert proc.poll() is not None
    with pytest.raises(Exception):
        urllib.request.urlopen(f"{url}/health", timeout=2)


@pytest.mark.slow
def test_two_ray_instances_on_one_machine_each_work():
    """1. Every Ray on a machine wants port 52365 for its dashboard agent; a second instance's agent
    then runs without HTTP and its Jobs API refuses every job ("No available agent"). Found when
    the two-node test failed only while another suite's Ray ran beside it: a loopback cluster
    still takes jobs while another process holds that port.
    2. Beside that cluster, a worker of the local cluster that ensure_ray starts still reaches its
    own cluster through the state API (without RAY_ADDRESS in the workers' environment the state
    API cannot tell the two apart and the sweep's placement-group cleaner dies)."""
    import json
    import socket

    holder = socket.socket()
    try:
        holder.bind(("0.0.0.0", 52365))
        holder.listen()
    except OSError:
        pass  # already held, by another Ray instance: the same situation
    cluster = LoopbackCluster(nodes=1, cpus_per_node=1)
    try:
        cluster.start()
        job = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, "--", "python", "-c",
                              "print(6 * 7)"], env={**os.environ, **cluster.client_env}, capture_output=True,
                             text=True, timeout=300)
        assert job.returncode == 0 and "succeeded" in job.stdout and "42" in job.stdout, \
            (job.stdout + job.stderr)[-2000:]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["me"] in got["seen"], (got, cluster.address)
    finally:
        left = cluster.stop()
        holder.close()
    assert left == [], f"processes left running: {left}"


# -- a real two-node cluster ------------------------------------------------------------------------

@pytest.mark.slow
def test_two_node_cluster_spread_training_and_submitted_sweep(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    from pipeline.server import start_server, stop_server

    cluster = LoopbackCluster(nodes=2, cpus_per_node=1)
    base = cluster.base
    server, url = start_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), port=0,
                               log_path=tmp_path / "server.log")
    try:
        cluster.start()
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2

        # 1. a 2-worker Train job placed STRICT_SPREAD: one worker per node; checkpoints in shared
        # storage given as a URI; rank 1 killed after the step-2 checkpoint: both ranks, one per node,
        # restore what rank 0 wrote on its node
        storage = tmp_path / "shared-storage"
        run_yaml = tmp_path / "run.yaml"
        run_yaml.write_text(yaml.safe_dump({
            "model": str(tiny_model_dir), "adapter": {"preset": "rlora", "r": 4, "num_heads": 2},
            "data": {"tasks": ["sst2"], "train_per_task": 32, "eval_per_task": 4, "max_length": 64},
            "train": {"steps": 6, "batch_size": 2, "eval_every": 6, "eval_at_start": False, "checkpoint_every": 2},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD",
                        "max_failures": 1},
            "mlflow": {"tracking_uri": url, "experiment": "spread"}, "output_dir": str(tmp_path / "out"),
            "storage": f"file://{storage}"}))
        train = run("pipeline.train", str(run_yaml), env={**cluster.env, "RAY_ADDRESS": cluster.address,
                                                          "RLORA_TEST_KILL_RANK_AT_STEP": "1:5"})
        assert train.returncode == 0, train.stderr[-3000:]
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("spread")
        (trun,) = client.search_runs([exp.experiment_id])
        placed = trun.data.tags["ray.worker_node_ids"].split(",")
        assert len(placed) == 2 and set(placed) == set(nodes)  # different nodes, both of this cluster
        assert trun.info.status == "FINISHED"
        # resumed once, from a checkpoint before the kill at step 5 (Ray registers checkpoints
        # asynchronously: the step-4 one can still be in flight when the worker dies)
        resumed = client.get_metric_history(trun.info.run_id, "resumed_from_step")
        assert len(resumed) == 1 and resumed[0].value in (2.0, 4.0), [m.value for m in resumed]
        saved = sorted(p.name for p in (storage / f"train-{trun.info.run_id}").glob("step-*"))
        assert "step-000006" in saved, list(storage.rglob("*"))[:20]  # checkpoints went to the URI's storage ...
        assert not (tmp_path / "out" / "ray").exists()  # ... not to the local default

        # 2. the smoke sweep (and its eval stage) submitted through the Jobs API, logging to the server
        t0 = time.time()
        sub = run("pipeline.submit", "--address", cluster.dashboard, "sweeps/smoke.yaml", "--tracking-uri", url,
                  "--wait", "--set", f"base.model={tiny_model_dir}", "--set", "base.mlflow.experiment=submitted",
                  "--set", f"base.output_dir={tmp_path / 'job-out'}",
                  env=cluster.client_env,
                  timeout=720)
        wall = time.time() - t0
        if sub.returncode != 0:
            logs = sorted(base.glob("head/session_*/logs/job-driver-*.log"))
            pytest.fail(f"submitted sweep failed:\n{sub.stdout[-1500:]}\n{logs[-1].read_text()[-3000:] if logs else ''}")
        assert "submitted job" in sub.stdout and "SUCCEEDED" in sub.stdout
        exp = client.get_experiment_by_name("submitted")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if r.data.tags.get("rlora.trial_id")]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
        assert any(r.data.tags.get("rlora.eval_role") == "base" for r in runs)  # the eval stage ran too
        assert any("bbh_fewshot/avg" in r.data.metrics for r in trials)
        assert client.list_artifacts(trials[0].info.run_id, "adapter")
        (tmp_path / "job_wall_s.txt").write_text(f"{wall:.1f}\n")
        print(f"submitted smoke sweep: {wall:.0f}s wall")

        # 3. a wrong token is refused with one line, not bypassed
        bad = tmp_path / "bad-token"
        bad.write_text("not-the-token")
        refused = run("pipeline.submit", "--address", cluster.dashboard, "sweeps/smoke.yaml", "--tracking-uri", url,
                      "--token-file", str(bad), env={"RAY_AUTH_MODE": "token"}, timeout=120)
        assert refused.returncode == 2 and "error:" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        left = cluster.stop()
        stop_server(server)
    assert left == [], f"processes left running: {left}"


PROBE = """
import json, ray, ray.util.state
from pipeline.train import ensure_ray
ensure_ray(quiet=True)

@ray.remote(num_cpus=0)
def inside():  # what Ray Train's placement-group cleaner does from inside the cluster
    return ray.get_runtime_context().get_node_id(), [n.node_id for n in ray.util.state.list_nodes()]

me, seen = ray.get(inside.remote())
print(json.dumps({"me": me, "seen": seen}))
ray.shutdown()
"""
