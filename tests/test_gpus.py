"""The GPU path without a GPU: a Ray that declares logical GPUs schedules GPU shares and sets
CUDA_VISIBLE_DEVICES as it would on GPU nodes; torch (a CPU build here) computes on the CPU."""

import collections
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def ray_with_logical_gpus():
    """The pipeline's local Ray (``ensure_ray``: dashboard and state API on) declaring 6 CPUs and 2 GPUs:
    Ray schedules GPU shares and sets CUDA_VISIBLE_DEVICES as on a GPU node; torch computes on the CPU."""
    import ray

    from pipeline.runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(quiet=True, resources={"num_cpus": 6, "num_gpus": 2})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def train_worker_lifetimes(gcs: str) -> dict[str, list[int]]:
    """Each Ray Train worker actor's lifetime (ms), from the start of its creation task to the end of
    its shutdown task, as recorded by Ray's state API."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=gcs, filters=[("type", "!=", "NORMAL_TASK")], detail=True, limit=10000,
                       raise_on_missing_output=True)
    spans = collections.defaultdict(dict)
    for t in tasks:
        if t.func_or_class_name == "RayTrainWorker.__init__":
            spans[t.actor_id]["start"] = t.start_time_ms
        elif t.func_or_class_name == "RayTrainWorker.shutdown":
            spans[t.actor_id]["end"] = t.end_time_ms
    return {a: [s["start"], s["end"]] for a, s in spans.items()}


@pytest.mark.slow
def test_fractional_gpu_sweep_runs_four_trials_at_once_on_two_gpus(tmp_path, tiny_model_dir, ray_with_logical_gpus):
    """gpus_per_worker 0.5 on a node with 2 (logical) GPUs: the sweep computes 4 concurrent trials from
    the GPU shares (the CPUs would allow 6), the 4 trials run at the same time, two per GPU, each worker
    sees the CUDA_VISIBLE_DEVICES Ray assigned it and trains on the CPU with gloo. The trials also run
    bf16-mixed with 2 micro-batches per step and activation checkpointing, end to end."""
    from mlflow import MlflowClient

    from pipeline.config.sweep import load_sweep_config
    from pipeline.sweep.driver import run_sweep

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = {
        "name": "frac",
        "base": {
            "model": str(tiny_model_dir),
            "adapter": {"preset": "rlora", "r": 4, "num_heads": 2},
            "data": {"tasks": ["sst2"], "train_per_task": 48, "eval_per_task": 6, "max_length": 64},
            "train": {"steps": 16, "batch_size": 2, "grad_accum": 2, "eval_every": 16, "eval_at_start": False,
                      "precision": "bf16-mixed", "gradient_checkpointing": True, "warmup_steps": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": True, "gpus_per_worker": 0.5,
                        "max_failures": 0},
            "mlflow": {"tracking_uri": db, "experiment": "frac"},
            "output_dir": str(tmp_path / "out"),
        },
        "search": {"train.lr": {"choice": [1e-3, 2e-3, 3e-3, 4e-3]}},
        "tune": {"search_alg": "grid", "num_samples": 1, "scheduler": "none"},
        "eval": {"enabled": False},
    }
    path = tmp_path / "frac.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_sweep(load_sweep_config(str(path), []), str(path))
    assert out["summary"]["done"] == 4 and out["timing"]["sweep/slots"] == 4
    lifetimes = train_worker_lifetimes(ray_with_logical_gpus)
    client = MlflowClient(tracking_uri=db)
    exp = client.get_experiment_by_name("frac")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rlora.trial_id")]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    # all four ran at once, as Ray scheduled them: each trial's Train worker actor holds its GPU share
    # from its creation to its shutdown, and every one was created before any was shut down (what
    # the Ray state API recorded, not the training loops, whose start a loaded machine staggers)
    assert len(lifetimes) == 4, lifetimes
    assert max(a for a, _ in lifetimes.values()) < min(b for _, b in lifetimes.values()), lifetimes
    # two trials per GPU; each worker saw exactly the GPU Ray gave it, and computed on the CPU with gloo
    gpus = [r.data.tags["ray.gpu_ids"] for r in trials]
    assert collections.Counter(gpus) == {"0": 2, "1": 2}, gpus
    for r in trials:
        assert r.data.tags["cuda_visible_devices"] == r.data.tags["ray.gpu_ids"]
        assert r.data.tags["device"] == "cpu"
        assert r.data.params["resolved.backend"] == "gloo" and r.data.params["resolved.use_gpu"] == "True"
        assert r.data.params["resolved.effective_batch_size"] == "4"  # batch 2 x 2 micro-batches x 1 worker
        assert r.data.params["train.precision"] == "bf16-mixed"
        losses = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, 17)) and all(math.isfinite(m.value) for m in losses)
        assert "eval/mean_acc_stderr" in r.data.metrics


@pytest.mark.parametrize("scaling, expected", [
    ({"use_gpu": True, "gpus_per_worker": 0.5}, 4),  # GPU shares bind: 2 / 0.5
    ({"use_gpu": True, "gpus_per_worker": 0.25}, 6),  # CPUs bind: 6 / 1
    ({"use_gpu": True, "gpus_per_worker": 1}, 2),
    ({"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2}, 2),
    ({"use_gpu": False}, 6),
    ({"use_gpu": False, "cpus_per_worker": 4}, 1),
])
def test_trial_concurrency_from_cpus_and_gpu_shares(ray_with_logical_gpus, scaling, expected):
    from pipeline.config.sweep import SweepConfig
    from pipeline.sweep.tuner import concurrency

    cfg = SweepConfig.model_validate({"name": "c", "base": {"scaling": scaling},
                                      "search": {"train.lr": {"choice": [1e-3]}}})
    assert concurrency(cfg) == expected


def test_a_trial_that_needs_more_gpus_than_the_cluster_has_is_one_error(ray_with_logical_gpus):
    from pipeline.config.loading import ConfigError
    from pipeline.config.sweep import SweepConfig
    from pipeline.sweep.tuner import concurrency

    cfg = SweepConfig.model_validate({"name": "c", "base": {"scaling": {"use_gpu": True, "num_workers": 3}},
                                      "search": {"train.lr": {"choice": [1e-3]}}})
    with pytest.raises(ConfigError, match="a trial needs 3 GPU but the cluster has 2"):
        concurrency(cfg)


@pytest.mark.slow
def test_eval_actors_take_gpu_shares(ray_with_logical_gpus, tiny_model_dir):
    """eval.gpus_per_worker 0.5 on 2 (logical) GPUs: four eval actors run at once, two per GPU, and
    score on the CPU as the workers do (this torch has no CUDA)."""
    from eval.harness import EvalJob, EvalSettings, evaluate_jobs

    settings = EvalSettings(model=str(tiny_model_dir), tasks=("rlora_heldout_sst2",), limit=2)
    jobs = [EvalJob(f"base-{i}") for i in range(4)]
    results = evaluate_jobs(settings, jobs, use_gpu=True, gpus_per_worker=0.5, progress=False)
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    assert len({r["pid"] for r in results}) == 4  # one actor per job: four GPU shares at once
    assert collections.Counter(g for r in results for g in r["gpu_ids"]) == {"0": 2, "1": 2}
    assert len({repr(r["scores"]) for r in results}) == 1  # the same model scored alike everywhere


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()] and "no CUDA device" in proc.stdout
    assert not (ROOT / "benchmarks" / "results" / "gpu_check-cpu.json").exists()
