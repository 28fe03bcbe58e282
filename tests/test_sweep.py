"""The sweep for real: Ray Tune + Optuna + ASHA over Ray Train trials, MLflow sqlite."""

import json
import os
import signal
import urllib.parse
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_yaml(tmp_path, model_dir, name="t", search=None, tune=None, train=None, eval_=None):
    cfg = {
        "name": name,
        "base": {
            "model": str(model_dir),
            "adapter": {"preset": "rlora", "r": 4, "num_heads": 2},
            "data": {"tasks": ["sst2", "boolq"], "train_per_task": 48, "eval_per_task": 6, "max_length": 80},
            "train": {"steps": 6, "batch_size": 2, "eval_every": 3, "eval_at_start": False, "lr": 1e-3,
                      "warmup_steps": 1, **(train or {})},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sweeps"},
            "output_dir": str(tmp_path / "out"),
        },
        "search": search or {"adapter.num_heads": {"choice": [2, 3]}, "adapter.gamma": {"loguniform": [16, 128]}},
        "tune": {"num_samples": 2, "scheduler": "none", "seed": 0, **(tune or {})},
        "eval": eval_ or {"enabled": False},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def cli(args, timeout=720, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.sweep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def mlflow_runs(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "rlora.eval_role" not in r.data.tags]
    return client, parents, children


EVAL = {"top_k": 2, "tasks": ["bbh", "mmlu", "heldout_sst2"], "limit": 1, "gen_kwargs": "max_gen_toks=8",
        "registry_name": "t-adapters"}


def history_lengths(client, run_id, keys):
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path, tiny_model_dir):
    # ASHA with its only rung at the last step: it stops each trial when it reports step == max_t,
    # which must not cut the trial short before its adapter is uploaded
    proc = cli([str(sweep_yaml(tmp_path, tiny_model_dir, eval_=EVAL,
                               tune={"scheduler": "asha", "grace_period": 6, "max_concurrent_trials": 2}))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best eval/mean_acc" in proc.stdout and "parent run" in proc.stdout
    assert "standard error of about" in proc.stdout  # said before the sweep starts
    best_line = next(line for line in proc.stdout.splitlines() if line.startswith("best eval/mean_acc"))
    assert " ± " in best_line
    assert "The best trial is" in proc.stdout and "the second (Δ = " in proc.stdout
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" and c.data.tags["tune.status"] == "DONE" for c in children)
    assert len({c.data.tags["rlora.trial_id"] for c in children}) == 2
    for c in children:  # each child: params, step metrics, adapter
        assert c.data.params["adapter.num_heads"] in ("2", "3")
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) == 6
        assert "adapter" in {a.path for a in client.list_artifacts(c.info.run_id)}
    assert "search.adapter.gamma.loguniform" in parent.data.params
    assert parent.data.params["best.adapter.num_heads"] in ("2", "3")
    assert parent.data.metrics["sweep/trials"] == 2
    # each trial's start-up (pipeline.timeline) on its run; the sweep reports their median
    startups = [c.data.metrics["time/startup_s"] for c in children]
    assert all(s > c.data.metrics["time/phase/worker_init_s"] > 0 for s, c in zip(startups, children))
    assert parent.data.metrics["sweep/trial_startup_median_s"] == pytest.approx(sum(startups) / 2)
    # the first trial to start (by its driver's stamp) apart from the later ones (here: one)
    split = [parent.data.metrics[f"sweep/trial_startup_{k}_s"] for k in ("first", "later_median")]
    assert sorted(split) == pytest.approx(sorted(startups))
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "trials")}
    assert {"trials/trials.md", "trials/trials.csv", "trials/trials.html"} <= arts
    check_paired_trials(tmp_path, client, parent, children)
    check_base_model_row(tmp_path, client, parent, children, tiny_model_dir, proc.stdout)
    assert "figures/objective_vs_params.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    # the Optuna study persists and can be inspected
    import optuna

    sweep_dir = Path(parent.data.tags["sweep_dir"])
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    check_eval_stage(tmp_path, client, parent, children, proc.stdout)
    check_registered_version_loads_back(tmp_path, client, parent, tiny_model_dir)
    check_what_the_mlflow_ui_reads(tmp_path, parent, children)
    check_console(proc, client, parent, sweep_dir, tmp_path)


def check_console(proc, client, parent, sweep_dir, tmp_path):
    """The terminal gets the project's lines, Tune's trials table and the eval bar; every worker's
    output (forwarded by Ray) only goes to the log file, which is attached to the parent run."""
    term = proc.stdout + proc.stderr
    assert "(RayTrainWorker pid=" not in term and "(TrainController pid=" not in term
    assert "(Evaluator pid=" not in term and "core_worker.cc" not in term
    table = ("Trial status:", "Current time:", "Logical resource usage:", "Current best trial:", "╭", "│", "├", "╰",
             "|", "eval (")
    other = [line for line in term.splitlines() if line.strip() and not line.lstrip("\r").startswith(table)]
    assert len(other) <= 30, other
    log = (sweep_dir / "sweep.log").read_text()
    assert "(RayTrainWorker pid=" in log and "(Evaluator pid=" in log  # kept, not lost
    assert "best eval/mean_acc" in log and "eval stage (" in log  # the summary too
    attached = Path(client.download_artifacts(parent.info.run_id, "logs/sweep.log", str(tmp_path / "log")))
    assert "(RayTrainWorker pid=" in attached.read_text()


def check_paired_trials(tmp_path, client, parent, children):
    """The trials table carries objective ± se and the runner-up's paired difference to the best,
    recomputed here from the two trials' per-example tables; eval.compare says the same."""
    import pandas as pd

    from pipeline.stats import paired_compare

    ranked = sorted(children, key=lambda c: -c.data.metrics["eval/mean_acc"])
    tables = [pd.read_parquet(client.download_artifacts(c.info.run_id, "examples/heldout-000006.parquet",
                                                        str(tmp_path / c.info.run_id))) for c in ranked]
    assert all(len(t) == 12 for t in tables)
    for c, t in zip(ranked, tables):
        assert c.data.metrics["eval/mean_acc"] == pytest.approx(t.groupby("task")["correct"].mean().mean())
    c = paired_compare(tables[1], tables[0])
    md = Path(client.download_artifacts(parent.info.run_id, "trials/trials.md", str(tmp_path))).read_text()
    assert "Δ vs best (95% CI)" in md.splitlines()[0]
    assert f"{100 * c.delta:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]" in md
    se = ranked[0].data.metrics["eval/mean_acc_stderr"]
    assert f"± {se:.4g}" in md
    assert parent.data.metrics["sweep/best_eval_mean_acc_stderr"] == pytest.approx(se)
    cmp = subprocess.run([sys.executable, "-m", "eval.compare", ranked[0].info.run_id, ranked[1].info.run_id,
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    back = paired_compare(tables[0], tables[1])
    assert f"held-out (macro over tasks), acc" in cmp.stdout
    assert f"Δ = {100 * back.delta:+.1f} points" in cmp.stdout
    bad = subprocess.run([sys.executable, "-m", "eval.compare", ranked[0].info.run_id, "0" * 32,
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr


def check_registered_version_loads_back(tmp_path, client, parent, model_dir):
    """``eval.run --adapter models:/name/version`` loads the registered adapter: its per-question
    MMLU log-probs equal those the eval stage logged for that trial, and are not the base model's."""
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    base_run = next(r for r in runs if r.data.tags.get("rlora.eval_role") == "base")
    v = client.search_model_versions("name='t-adapters'")[0]
    probe = client.create_run(parent.info.experiment_id).info.run_id
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--adapter", f"models:/t-adapters/{v.version}",
                           "--tasks", "mmlu", "--limit", "1", "--model", str(model_dir), "--tracking-uri", uri,
                           "--mlflow-run", probe, "--out", str(tmp_path / "probe.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]

    def mmlu(run_id):
        t = pd.read_parquet(client.download_artifacts(run_id, "examples/lmeval-000000.parquet",
                                                      str(tmp_path / ("p" + run_id))))
        return t[t["task"].str.startswith("mmlu/")].set_index(["task", "example_id"])["gold_logprob"].sort_index()

    got, logged, base = mmlu(probe), mmlu(v.run_id), mmlu(base_run.info.run_id)
    assert len(got) == 57 and list(got.index) == list(logged.index) == list(base.index)
    assert got.to_numpy() == pytest.approx(logged.to_numpy(), abs=1e-4)
    assert abs(got.to_numpy() - base.to_numpy()).max() > 1e-3


def rest(url, path, body=None):
    import urllib.request

    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def check_what_the_mlflow_ui_reads(tmp_path, parent, children):
    """Through a real MLflow server's REST API, what its UI shows: the experiment is a model-training
    one; the parent run's description carries the best trial, the verdicts, the trials table with a
    link to every trial and the eval stage; every trial has the mixture as dataset inputs (digest and
    per-task counts recomputed here) and its adapter as a READY logged model with its held-out scores
    linked; the registered versions were created from those logged models."""
    import hashlib
    from collections import Counter

    from pipeline.batching import build_mixture
    from pipeline.data import content_key
    from pipeline.server import start_server, stop_server

    server, url = start_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlartifacts"), port=0,
                               log_path=tmp_path / "ui-server.log")
    try:
        exp = rest(url, "experiments/get-by-name?experiment_name=sweeps")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
        runs = {r["info"]["run_id"]: r for r in rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                                          "max_results": 100})["runs"]}
        tags = {t["key"]: t["value"] for t in runs[parent.info.run_id]["data"]["tags"]}
        note = tags["mlflow.note.content"]
        best = parent.data.tags["best_trial"]
        assert f"**Best trial** [{best}](#/experiments/{exp['experiment_id']}/runs/{parent.data.tags['best_run']})" in note
        assert parent.data.tags["rlora.best_vs_runner_up"] in note and "## Trials" in note
        for c in children:
            assert f"(#/experiments/{exp['experiment_id']}/runs/{c.info.run_id})" in note
        assert "## Eval stage" in note and "Registered model `t-adapters`" in note and "bbh/avg" in note
        mix = build_mixture(["sst2", "boolq"], 48, 6, 0)
        expected = {}
        for split, examples, context in (("train", mix.train, "training"), ("held-out", mix.held_out, "evaluation")):
            digest = hashlib.sha256("\n".join(sorted(content_key(e) for e in examples)).encode()).hexdigest()[:16]
            expected[f"sst2+boolq/{split}"] = (digest, context, dict(Counter(e.task for e in examples)))
        versions = rest(url, "model-versions/search?filter=" + urllib.parse.quote("name='t-adapters'"))["model_versions"]
        by_run = {v["run_id"]: v for v in versions}
        assert by_run
        for c in children:
            run = rest(url, f"runs/get?run_id={c.info.run_id}")["run"]
            inputs = run["inputs"]["dataset_inputs"]
            got = {}
            for i in inputs:
                ds = i["dataset"]
                got[ds["name"]] = (ds["digest"], {t["key"]: t["value"] for t in i["tags"]}["mlflow.data.context"],
                                   json.loads(ds["profile"])["per_task"])
            assert got == expected, got
            (out,) = run["outputs"]["model_outputs"]
            model = rest(url, f"logged-models/{out['model_id']}")["model"]
            assert model["info"]["source_run_id"] == c.info.run_id and model["info"]["status"] == "LOGGED_MODEL_READY"
            linked = {m["key"]: m["value"] for m in sorted(model["data"]["metrics"], key=lambda m: int(m.get("step", 0)))}
            assert linked["eval/mean_acc"] == pytest.approx(c.data.metrics["eval/mean_acc"])
            assert linked["eval/mean_acc_stderr"] == pytest.approx(c.data.metrics["eval/mean_acc_stderr"])
            if c.info.run_id in by_run:  # registered by the eval stage: from this logged model
                v = by_run[c.info.run_id]
                assert v["source"] == f"models:/{out['model_id']}"
    finally:
        stop_server(server)


def check_base_model_row(tmp_path, client, parent, children, model_dir, stdout):
    """The driver scored the base model (no adapter) on the trials' held-out examples: its table
    on the parent run equals a scoring of the base model done here, and each trial's paired
    difference to it is in the trials table and, for the best, in the closing sentence."""
    import pandas as pd

    from pipeline.batching import build_mixture
    from pipeline.models import load_model
    from pipeline.scoring import score_choices
    from pipeline.stats import paired_compare

    base = pd.read_parquet(client.download_artifacts(parent.info.run_id, "examples/heldout-000000.parquet",
                                                     str(tmp_path / "base")))
    model, tok = load_model(str(model_dir))
    mine = pd.DataFrame(score_choices(model.eval(), tok, build_mixture(["sst2", "boolq"], 48, 6, 0).held_out, 80))
    merged = base.merge(mine, on=["task", "example_id"], suffixes=("", "_here"))
    assert len(merged) == len(base) == 12
    assert (merged["correct"] == merged["correct_here"]).all()
    assert merged["gold_logprob"].to_numpy() == pytest.approx(merged["gold_logprob_here"].to_numpy(), abs=1e-4)
    assert parent.data.metrics["sweep/base_eval_mean_acc"] == pytest.approx(base.groupby("task")["correct"].mean().mean())
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials/trials.csv", str(tmp_path / "csv")))
    cells = dict(zip(csv["mlflow_run"], csv["Δ vs base (95% CI)"]))
    ranked = sorted(children, key=lambda c: -c.data.metrics["eval/mean_acc"])
    for c in ranked:
        t = pd.read_parquet(client.download_artifacts(c.info.run_id, "examples/heldout-000006.parquet",
                                                      str(tmp_path / ("b" + c.info.run_id))))
        assert set(zip(t["task"], t["example_id"])) == set(zip(base["task"], base["example_id"]))
        d = paired_compare(t, base)
        assert cells[c.info.run_id] == f"{100 * d.delta:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"
        if c is ranked[0]:
            assert f"the base model (Δ = {100 * d.delta:+.1f} points" in stdout
            assert parent.data.tags["rlora.best_vs_base"].startswith("the best trial is")


def check_eval_stage(tmp_path, client, parent, children, stdout):
    """After the sweep: base + both trials scored, adapters registered, comparison on the parent;
    re-running the stage adds no metric points and no versions."""
    from eval.mmlu import load_all

    assert "eval stage" in stdout and "| model |" in stdout
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    base = [r for r in runs if r.data.tags.get("rlora.eval_role") == "base"]
    assert len(base) == 1
    subjects = list(load_all())
    keys = ["bbh/avg", "bbh/navigate", "bbh/word_sorting", "mmlu/avg", "mmlu/stem", "mmlu/humanities",
            f"mmlu/{subjects[0]}", f"mmlu/{subjects[-1]}", "heldout/sst2"]
    import pandas as pd

    for r in [*base, *children]:
        m = client.get_run(r.info.run_id).data.metrics
        assert all(k in m and 0.0 <= m[k] <= 1.0 for k in keys), sorted(m)
        scores = [k for k in m if not k.endswith("_stderr")]
        assert len([k for k in scores if k.startswith("bbh/")]) == 28
        assert len([k for k in scores if k.startswith("mmlu/")]) == 62
        # lm-eval's own standard error beside every score; a family average over its questions
        # one question per subtask at limit 1: lm-eval gives no standard error (N/A) for a subtask nor
        # its groups; the family average's comes from the pooled questions (hand-computed here)
        assert f"mmlu/{subjects[0]}_stderr" not in m and "mmlu/stem_stderr" not in m
        ex = pd.read_parquet(client.download_artifacts(r.info.run_id, "examples/lmeval-000000.parquet",
                                                       str(tmp_path / r.info.run_id)))
        mmlu = ex[ex["task"].str.startswith("mmlu/")]
        assert len(mmlu) == len(subjects) and len(ex[ex["task"].str.startswith("bbh/")]) == 27
        assert m["mmlu/avg"] == pytest.approx(mmlu["correct"].mean())  # size-weighted = pooled
        assert mmlu["gold_logprob"].notna().all()
        for fam in ("mmlu", "bbh"):
            x = ex[ex["task"].str.startswith(fam + "/")]["correct"]
            assert m[f"{fam}/avg_stderr"] == pytest.approx(x.std(ddof=1) / len(x) ** 0.5)
    versions = client.search_model_versions("name='t-adapters'")
    assert {v.run_id for v in versions} == {c.info.run_id for c in children}
    for v in versions:
        m = client.get_run(v.run_id).data.metrics
        assert float(v.tags["bbh/avg"]) == pytest.approx(m["bbh/avg"], abs=1e-4)
        assert float(v.tags["mmlu/avg"]) == pytest.approx(m["mmlu/avg"], abs=1e-4)
        assert v.source.startswith("models:/m-")  # made from the trial's logged model
        assert client.get_logged_model(v.source[len("models:/"):]).source_run_id == v.run_id
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/comparison.md", "eval/comparison.html", "eval/comparison.png"} <= arts
    assert {"eval/comparison_paired.md", "eval/comparison_paired.csv"} <= arts
    table = Path(client.download_artifacts(parent.info.run_id, "eval/comparison.md", str(tmp_path))).read_text()
    main_table = table.split("\n\n")[0].strip().splitlines()
    assert len(main_table) == 2 + 3 and "| base |" in table  # header, rule, base + 2 trials
    assert " ± " in main_table[2]  # scores with their standard errors
    assert "Δ vs base" in table
    assert any(w in table for w in ("not distinguishable", "better than", "worse than"))
    before = {r.info.run_id: history_lengths(client, r.info.run_id, keys) for r in [*base, *children]}
    assert all(n == 1 for h in before.values() for n in h.values())

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    again = subprocess.run([sys.executable, "-m", "eval.run", "--sweep", parent.info.run_id, "--tracking-uri", uri,
                            "--out", str(tmp_path / "again")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=720)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "evaluated nothing new" in again.stdout
    after = {rid: history_lengths(client, rid, keys) for rid in before}
    assert after == before  # no duplicated metric points
    assert len(client.search_model_versions("name='t-adapters'")) == 2  # no new versions

    # different settings: a new evaluation round, one new point per metric at the next step
    third = subprocess.run([sys.executable, "-m", "eval.run", "--sweep", parent.info.run_id, "--tracking-uri", uri,
                            "--limit", "2", "--top-k", "1", "--out", str(tmp_path / "third")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=720)
    assert third.returncode == 0, third.stderr[-3000:]
    hist = client.get_metric_history(base[0].info.run_id, "mmlu/avg")
    assert sorted(h.step for h in hist) == [0, 1]
    assert len(client.search_model_versions("name='t-adapters'")) == 2


@pytest.mark.slow
def test_seeds_rank_each_configuration_by_its_mean_over_seeds(tmp_path, tiny_model_dir):
    """tune.seeds: 2 -> every trial is 2 Train runs (seeds 0 and 1) nested under the trial's child run,
    which carries the seed mean and a standard error over seeds and examples (hand-computed here)."""
    import math

    import pandas as pd

    proc = cli([str(sweep_yaml(tmp_path, tiny_model_dir, train={"steps": 4, "eval_every": 4},
                               tune={"seeds": 2, "max_concurrent_trials": 2,
                                     "train_in_trial": True}))])  # seed runs in the trial's process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs 2 seeds" in proc.stdout
    client, parents, children = mlflow_runs(tmp_path)
    trials = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(trials) == 2 and all(c.data.tags["tune.status"] == "DONE" for c in trials)
    for trial in trials:
        seeds = [c for c in children if c.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(c.data.params["train.seed"] for c in seeds) == ["0", "1"]
        vals = [c.data.metrics["eval/mean_acc"] for c in seeds]
        m = trial.data.metrics
        assert m["eval/mean_acc"] == pytest.approx(sum(vals) / 2)
        avg = pd.read_parquet(client.download_artifacts(trial.info.run_id, "examples/heldout-000004.parquet",
                                                        str(tmp_path / trial.info.run_id)))
        assert len(avg) == 12  # 6 per task, averaged over the 2 seeds
        per_task = avg.groupby("task")["correct"]
        se_examples = math.sqrt((per_task.var(ddof=1) / per_task.size()).sum()) / 2
        se_seeds = abs(vals[0] - vals[1]) / 2  # sd of two values / sqrt(2)
        assert m["eval/mean_acc_stderr"] == pytest.approx(math.sqrt(se_seeds ** 2 + se_examples ** 2))
        assert "adapter" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    chosen = next(c for c in trials if c.info.run_id == parents[0].data.tags["best_run"])
    assert chosen.data.metrics["eval/mean_acc"] == max(c.data.metrics["eval/mean_acc"] for c in trials)  # ties
    # the baselines report counts each trial's nested seed runs, one record per seed: its Avg cell is
    # the trial's own seed mean ± standard error (seeds and examples)
    from eval.baselines import collect, table

    arms = collect(client, parents[0].info.run_id, ["sst2", "boolq"])
    _, rows, _ = table(arms, ["sst2", "boolq"])
    for trial in trials:
        label, tid = trial.data.tags["rlora.adapter"], trial.data.tags["rlora.trial_id"]
        row = next(r for r in rows if r["adapter"] in (label, f"{label} [{tid}]"))
        m = trial.data.metrics
        assert row["seeds"] == 2
        assert row["Avg"] == f"{100 * m['eval/mean_acc']:.1f} ± {100 * m['eval/mean_acc_stderr']:.1f}"


@pytest.mark.slow
def test_nan_trial_fails_while_the_others_complete(tmp_path, tiny_model_dir):
    cfg = sweep_yaml(tmp_path, tiny_model_dir, search={"train.lr": {"grid": [1e-3, 1e12]}},
                     tune={"search_alg": "grid", "num_samples": 1, "train_in_trial": True},  # no Train retry to
                     train={"grad_clip": 1e30})  # stop either way: the trial process reports the NaN and fails
    proc = cli([str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 failed" in proc.stdout
    _, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    assert by_lr[1e-3].info.status == "FINISHED" and by_lr[1e-3].data.tags["tune.status"] == "DONE"
    bad = by_lr[1e12]
    assert bad.info.status == "FAILED" and bad.data.tags["tune.status"] == "ERROR"
    assert "NaN" in bad.data.tags["error"]


@pytest.mark.slow
def test_retry_errored_runs_the_failed_trial_again_and_nothing_else(tmp_path, tiny_model_dir):
    """A trial that failed for a reason since removed (its data directory did not exist yet) stays
    failed on a plain --resume; --resume --retry-errored runs it again into its own child run, which
    ends FINISHED without the old error tag, and does not rerun the trial that had finished."""
    from pipeline.data import data_dir

    good, late = str(data_dir()), tmp_path / "late-data"
    cfg = sweep_yaml(tmp_path, tiny_model_dir, search={"data.data_dir": {"grid": [good, str(late)]}},
                     tune={"search_alg": "grid", "num_samples": 1, "train_in_trial": True})  # the error raised in
    first = cli([str(cfg)])  # the trial's own process
    assert first.returncode == 0 and "1 failed" in first.stdout, first.stderr[-3000:]
    _, _, before = mlflow_runs(tmp_path)
    failed = next(c for c in before if c.data.params["data.data_dir"] == str(late))
    assert failed.info.status == "FAILED" and "data directory not found" in failed.data.tags["error"]
    late.symlink_to(good)
    plain = cli([str(cfg), "--resume"])
    assert plain.returncode == 0 and "1 failed" in plain.stdout, plain.stderr[-3000:]
    assert next(c for c in mlflow_runs(tmp_path)[2] if c.info.run_id == failed.info.run_id).info.status == "FAILED"

    retried = cli([str(cfg), "--resume", "--retry-errored"])
    assert retried.returncode == 0 and "0 failed" in retried.stdout, retried.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    again = next(c for c in children if c.info.run_id == failed.info.run_id)
    assert "error" not in again.data.tags and "eval/mean_acc" in again.data.metrics
    ok = next(c for c in children if c.info.run_id != failed.info.run_id)
    steps = [m.step for m in client.get_metric_history(ok.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 7))  # the finished trial was not rerun
    assert cli([str(cfg), "--retry-errored"]).returncode == 2  # meaningless without --resume: refused


@pytest.mark.slow
def test_the_base_model_is_scored_on_a_slot_the_last_trial_leaves_free(tmp_path, tiny_model_dir, monkeypatch):
    """Two slots, three trials, the last one long: the base model's held-out scoring runs while it
    trains (in the slot the second trial freed), not after it; the summary uses those scores. (The
    tail's estimate of how long the last trial has left, the median time of the ended ones, is set
    aside: here the ended trials are short by design.)"""
    monkeypatch.setenv("RLORA_BASE_MIN_TAIL_S", "0")
    cfg = sweep_yaml(tmp_path, tiny_model_dir, search={"train.steps": {"grid": [4, 60, 400]}},
                     tune={"num_samples": 1, "max_concurrent_trials": 2, "train_in_trial": True,
                           "search_alg": "grid"}, train={"eval_every": 1000})
    done = cli([str(cfg)])
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp_path)
    base_at = client.get_metric_history(parents[0].info.run_id, "sweep/base_eval_mean_acc")
    assert len(base_at) == 1
    long_run = next(c for c in children if c.data.params["train.steps"] == "400")
    assert long_run.info.status == "FINISHED"
    # logged while the 400-step trial was still training, seconds before its run ended
    assert base_at[0].timestamp < long_run.info.end_time - 2000, (base_at[0].timestamp, long_run.info.end_time)


def _checkpoint_steps(train_root, in_trial: bool) -> dict[str, list[int]]:
    """Per trial id, the steps of the checkpoints its training has kept: Ray Train's registered ones
    (its checkpoint manager's snapshot), or the ``step-NNNNNN`` directories a run trained in its
    trial's own process keeps (complete once they have that name)."""
    state = {}
    if in_trial:
        for d in train_root.glob("*/train/trial-*"):
            state[d.name[len("trial-"):]] = [int(c.name[len("step-"):]) for c in d.glob("step-*")]
        return state
    for snap in train_root.glob("*/train/trial-*/checkpoint_manager_snapshot.json"):
        try:
            state[snap.parent.name[len("trial-"):]] = [
                c["metrics"]["step"] for c in json.loads(snap.read_text())["checkpoint_results"]]
        except (OSError, ValueError):  # being written
            pass
    return state


def kill_sweep_when(cfg, ready, poll_s=0.1, timeout_s=600):
    """Start the sweep's driver, call ``ready()`` every ``poll_s`` until it returns something, then
    SIGKILL the driver and everything under it at once, as a machine failure would (Ray's own
    processes are the driver's descendants but not all in its process group, and left alone they go
    on for a second or two, long enough to register another checkpoint); returns what ready() said."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", str(cfg)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "sweep ended before it could be killed"
            found = ready()
            if found:
                break
            time.sleep(poll_s)
        else:
            pytest.fail("the sweep never reached the kill window")
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        proc.wait(30)
        return found
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.slow
def test_no_trial_has_an_mlflow_run_before_tunes_saved_state_names_it(tmp_path, tiny_model_dir):
    """The driver is killed the moment a later trial's MLflow child run appears (Tune saves its state
    every 10 s by default, a reused trial actor starts the next trial at once): every child run's
    trial is in the saved state, so --resume knows each of them and no run is left RUNNING."""
    from pipeline.tune_state import recorded

    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 3, "max_concurrent_trials": 1,
                                                     "train_in_trial": True}, train={"steps": 12, "eval_every": 6})

    def two_trial_runs():
        children = mlflow_runs(tmp_path)[2]
        return children if len(children) >= 2 else None

    children = kill_sweep_when(cfg, two_trial_runs, poll_s=0.05)
    tune_dir = next((tmp_path / "out" / "sweeps" / "t").glob("*/tune"))
    ids = [c.data.tags["rlora.trial_id"] for c in children]
    assert [recorded(str(tune_dir), t) for t in ids] == [True] * len(ids), ids

    resumed = cli([str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    children = mlflow_runs(tmp_path)[2]  # the killed trials resumed in their own runs, none added or left RUNNING
    assert set(ids) <= {c.data.tags["rlora.trial_id"] for c in children}
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]


@pytest.mark.slow
@pytest.mark.parametrize("in_trial", [False, True], ids=["ray_train", "in_trial"])
def test_sigkill_driver_then_resume_runs_each_trial_once(tmp_path, tiny_model_dir, in_trial):
    """The driver is SIGKILLed (its whole process group) after one trial finished and while the next
    is past its first checkpoint: --resume does not rerun the finished trial, and the interrupted one
    restarts from its last registered checkpoint in the same child run (the steps before it are not re-run).
    The same with each trial trained in its own process (``tune.train_in_trial``)."""
    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 3, "max_concurrent_trials": 1,
                                                     "train_in_trial": in_trial},
                     train={"steps": 40, "eval_every": 16})
    train_root = tmp_path / "out" / "sweeps" / "t"

    def mid_trial_past_a_checkpoint():
        # a finished trial, and another one with a registered checkpoint before its last: trials of the
        # tiny model run 16 steps a second, so the training storage is polled, not MLflow
        state = _checkpoint_steps(train_root, in_trial)
        mid = [t for t, ckpts in state.items() if ckpts and max(ckpts) < 40]
        return mid[0] if mid and any(40 in ckpts for ckpts in state.values()) else None

    mid_trial = kill_sweep_when(cfg, mid_trial_past_a_checkpoint)
    _, _, before = mlflow_runs(tmp_path)
    finished_before = {c.data.tags["rlora.trial_id"] for c in before if c.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 3
    mid = next(c.info.run_id for c in before if c.data.tags["rlora.trial_id"] == mid_trial)
    # the last checkpoint Ray Train had registered for it when everything died (16, or 32 if the
    # trial outran the polling on a loaded machine): the resume must start from exactly that one
    last_ckpt = max(_checkpoint_steps(train_root, in_trial)[mid_trial])
    assert last_ckpt in (16, 32), last_ckpt

    resumed = cli([str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags["rlora.trial_id"] for c in children]
    assert len(ids) == 3 and len(set(ids)) == 3  # every trial appears exactly once
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:  # trials finished before the kill were not rerun
        if c.data.tags["rlora.trial_id"] in finished_before:
            steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
            assert sorted(steps) == list(range(1, 41))
    # the trial killed mid-run: same child run, resumed from its last checkpoint, the steps up to it logged once
    again = next(c for c in children if c.data.tags["rlora.trial_id"] == mid_trial)
    assert again.info.run_id == mid
    resumed_from = [m.value for m in client.get_metric_history(mid, "resumed_from_step")]
    assert resumed_from == [float(last_ckpt)], (resumed_from, last_ckpt)
    steps = [m.step for m in client.get_metric_history(mid, "train/loss")]
    assert all(steps.count(s) == 1 for s in range(1, last_ckpt + 1)) and set(steps) == set(range(1, 41))


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"serch": {}}, "serch: unknown key"),
        ({"search": {"adapter.gamma": {"loguniform": [512, 8]}}}, "search.adapter.gamma: inverted or empty range [512.0, 8.0]"),
        ({"search": {"data.tasks": {"choice": ["five_task", "qqp"]}}}, "search.data.tasks: value 'qqp' is invalid"),
        ({"search": {"adapter.preset": {"choice": ["rlora", "moe"]}}}, "search.adapter.preset: value 'moe' is invalid"),
        ({"base": {"adapter": {"rank": 4}}}, "base.adapter.rank: unknown key"),
        ({"search": {"adapter.rank": {"choice": [4]}}}, "search.adapter.rank: not a run config field"),
        ({"tune": {"num_samples": 0}}, "tune.num_samples: Input should be greater than or equal to 1"),
        ({"tune": {"seeds": 2, "scheduler": "asha"}}, "tune.seeds: ASHA would stop trials on one seed's"),
        ({"tune": {"reuse_actors": True, "scheduler": "asha"}}, "tune.reuse_actors: not with scheduler asha"),
        ({"eval": {"tasks": ["mmlu"], "limit": {"bbh": 3}}}, "limit.bbh: not one of eval.tasks (mmlu)"),
        ({"tune": {"train_in_trial": True}, "base": {"scaling": {"num_workers": 2}}},
         "tune.train_in_trial: needs base.scaling.num_workers 1"),
        ({"tune": {"train_in_trial": True}, "base": {"storage": "s3://bucket/x"}},
         "tune.train_in_trial: needs base.scaling.num_workers 1 and no base.storage"),
    ],
)
def test_bad_sweep_yaml_exits_2_naming_the_key_before_ray_starts(tmp_path, capsys, patch, needle):
    import ray

    from pipeline.config import deep_merge
    from pipeline.sweep import main

    cfg = deep_merge({"name": "bad", "search": {"adapter.r": {"choice": [4, 8]}}}, patch)
    if "serch" in patch:
        cfg.pop("search")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main([str(p)]) == 2  # in process: the CLI's code (the subprocess form is the MLflow-fault tests')
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not ray.is_initialized()


def test_shipped_sweep_files_validate():
    from pipeline.config import load_sweep_config

    for name in ("smoke", "heads_gamma", "ablation", "baselines", "single_task"):
        cfg = load_sweep_config(ROOT / "sweeps" / f"{name}.yaml")
        assert cfg.name == name and cfg.search
    from pipeline.sweep import trial_run_config

    bl = load_sweep_config(ROOT / "sweeps" / "baselines.yaml")
    labels = [trial_run_config(bl.base.model_dump(mode="json"), {"adapter": v}, {"experiment": "e", "trial_name": "t"})
              .adapter.label for v in bl.search["adapter"].grid]
    assert labels == ["rlora-N3-r8", "hydralora-N3-r8", "lora_moe-N3-r8", "lora-r8", "lora-r24", "dora-r8",
                      "adalora-r12", "ia3", "prompt_tuning-v20", "p_tuning-v20", "prefix_tuning-v20", "full"]
    single = load_sweep_config(ROOT / "sweeps" / "single_task.yaml")
    methods = [trial_run_config(single.base.model_dump(mode="json"), {"adapter": v}, {"experiment": "e", "trial_name": "t"})
               .adapter.method for v in single.search["adapter"].grid]
    from typing import get_args

    from pipeline.config import AdapterSection

    assert set(methods) == set(get_args(AdapterSection.model_fields["method"].annotation))  # every method
    assert single.base.data.tasks == ["gsm8k"]
    assert single.tune.metric == "eval/gsm8k/answer_nll" and single.tune.mode == "min" and "gsm8k" in single.eval.tasks
    ab = load_sweep_config(ROOT / "sweeps" / "ablation.yaml")
    assert ab.search["adapter.preset"].grid == ["lora", "hydralora", "hydralora+mt", "hydralora+init", "rlora"]
    assert ab.search["train.seed"].grid == [0, 1, 2]
    over = load_sweep_config(ROOT / "sweeps" / "heads_gamma.yaml", ["tune.num_samples=64", "base.train.steps=500"])
    assert over.tune.num_samples == 64 and over.base.train.steps == 500


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_prints_how_to_resume(tmp_path, tiny_model_dir):
    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 2, "max_concurrent_trials": 1,
                                                     "train_in_trial": True},  # interrupted in the trial's process
                     train={"steps": 8, "eval_every": 4})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", str(cfg)], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # interrupt once the first trial has finished
            time.sleep(2)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            # the store is only read once the sweep has created it: a second process opening a
            # sqlite store while it is being created races MLflow's schema migration
            if not list(tmp_path.glob("out/sweeps/*/*/sweep_state.json")):
                continue
            _, _, children = mlflow_runs(tmp_path)
            if any(c.info.status == "FINISHED" for c in children):
                break
        # SIGINT to the driver. (A terminal's Ctrl-C reaches the whole process group, Ray's workers
        # included; then Tune can record the trials as errored instead of interrupted: known, open.)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "sweep interrupted; resume with:" in err and "--resume" in err
    _, parents, _ = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED"
    resume_cmd = err.split("resume with:\n")[1].splitlines()[0].split()  # Ray may log after it
    assert resume_cmd[:3] == ["python", "-m", "pipeline.sweep"]
    done = cli(resume_cmd[3:])
    assert done.returncode == 0, done.stderr[-3000:]
    _, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"
    ids = [c.data.tags["rlora.trial_id"] for c in children]
    seen = [(c.data.tags.get("rlora.trial_id"), c.info.status, c.data.tags.get("tune.status"), c.data.tags.get("error"))
            for c in children]
    assert len(ids) == 2 == len(set(ids)) and all(c.info.status == "FINISHED" for c in children), (
        f"{seen}\n--- first run:\n{err[-4000:]}\n--- resume:\n{done.stderr[-4000:]}")


@pytest.mark.slow
def test_ctrl_c_while_the_base_model_is_scored_after_the_trials_leaves_a_resumable_killed_sweep(
        tmp_path, tiny_model_dir, monkeypatch):
    """A Ctrl-C that lands after the trials, while the driver scores the base model (a minute on
    the main job): the parent run is KILLED (not left RUNNING), the resume command is printed, and
    ``--resume`` scores the base model, writes the summary and finishes the parent without training
    again. The interrupt is raised where the base scoring starts, in a real sweep run in this process."""
    import ray

    from pipeline import sweep
    from pipeline.config import load_sweep_config

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 1, "train_in_trial": True}, train={"steps": 2})
    monkeypatch.setattr(sweep, "score_base", interrupted)
    try:
        out = sweep.run_sweep(load_sweep_config(str(cfg), []), str(cfg))
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the sweep: its parent run is left RUNNING")
    finally:
        ray.shutdown()
    monkeypatch.undo()
    assert out.get("interrupted")
    client, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED" and [c.info.status for c in children] == ["FINISHED"]
    assert "sweep/base_eval_mean_acc" not in parents[0].data.metrics
    done = cli([str(cfg), "--resume", out["sweep_dir"]])
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED" and len(children) == 1 and "best_run" in parents[0].data.tags
    assert "sweep/base_eval_mean_acc" in parents[0].data.metrics
    assert len(client.get_metric_history(children[0].info.run_id, "train/loss")) == 2  # not trained again
    # the resumed driver's clock does not hold the trials' loops: no outside-loop share from it
    assert "sweep/outside_training_fraction" not in parents[0].data.metrics


def test_report_tables_round_in_markdown_and_html_but_keep_full_precision_in_csv(tmp_path):
    from pipeline.reports import write_table

    rows = [{"model": "t1", "adapter.gamma": "128.05327075231216", "score": 0.123456789, "run": "ab.cd"},
            {"model": "base", "adapter.gamma": None, "score": None, "run": "x"}]
    md, csv_path, page = write_table(rows, ["model", "adapter.gamma", "score", "run"], tmp_path, "cmp")
    assert md.read_text().splitlines()[2:] == ["| t1 | 128.1 | 0.1235 | ab.cd |", "| base | – | – | x |"]
    assert "128.05327075231216" in csv_path.read_text() and "0.123456789" in csv_path.read_text()
    assert "<td>128.1</td>" in page.read_text()


def test_compare_trials_gives_each_trial_its_paired_difference_to_best_and_base(tmp_path):
    """Known per-example outcomes in a real MLflow store: trial a is 20 of 40 better than the base
    model, trial b 2 of 40; the table says so (signs, values, resolved) and the closing sentences
    name the best trial against the runner-up and against the base model."""
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.reports import BASE_COL, DELTA_COL
    from pipeline.stats import examples_file, paired_compare, save_examples
    from pipeline.sweep import compare_trials

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))

    def table(n_right):
        return pd.DataFrame({"task": ["t"] * 40, "example_id": list(range(40)),
                             "correct": [1.0 if i < n_right else 0.0 for i in range(40)],
                             "gold_logprob": [-1.0] * 40, "margin": [0.0] * 40})

    base = table(10)
    rows = []
    for trial, right in (("a", 30), ("b", 12)):
        run = client.create_run(exp).info.run_id
        client.log_artifact(run, str(save_examples(table(right), tmp_path / trial / examples_file("heldout", 8))),
                            "examples")
        rows.append({"trial_id": trial, "mlflow_run": run})
    verdict, vs_base = compare_trials(rows, "eval/mean_acc", client, base)
    a, b = rows
    assert a[BASE_COL].startswith("+50.0 [") and a["vs base resolved"] == "yes"
    assert b[BASE_COL].startswith("+5.0 [") and b["vs base resolved"] == "no"
    assert b[DELTA_COL].startswith("-45.0 [") and b["resolved"] == "yes" and DELTA_COL not in a
    assert verdict.startswith("the best trial is better than the second (Δ = +45.0 points")
    c = paired_compare(table(30), base)
    assert vs_base == c.sentence("the best trial", "the base model")
    assert vs_base.startswith("the best trial is better than the base model (Δ = +50.0 points")
    assert compare_trials(rows, "eval/mean_acc", client)[1] is None  # no base table: no base column


@pytest.mark.slow
@pytest.mark.timeout(600)  # leaked placement groups make the sweep wait forever: fail, do not hang
@pytest.mark.parametrize("in_trial", [False, True], ids=["ray_train", "in_trial"])
def test_asha_stops_the_known_worse_trials_and_frees_their_placement_groups(tmp_path, tiny_model_dir, in_trial):
    """Four learning rates, tried in order, one at a time: two that train (4e-3, 3e-3) and two
    that leave the model where it started (2e-8, 1e-8), ranked on the gold answer's log-prob,
    which training on the same tasks raises. ASHA (rung at step 4 of 8) must stop both
    do-nothing trials, which MLflow then shows as STOPPED with 4 steps; the Ray Train placement
    groups of all four are removed (Ray state API); the sweep's best trial and the eval stage's
    top-2 selection match the objectives MLflow recorded. The same trained in each trial's own process
    (``tune.train_in_trial``): its reports reach Tune without Ray Train's callback, and a stopped
    trial's training ends with its actor."""
    import numpy as np
    import ray
    from mlflow import MlflowClient
    from ray.util.state import list_placement_groups

    from eval.stage import select_trials
    from pipeline.config import load_sweep_config
    from pipeline.sweep import run_sweep

    metric = "eval/mean_gold_logprob"
    path = sweep_yaml(tmp_path, tiny_model_dir, search={"train.lr": {"grid": [4e-3, 3e-3, 2e-8, 1e-8]}},
                      train={"steps": 8, "eval_every": 4},
                      tune={"search_alg": "grid", "num_samples": 1, "scheduler": "asha", "grace_period": 4,
                            "reduction_factor": 2, "max_concurrent_trials": 1, "metric": metric,
                            "train_in_trial": in_trial})
    try:
        out = run_sweep(load_sweep_config(str(path), []), str(path))
        address = ray.get_runtime_context().gcs_address
        deadline, live = time.time() + 120, None
        while time.time() < deadline:
            live = [pg for pg in list_placement_groups(address=address, detail=True) if pg.state != "REMOVED"]
            if not live:
                break
            time.sleep(2)
        assert not live, [(pg.placement_group_id, pg.state, pg.name) for pg in live]
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(out["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and out["summary"]["errored"] == 0
    # early stopping: no trial actor is reused (a stopped trial's actor is still inside fit())
    assert len({c.data.tags["ray.driver_pid"] for c in children}) == 4
    lrs = [4e-3, 3e-3, 2e-8, 1e-8]  # the order the trials ran in
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    at4 = {lr: next(m.value for m in client.get_metric_history(c.info.run_id, metric) if m.step == 4)
           for lr, c in by_lr.items()}
    assert min(at4[4e-3], at4[3e-3]) > max(at4[2e-8], at4[1e-8])  # the known quality ordering holds
    # ASHA's rule at the rung (step 4): a trial goes on unless it is below the median of the
    # trials that reached the rung before it; so both do-nothing trials must stop
    steps = {row["mlflow_run"]: row["steps"] for row in out["rows"]}
    seen = []
    for lr in lrs:
        c = by_lr[lr]
        stopped = bool(seen) and at4[lr] < float(np.percentile(seen, 50))
        seen.append(at4[lr])
        assert stopped or lr > 1e-6, lr
        assert c.data.tags["tune.status"] == ("STOPPED" if stopped else "DONE"), lr
        assert steps[c.info.run_id] == (4 if stopped else 8), lr
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) >= (4 if stopped else 8), lr
        assert c.info.status == "FINISHED"
        # every trial's start-up and loop are on its run, a stopped one's too (from its reports'
        # stamps), and a stopped run ends at its last report, before the next trial started
        assert {"time/startup_s", "time/phase/driver_s", "time/phase/loop_s"} <= set(c.data.metrics), lr
        if stopped and lr != lrs[-1]:
            assert c.info.end_time <= by_lr[lrs[lrs.index(lr) + 1]].info.start_time, lr
    assert all(row["startup_s"] is not None for row in out["rows"])
    # the overhead benchmark's breakdown of this sweep counts all four trials, the stopped ones too
    from benchmarks.sweep_overhead import analyse

    split = analyse(f"sqlite:///{tmp_path / 'mlflow.db'}", out["parent_run_id"])
    assert split["trials"] == 4
    # one trial at a time, in a known order: the first to start is the first learning rate's
    first = by_lr[lrs[0]].data.metrics["time/startup_s"]
    assert split["startup_first_s"] == pytest.approx(first)
    assert parent.data.metrics["sweep/trial_startup_first_s"] == pytest.approx(first)
    assert out["summary"]["stopped"] == sum(c.data.tags["tune.status"] == "STOPPED" for c in children) >= 2
    recorded = {c.info.run_id: c.data.metrics[metric] for c in children}
    assert parent.data.tags["best_run"] == max(recorded, key=recorded.get)
    done = sorted((c for c in children if c.data.tags["tune.status"] == "DONE"), key=lambda c: -recorded[c.info.run_id])
    top = select_trials(client, parent, metric, "max", 2)
    assert [r.info.run_id for r in top] == [c.info.run_id for c in done]
    assert [r.info.run_id for r in select_trials(client, parent, metric, "min", 1)] == [done[-1].info.run_id]
