"""Ray Train + MLflow, for real: a local Ray cluster and an sqlite MLflow store."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path, model_dir, **over):
    import yaml

    cfg = {
        "model": str(model_dir),
        "adapter": {"preset": "rlora", "r": 4, "num_heads": 3},
        "data": {"tasks": ["sst2", "boolq"], "train_per_task": 64, "eval_per_task": 8, "max_length": 96},
        "train": {"steps": 8, "batch_size": 4, "eval_every": 4, "checkpoint_every": 2, "lr": 1e-3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-train"},
        "output_dir": str(tmp_path / "out"),
    }
    for k, v in over.items():
        cfg[k].update(v)
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_cli(args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def only_run(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0], exp


@pytest.mark.slow
def test_two_worker_ddp_run_is_complete_in_mlflow(tmp_path, tiny_model_dir):
    proc = run_cli([str(write_yaml(tmp_path, tiny_model_dir))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run, exp = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    # params: the full resolved config
    p = run.data.params
    assert p["adapter.preset"] == "rlora" and p["scaling.num_workers"] == "2" and p["train.steps"] == "8"
    assert p["resolved.rlora.r"] == "4" and p["resolved.rlora.head_init"] == "random"
    assert "q_proj" in p["resolved.rlora.target_modules"] and p["model"] == str(tiny_model_dir)
    # step metrics for every step, eval metrics at the intervals
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))
    for key in ("train/lr", "train/grad_norm", "eval/sst2/acc", "eval/boolq/acc", "eval/mean_acc", "head_cos/mean"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/mean_acc")] == [0, 4, 8]
    # artifacts live beside the db (not ./mlruns), with the adapter and figures
    assert exp.artifact_location.startswith(str(tmp_path))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "figures"} <= names
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/head_similarity.png", "figures/curves.png"} <= figs
    assert not (ROOT / "mlruns").exists()


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_step_continues(tmp_path, tiny_model_dir):
    cfg = write_yaml(tmp_path, tiny_model_dir, train={"steps": 8, "checkpoint_every": 2, "eval_every": 8})
    proc = run_cli([str(cfg)], env_extra={"RLORA_TEST_KILL_RANK_AT_STEP": "1:5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run, _ = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert len(resumed) == 1
    # A checkpoint from before the kill at step 5 (Ray registers checkpoints asynchronously, so
    # the step-4 one can still be in flight when the worker dies: then step 2 is the last).
    start = int(resumed[0].value)
    assert start in (2, 4)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, 9))
    for s in range(1, 9):  # steps up to the checkpoint ran once; start+1..5 ran again; the rest once
        assert steps.count(s) == (2 if start < s <= 5 else 1), (s, steps)
    assert "eval/mean_acc" in run.data.metrics


@pytest.mark.parametrize(
    "text,needle",
    [
        ("adapter:\n  rank: 8\n", "adapter.rank: unknown key"),
        ("train:\n  steps: lots\n", "train.steps: Input should be a valid integer"),
        ("data:\n  tasks: [sst2, qqp]\n", "data.tasks: unknown task 'qqp'"),
        ("adapter:\n  preset: moe-lora\n", "adapter.preset: Input should be"),
    ],
)
def test_bad_run_yaml_exits_2_with_one_line_before_ray_starts(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    proc = run_cli([str(p)], timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and needle in lines[0]
    assert "ray" not in proc.stdout.lower() and "Started a local Ray instance" not in proc.stderr
