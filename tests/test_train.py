"""Training runs for real: Ray Train on a local Ray (one the module shares) or in the calling process,
MLflow sqlite stores. (A 2-worker run killed and resumed exactly is test_cluster's two-node test.)"""

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


def check_two_worker_ddp_run_is_complete_in_mlflow(tmp_path, tiny_model_dir):
    """A 2-worker DDP run as write_yaml makes it (8 steps, evals at 0, 4, 8), in MLflow: complete.
    (Run by test_cluster's two-node test on its uninterrupted reference run.)"""
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
    check_examples_and_stderr(client, run, tmp_path, steps=(0, 4, 8), n_per_task=8)
    # artifacts live beside the db (not ./mlruns), with the adapter and figures
    assert exp.artifact_location.startswith(str(tmp_path))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "figures"} <= names
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/head_similarity.png", "figures/curves.png"} <= figs
    assert not (ROOT / "mlruns").exists()
    check_phases(run)


def check_phases(run):
    """The run's wall time split into phases (pipeline.timeline): every phase measured, none
    negative, and together they span the run (MLflow's start and end, from the driver's first
    phase on: the run is created inside it)."""
    from pipeline.timeline import PHASES, STARTUP

    m = run.data.metrics
    phases = {k: m[f"time/phase/{k}_s"] for k in PHASES}
    assert all(v >= 0 for v in phases.values()), phases
    assert phases["worker_init"] > 0 and phases["loop"] > 0, phases  # the worker exists before it trains
    span = (run.info.end_time - run.info.start_time) / 1e3
    assert span - 0.5 <= sum(phases.values()) <= span + phases["driver"] + 0.5, (span, phases)
    assert m["time/startup_s"] == pytest.approx(sum(phases[k] for k in STARTUP))


def check_examples_and_stderr(client, run, tmp_path, steps, n_per_task):
    """The per-example table of every eval step is on the run (held-out scored in shards over the
    DDP ranks, gathered: each example once), and the logged metrics and standard errors equal a
    hand computation from it."""
    import math

    import pandas as pd

    arts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "examples"))
    assert arts == [f"examples/heldout-{s:06d}.parquet" for s in steps]
    t = pd.read_parquet(client.download_artifacts(run.info.run_id, arts[-1], str(tmp_path)))
    assert len(t) == 2 * n_per_task and not t.duplicated(["task", "example_id"]).any()
    assert t.groupby("task").size().to_dict() == {"boolq": n_per_task, "sst2": n_per_task}
    assert ((t["margin"] > 0) == (t["correct"] == 1)).all()
    m = run.data.metrics
    ses = []
    for task, g in t.groupby("task"):
        p, n = g["correct"].mean(), len(g)
        se = math.sqrt(p * (1 - p) / (n - 1))
        ses.append(se)
        assert m[f"eval/{task}/acc"] == pytest.approx(p) and m[f"eval/{task}/acc_stderr"] == pytest.approx(se)
    assert m["eval/mean_acc_stderr"] == pytest.approx(math.sqrt(sum(x * x for x in ses)) / 2)
    assert m["eval/mean_margin"] == pytest.approx(t.groupby("task")["margin"].mean().mean())
    assert m["eval/mean_margin_stderr"] > 0


def _score_rank(rank, world, model_dir, init_file, out_dir, examples):
    import pickle

    import torch.distributed as dist
    from conftest import init_gloo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.heldout import score_held_out

    init_gloo(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = score_held_out(model, tok, examples, 96, rank, world)
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(rows))
    finally:
        dist.destroy_process_group()


def test_held_out_scoring_sharded_over_ranks_equals_one_process(tmp_path, tiny_model_dir):
    """Two real gloo ranks each score half of the held-out set; the gathered rows equal one
    process scoring everything, example by example, on both ranks."""
    import pickle

    from conftest import spawn_ranks
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.batching import build_mixture
    from pipeline.train.heldout import score_held_out

    examples = build_mixture(["sst2", "siqa"], 0, 7, seed=0).held_out  # 14: uneven shards
    spawn_ranks(_score_rank, args=(2, str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path), examples))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    single = score_held_out(model, tok, examples, 96)
    for rank in (0, 1):
        rows = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert [r["example_id"] for r in rows] == [r["example_id"] for r in single]
        for a, b in zip(rows, single):
            assert a["correct"] == b["correct"]
            assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-4)


def assert_same_end(tmp_path, client, run, ref_dir):
    """The run in ``tmp_path``'s store ended with the adapter weights, optimizer state, scheduler and
    loss curve (re-run steps included) of the only run in ``ref_dir``'s."""
    from safetensors.torch import load_file

    from pipeline.train.checkpoints import load_trainer_state

    ref_client, ref, _ = only_run(ref_dir)
    out = {}
    for name, r, root in (("resumed", run, tmp_path), ("ref", ref, ref_dir)):
        d = root / "out" / "runs" / r.info.run_id
        out[name] = (load_file(d / "adapter" / "adapter_model.safetensors"), load_trainer_state(d / "trainer_state.pt"))
    (wa, sa), (wb, sb) = out["resumed"], out["ref"]
    assert wa.keys() == wb.keys() and sa["step"] == sb["step"] == 8
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    for i, st in sb["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa["optimizer"]["state"][i][k], st[k], rtol=1e-5, atol=1e-8)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    ref_loss = {m.step: m.value for m in ref_client.get_metric_history(ref.info.run_id, "train/loss")}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):  # re-run steps included
        assert m.value == pytest.approx(ref_loss[m.step], rel=1e-5), m.step


@pytest.mark.parametrize(
    "text,needle",
    [
        ("adapter:\n  rank: 8\n", "adapter.rank: unknown key"),
        ("train:\n  steps: lots\n", "train.steps: Input should be a valid integer"),
        ("data:\n  tasks: [sst2, qqp]\n", "data.tasks: unknown task 'qqp'"),
        ("adapter:\n  preset: moe-lora\n", "adapter.preset: Input should be"),
    ],
)
def test_bad_run_yaml_exits_2_with_one_line_before_ray_starts(tmp_path, capsys, text, needle):
    import ray

    from pipeline.train.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert main([str(p)]) == 2  # in process: the CLI's code (the subprocess form is the MLflow-fault tests')
    out = capsys.readouterr()
    lines = [l for l in out.err.splitlines() if l.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and needle in lines[0]
    assert "ray" not in out.out.lower() and not ray.is_initialized()


class _Payload:
    """Stands for an arbitrary object in a tampered checkpoint (unpickling it would run code)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_trainer_state_round_trips_and_pickled_objects_are_refused(tmp_path):
    from pipeline.train.checkpoints import CheckpointError, load_trainer_state
    from pipeline.train.request import lr_schedule

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(2, 10))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    torch.save({"step": 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "ok.pt")
    state = load_trainer_state(tmp_path / "ok.pt")
    assert state["step"] == 1
    torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    torch.save({"step": 1, "optimizer": opt.state_dict(), "extra": _Payload()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        load_trainer_state(tmp_path / "bad.pt")


@pytest.mark.slow
def test_a_finished_trial_run_again_finishes_again_without_retraining(tmp_path, tiny_model_dir, local_ray):
    """What --resume does when Ctrl-C lands between a trial's run finishing and Tune recording its
    last report: the trial function runs again on the same child run and Train storage. It must
    end FINISHED with its one model output and no step trained twice (it failed on the duplicate
    run -> model output record, leaving the trial errored and its run unfinished)."""
    from mlflow.entities import LoggedModelStatus

    from pipeline.config.run import load_run_config
    from pipeline.train.driver import TrialRun, run_training

    cfg = load_run_config(write_yaml(tmp_path, tiny_model_dir, scaling={"num_workers": 1, "max_failures": 0}), [])
    outs = [run_training(cfg, quiet=True, trial=TrialRun("t1", "trial-t1", str(tmp_path / "ray")))
            for _ in range(2)]
    assert outs[0]["run_id"] == outs[1]["run_id"] and outs[0]["metrics"]["step"] == outs[1]["metrics"]["step"] == 8
    client, run, _ = only_run(tmp_path)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert [m.step for m in run.outputs.model_outputs] == [8]
    assert client.get_logged_model(run.outputs.model_outputs[0].model_id).status == LoggedModelStatus.READY
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))


def test_peak_memory_is_the_processes_peak_resident_set(tmp_path):
    """train/peak_mem_gb on a CPU worker: the process's own peak resident set, so touching 600 MiB
    more than it ever held raises it by about that much, freeing does not lower it, and a process
    started by a parent that holds 1 GiB does not inherit the parent's peak (the kernel carries
    ru_maxrss across fork + exec: CI's 3 GiB pytest process once made a == b)."""
    child = ("import torch; from pipeline.train.step import peak_memory_gb\n"
             "a = peak_memory_gb(torch.device('cpu'))\n"
             "x = torch.ones(600 * 2**20 // 4)\n"
             "b = peak_memory_gb(torch.device('cpu'))\n"
             "del x\n"
             "print(a, b, peak_memory_gb(torch.device('cpu')))\n")
    parent = ("import subprocess, sys, torch\n"
              "held = torch.ones(2**30 // 4)\n"
              f"sys.stdout.write(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True,"
              " check=True).stdout)\n")
    out = subprocess.run([sys.executable, "-c", parent], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b, c = map(float, out.stdout.split())
    assert 0.1 < a < 0.9 and a < b and 0.55 < b - a < 0.65
    assert c > b - 0.01  # a peak: freeing the 600 MiB does not lower it (VmHWM settles within pages)


IN_TRIAL = """
import json, sys, torch
from pipeline.config.run import load_run_config
held = torch.ones(2**31 // 4)  # 2 GiB this process held before the run: not the run's peak
del held
from pipeline.train.driver import TrialRun, run_training
cfg = load_run_config(sys.argv[1], [])
out = run_training(cfg, quiet=True, trial=TrialRun("t1", "trial-t1", sys.argv[2], in_trial=True))
print(json.dumps([out["run_id"], out["metrics"].get("step")]))
"""


@pytest.mark.slow
def test_in_trial_run_killed_resumes_exactly_and_a_finished_one_is_not_retrained(tmp_path, tiny_model_dir, local_ray):
    """tune.train_in_trial: the run in the calling process (no Ray Train workers). Its process is
    SIGKILLed after step 5; run again (what --resume --retry-errored does) it continues from its
    last kept checkpoint (step 4) in the same MLflow run and ends equal to an uninterrupted run;
    run a third time, it trains nothing and reports the same finished run. The killed run and the
    resumed one run in fresh processes (each one's peak memory is its own); the third call and the
    uninterrupted reference in this one."""
    import json

    from pipeline.config.run import load_run_config
    from pipeline.train.driver import TrialRun, run_training

    def config(root):
        return write_yaml(root, tiny_model_dir, scaling={"num_workers": 1, "max_failures": 0},
                          train={"steps": 8, "checkpoint_every": 2, "eval_every": 4})

    def run_fresh(env=None):
        return subprocess.run([sys.executable, "-c", IN_TRIAL, str(config(tmp_path)), str(tmp_path / "storage")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def run_here(root):
        return run_training(load_run_config(config(root), []), quiet=True,
                            trial=TrialRun("t1", "trial-t1", str(root / "storage"), in_trial=True))

    killed = run_fresh({"RLORA_TEST_KILL_RANK_AT_STEP": "0:5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    kept = sorted(p.name for p in (tmp_path / "storage" / "trial-t1").glob("step-*"))
    assert kept == ["step-000002", "step-000004"]  # complete directories only, the newest two
    resumed = run_fresh()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id, step = json.loads(resumed.stdout.strip().splitlines()[-1])
    again = run_here(tmp_path)
    assert (again["run_id"], again["metrics"]["step"]) == (run_id, step) and step == 8
    client, run_, _ = only_run(tmp_path)
    assert run_.info.status == "FINISHED" and run_.info.run_id == run_id
    assert [m.value for m in client.get_metric_history(run_.info.run_id, "resumed_from_step")] == [4.0]
    steps = [m.step for m in client.get_metric_history(run_.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran twice (killed after logging it)
    assert [m.step for m in run_.outputs.model_outputs] == [8]
    peaks = [m.value for m in client.get_metric_history(run_.info.run_id, "train/peak_mem_gb")]
    assert len(peaks) == 2 and all(0.2 < p < 1.9 for p in peaks), peaks  # the evals at steps 4 and 8
    # the same run uninterrupted, in its own store
    ref_dir = tmp_path / "uninterrupted"
    ref_dir.mkdir()
    run_here(ref_dir)
    assert_same_end(tmp_path, client, run_, ref_dir)
