"""Cluster runs: schedule manifests, submission checks, the MLflow server, and a real two-node
Ray cluster on loopback beside the pipeline's own local Ray (pipeline.cluster.loopback: Train with
STRICT_SPREAD killed and resumed exactly, a sweep submitted through the Jobs API)."""

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.cluster.loopback import LoopbackCluster
from pipeline.cluster.submit import entrypoint

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args, env=None, timeout=720):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def main_in_process(capsys, monkeypatch, module, *args):
    """A CLI's ``main`` run in this process from the project root (no fresh process needed):
    (exit code, stdout, stderr)."""
    import importlib

    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    code = importlib.import_module(module).main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- schedule ---------------------------------------------------------------------------------------

def test_schedule_manifests_parse_and_run_the_submit_entrypoint():
    """Through the command line (``python -m pipeline.schedule``, a fresh process): the Kubernetes
    objects a schedule needs, whose RayJob runs the submit entrypoint."""
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


def test_schedule_crontab_line_is_the_submit_command(capsys, monkeypatch):
    code, out, err = main_in_process(capsys, monkeypatch, "pipeline.cluster.schedule", "sweeps/smoke.yaml", "--cron",
                                     "0 2 * * *", "--address", "http://head:8265", "--tracking-uri",
                                     "http://mlflow:5000", "--format", "crontab")
    assert code == 0, err
    line = out.strip()
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
def test_schedule_bad_input_is_one_line(capsys, monkeypatch, args, msg):
    code, _, err = main_in_process(capsys, monkeypatch, "pipeline.cluster.schedule", *args)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


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
def test_submit_rejects_bad_input_before_contacting_ray(capsys, monkeypatch, extra, msg):
    # no Ray cluster at this address: each error must come first
    code, _, err = main_in_process(capsys, monkeypatch, "pipeline.cluster.submit", "sweeps/smoke.yaml", "--address",
                                   "http://127.0.0.1:9", *extra)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_submit_to_no_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = main_in_process(capsys, monkeypatch, "pipeline.cluster.submit", "sweeps/smoke.yaml", "--address",
                                   "http://127.0.0.1:9", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert code == 2 and err.startswith("error: Ray cluster at http://127.0.0.1:9"), err
    assert len(err.strip().splitlines()) == 1


# -- ports ------------------------------------------------------------------------------------------

def test_free_ports_are_outside_the_range_the_kernel_hands_out():
    """A port chosen for a server started later cannot be given to anyone else meanwhile: the kernel
    only assigns ports of its ephemeral range to bind(0) and outgoing connections, and free_port
    picks outside it and outside Ray's worker ports; each port it gives can be bound."""
    from pipeline.runtime import RAY_RESERVED_BELOW, ephemeral_ports, free_port

    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(20)]
    assert not [p for p in ports if low <= p <= high], (ports, low, high)
    assert min(ports) >= RAY_RESERVED_BELOW  # never one Ray gives its workers (a head given one refuses to start)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    taken = [socket.socket() for _ in range(50)]  # what the kernel hands out is in its range
    try:
        for s in taken:
            s.bind(("127.0.0.1", 0))
        assert all(low <= s.getsockname()[1] <= high for s in taken)
    finally:
        for s in taken:
            s.close()


# -- MLflow server ----------------------------------------------------------------------------------

def test_lean_mlflow_server_stores_runs_and_proxied_artifacts(tmp_path):
    from mlflow import MlflowClient

    from pipeline.cluster.server import start_server, stop_server

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


# -- a real two-node cluster, beside the pipeline's own local Ray -----------------------------------

def hold_the_default_agent_port():
    """Every Ray on a machine wants port 52365 for its dashboard agent; a second instance's agent then
    runs without HTTP and its Jobs API refuses every job ("No available agent"). The module's local
    Ray (started first) holds it when it was free; if nobody listens there, a socket of this test
    does, so the cluster below always starts beside a taken agent port. Returns that socket or None."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 52365)) == 0:
            return None
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 52365))
    except OSError:  # taken since the probe: by someone else, which is all this needs
        holder.close()
        return None
    holder.listen()
    return holder


@pytest.mark.slow
def test_two_node_cluster_spread_training_resumed_exactly_and_a_submitted_sweep(tmp_path, tiny_model_dir, local_ray,
                                                                               capsys, monkeypatch):
    """A two-node loopback cluster (``ray start``, token auth) started while the pipeline's own local
    Ray runs on the machine and holds Ray's default agent port:
    1. a worker of the local Ray still reaches its own cluster through the state API;
    2. a 2-worker Train job placed STRICT_SPREAD puts one worker on each node, keeps its checkpoints
       in shared storage given as a URI, and, rank 1 killed after step 5, resumes from the last
       checkpoint before it on both nodes and ends exactly where an uninterrupted run ends (weights,
       optimizer state, scheduler, the loss of every step, re-run steps included);
    3. the smoke sweep and its eval stage, submitted through the Jobs API, log to a real MLflow server;
    4. a wrong token is refused in one line, not bypassed."""
    from mlflow import MlflowClient

    from pipeline.cluster.server import start_server, stop_server
    from test_train import assert_same_end, check_two_worker_ddp_run_is_complete_in_mlflow, write_yaml

    import ray

    holder = hold_the_default_agent_port()
    cluster = LoopbackCluster(nodes=2, cpus_per_node=1)
    server, url = start_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), port=0,
                               log_path=tmp_path / "server.log")
    try:
        cluster.start()
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2

        # 1. the local Ray beside the cluster: what Ray Train's placement-group cleaner does from inside
        # (a function defined here travels by value: workers cannot import a test module)
        def seen_from_inside():
            import ray
            import ray.util.state

            return ray.get_runtime_context().get_node_id(), [n.node_id for n in ray.util.state.list_nodes()]

        me, seen = ray.get(ray.remote(num_cpus=0)(seen_from_inside).remote())
        assert me in seen and not set(seen) & set(nodes), (me, seen, nodes)

        # 2. spread training killed on one node and resumed; the same run uninterrupted as reference
        storage = tmp_path / "shared-storage"
        run_yaml = write_yaml(tmp_path, tiny_model_dir)
        cfg = yaml.safe_load(run_yaml.read_text())
        cfg["scaling"].update({"placement_strategy": "STRICT_SPREAD", "max_failures": 1})
        cfg.update({"mlflow": {"tracking_uri": url, "experiment": "spread"}, "storage": f"file://{storage}"})
        run_yaml.write_text(yaml.safe_dump(cfg))
        train = run("pipeline.train", str(run_yaml), env={**cluster.env, "RAY_ADDRESS": cluster.address,
                                                          "RLORA_TEST_KILL_RANK_AT_STEP": "1:5"})
        assert train.returncode == 0, train.stderr[-3000:]
        client = MlflowClient(tracking_uri=url)
        (trun,) = client.search_runs([client.get_experiment_by_name("spread").experiment_id])
        placed = trun.data.tags["ray.worker_node_ids"].split(",")
        assert len(placed) == 2 and set(placed) == set(nodes)  # different nodes, both of this cluster
        assert trun.info.status == "FINISHED"
        # resumed once, from a checkpoint before the kill at step 5 (Ray registers checkpoints
        # asynchronously: the step-4 one can still be in flight when the worker dies)
        resumed = client.get_metric_history(trun.info.run_id, "resumed_from_step")
        assert len(resumed) == 1 and resumed[0].value in (2.0, 4.0), [m.value for m in resumed]
        start = int(resumed[0].value)
        steps = [m.step for m in client.get_metric_history(trun.info.run_id, "train/loss")]
        for s in range(1, 9):  # steps up to the checkpoint ran once; start+1..5 ran again; the rest once
            assert steps.count(s) == (2 if start < s <= 5 else 1), (s, steps)
        saved = sorted(p.name for p in (storage / f"train-{trun.info.run_id}").glob("step-*"))
        assert "step-000008" in saved, list(storage.rglob("*"))[:20]  # checkpoints went to the URI's storage ...
        assert not (tmp_path / "out" / "ray").exists()  # ... not to the local default
        ref_dir = tmp_path / "uninterrupted"
        ref_dir.mkdir()
        ref = run("pipeline.train", str(write_yaml(ref_dir, tiny_model_dir)),
                  env={**cluster.env, "RAY_ADDRESS": cluster.address})
        assert ref.returncode == 0, ref.stderr[-3000:]
        check_two_worker_ddp_run_is_complete_in_mlflow(ref_dir, tiny_model_dir)
        assert_same_end(tmp_path, client, trun, ref_dir)

        # 3. the smoke sweep (one trial) and its eval stage submitted through the Jobs API, from a fresh
        # process as a user does (this one's Ray client holds the token of its own local Ray)
        sub = run("pipeline.submit", "--address", cluster.dashboard, "sweeps/smoke.yaml", "--tracking-uri", url,
                  "--wait", "--set", f"base.model={tiny_model_dir}", "--set", "base.mlflow.experiment=submitted",
                  "--set", f"base.output_dir={tmp_path / 'job-out'}", "--set", "tune.num_samples=1",
                  "--set", "eval.tasks=[heldout_sst2]", env=cluster.client_env)
        out = sub.stdout
        if sub.returncode != 0:
            logs = sorted(cluster.base.glob("head/session_*/logs/job-driver-*.log"))
            pytest.fail(f"submitted sweep failed:\n{out[-1500:]}{sub.stderr[-1500:]}\n"
                        f"{logs[-1].read_text()[-3000:] if logs else ''}")
        assert "submitted job" in out and "SUCCEEDED" in out
        runs = client.search_runs([client.get_experiment_by_name("submitted").experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if r.data.tags.get("rlora.trial_id")]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(trials) == 1 and trials[0].info.status == "FINISHED"
        assert any(r.data.tags.get("rlora.eval_role") == "base" for r in runs)  # the eval stage ran too
        assert "heldout/sst2" in trials[0].data.metrics and client.list_artifacts(trials[0].info.run_id, "adapter")

        # 4. the token file decides: this process's own Ray token is not the cluster's, yet the cluster's
        # token given as the file is accepted; a wrong one is refused with one line, not bypassed
        from pipeline.cluster.submit import make_client

        make_client(cluster.dashboard, cluster.env["RAY_AUTH_TOKEN_PATH"])
        bad = tmp_path / "bad-token"
        bad.write_text("not-the-token")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        code, _, err = main_in_process(capsys, monkeypatch, "pipeline.cluster.submit", "--address", cluster.dashboard,
                                       "sweeps/smoke.yaml", "--tracking-uri", url, "--token-file", str(bad))
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    finally:
        left = cluster.stop()
        stop_server(server)
        if holder is not None:
            holder.close()
    assert left == [], f"processes left running: {left}"
