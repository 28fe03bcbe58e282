"""An unreachable MLflow server is reported in one line, exit 2, before any compute starts."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def dead_uri() -> str:
    """An http URI on a loopback port where nothing listens (free, and outside the range the kernel
    hands out, so no other process is given it meanwhile)."""
    from pipeline.runtime import free_port

    return f"http://127.0.0.1:{free_port()}"


def argv_of(entry, uri, tmp_path):
    return {
        "train": ["pipeline.train.cli", "configs/five_task.yaml", "--set", f"mlflow.tracking_uri={uri}",
                  "--set", f"output_dir={tmp_path}"],
        "sweep": ["pipeline.sweep", "sweeps/smoke.yaml", "--set", f"base.mlflow.tracking_uri={uri}",
                  "--set", f"base.output_dir={tmp_path}"],
        "eval.run": ["eval.run", "--adapter", "none", "--tasks", "mmlu", "--tracking-uri", uri,
                     "--out", str(tmp_path / "x.json")],
        "eval.compare": ["eval.compare", "a" * 32, "b" * 32, "--tracking-uri", uri],
    }[entry]


@pytest.mark.timeout(120)  # falling into MLflow's minutes of HTTP retries fails here instead of passing late
@pytest.mark.parametrize("entry", ["train", "eval.run", "eval.compare"])
def test_unreachable_tracking_server_is_one_line_before_compute(entry, tmp_path, capsys, monkeypatch):
    """Each entry point's ``main`` (in this process: no fresh process is needed for what it checks)."""
    import importlib

    import ray

    uri = dead_uri()
    module, *args = argv_of(entry, uri, tmp_path)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    code = importlib.import_module(module).main(args)
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, err[-2000:]
    assert err.count("\n") == 0 and err.startswith("error: ") and uri in err and "unreachable" in err, err
    # nothing was started: no Ray, no sweep/run directories, no model conversion
    assert not ray.is_initialized() and "Ray" not in out.out + out.err and not any(tmp_path.iterdir())


def test_unreachable_tracking_server_stops_the_sweep_cli_in_a_fresh_process(tmp_path):
    """``python -m pipeline.sweep`` as a user starts it: exit 2, one line, before Ray or anything else
    starts (a hang in MLflow's retries would run into the timeout)."""
    uri = dead_uri()
    proc = subprocess.run([sys.executable, "-m", *argv_of("sweep", uri, tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert err.count("\n") == 0 and err.startswith("error: ") and uri in err and "unreachable" in err, err
    assert "Ray" not in proc.stdout + proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_mlflow_server_killed_mid_sweep_and_restarted_loses_nothing(tmp_path, tiny_model_dir):
    """A real MLflow server is SIGKILLed while a trial trains and restarted a few seconds later on the
    same port and store: the logging calls made meanwhile wait in MLflow's HTTP retries (the training
    loop pauses, nothing is dropped), so the sweep exits 0 and every trial has every step's loss, every
    evaluation and its adapter. (The port is outside the range the kernel hands out: no other process
    is given it during the outage.)"""
    import yaml
    from mlflow import MlflowClient

    from pipeline.cluster.server import start_server, stop_server

    steps = 30
    store, arts = f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts")
    server, url = start_server(store, arts, port=0, log_path=tmp_path / "server.log")
    port = int(url.rsplit(":", 1)[1])
    cfg = {"name": "fault", "base": {
        "model": str(tiny_model_dir), "adapter": {"preset": "rlora", "r": 4, "num_heads": 2},
        "data": {"tasks": ["sst2", "boolq"], "train_per_task": 48, "eval_per_task": 6, "max_length": 80},
        "train": {"steps": steps, "batch_size": 2, "eval_every": 15, "eval_at_start": False, "warmup_steps": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "mlflow": {"tracking_uri": url, "experiment": "faults"}, "output_dir": str(tmp_path / "out")},
        "search": {"adapter.num_heads": {"choice": [2, 3]}},
        "tune": {"num_samples": 1, "scheduler": "none", "search_alg": "grid", "max_concurrent_trials": 1,
                 "train_in_trial": True},
        "eval": {"enabled": False}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", str(tmp_path / "s.yaml")], cwd=ROOT,
                             stdout=open(tmp_path / "sweep.log", "w"), stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}, start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=url)
        deadline, killed_at = time.time() + 600, None
        while time.time() < deadline and sweep.poll() is None:  # wait for the first trial's step 2
            exp = client.get_experiment_by_name("faults")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            trials = [r for r in runs if "rlora.trial_id" in r.data.tags]
            done = [len(client.get_metric_history(r.info.run_id, "train/loss")) for r in trials]
            if any(n >= 2 for n in done):
                assert len(trials) == 1 and done[0] < steps, done  # the first trial, mid-loop
                first = trials[0].info.run_id
                tree = [server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))]
                killed_at = time.time()
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)
                psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], timeout=30)
                # what the server had stored when it died (read from its store, not from the poll above,
                # which a step logged between the poll and the kill would make stale)
                with closing(sqlite3.connect(tmp_path / "server.db")) as db:
                    stored = db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]
                break
            time.sleep(0.5)
        assert killed_at, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(5)  # the outage (the fault injected): the trial's logging calls are refused meanwhile
        restarting_at = time.time()
        server, url = start_server(store, arts, port=port, log_path=tmp_path / "server.log")
        rc = sweep.wait(900)
        log = (tmp_path / "sweep.log").read_text()
        assert rc == 0, log[-4000:]
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("faults")
        runs = client.search_runs([exp.experiment_id])
        parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if "rlora.trial_id" in r.data.tags]
        assert len(parent) == 1 and parent[0].info.status == "FINISHED" and len(trials) == 2
        for r in trials:
            assert r.info.status == "FINISHED" and r.data.tags["tune.status"] == "DONE"
            assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(1, steps + 1))
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/mean_acc")) == [15, 30]
            assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id, "adapter")}
        # the first trial's loop was cut by the outage: when the server died it held fewer than all of that
        # trial's steps, and the rest reached it after the restart (none lost, none twice: checked above);
        # the call that logged the next step began (the client stamps a metric as it sends it) while the
        # server was down, so it waited through the outage in MLflow's retries rather than being made later
        assert 2 <= stored < steps, stored
        (following,) = [m for m in client.get_metric_history(first, "train/loss") if m.step == stored + 1]
        assert following.timestamp / 1000 < restarting_at, (following.timestamp / 1000, killed_at, restarting_at)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(60)
        stop_server(server)


def _log_concurrently(uri: str, barrier, errors, index: int, rounds: int) -> None:
    """One writer: at each barrier, every writer creates the same new experiment and logs the same
    dataset (name, digest) as an input of its own run, as concurrent trials of a sweep do."""
    from pipeline.tracking import Tracker

    tracker = Tracker(uri)
    tracker.start_run("shared", f"writer-{index}", {})
    failed = []
    for r in range(rounds):
        barrier.wait(timeout=120)
        try:
            tracker.experiment_id(f"created-at-once-{r}")
            tracker.log_dataset("mixture/train", f"digest-{r:03d}", "/data", 10, {}, "training")
        except Exception as e:  # noqa: BLE001 - reported to the parent
            failed.append(f"round {r}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    errors.put((tracker.run_id, failed))


def test_concurrent_writers_of_one_dataset_and_experiment_all_succeed(tmp_path):
    """MLflow's SQL store looks a dataset (or experiment) up and then inserts it: two trials logging
    the same mixture at one moment lost that race and one trial failed on the unique constraint
    (seen in a loaded fresh-clone run). Four processes hit it together, round after round."""
    import multiprocessing as mp

    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri).experiment_id("shared")
    ctx = mp.get_context("spawn")
    writers, rounds = 4, 20
    barrier, errors = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_log_concurrently, args=(uri, barrier, errors, i, rounds)) for i in range(writers)]
    for p in procs:
        p.start()
    try:
        results = [errors.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [f for _, failed in results for f in failed]
    assert not failures, f"{len(failures)} of {writers * rounds} writes failed, e.g. {failures[0]}"
    client = MlflowClient(uri)
    for run_id, _ in results:  # every run is linked to every round's dataset
        digests = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
        assert digests == {f"digest-{r:03d}" for r in range(rounds)}
    assert all(client.get_experiment_by_name(f"created-at-once-{r}") for r in range(rounds))
