"""The sweep for real: Ray Tune + Optuna + ASHA, MLflow sqlite, trials trained in their own processes
(``tune.train_in_trial``) or through Ray Train.

One sweep run through the CLI as a user runs it (its own local Ray; 3 Optuna trials on 2 slots; ASHA;
the eval stage started in the sweep's tail; the registry) serves the end-to-end checks: each is its
own test reading that sweep's store (``smoke``). The other sweeps run in this process on the local
Ray the module shares (``local_ray``); a sweep whose driver is killed or interrupted runs in a child
process, and its resume in this one."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

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


def sweep_here(path, resume=None, retry_errored=False):
    """The sweep of ``path`` run in this process (on the module's local Ray): its summary dict."""
    from pipeline.config.sweep import load_sweep_config
    from pipeline.sweep.driver import run_sweep

    return run_sweep(load_sweep_config(str(path), []), str(path), resume, retry_errored=retry_errored)


def mlflow_runs(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "rlora.eval_role" not in r.data.tags]
    return client, parents, children


def history_lengths(client, run_id, keys):
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


def heldout_table(client, run_id, step, where, kind="heldout"):
    import pandas as pd

    return pd.read_parquet(client.download_artifacts(run_id, f"examples/{kind}-{step:06d}.parquet", str(where)))


def best_line_at(out):
    return out.index("best eval/mean_acc")


def hand_delta(a, b, column="correct"):
    """a − b on the examples both scored, macro over tasks, by hand: (Δ, its standard error)."""
    m = a.merge(b, on=["task", "example_id"], suffixes=("_a", "_b"))
    d = (m[f"{column}_a"] - m[f"{column}_b"]).groupby(m["task"])
    return d.mean().mean(), math.sqrt((d.var(ddof=1) / d.size()).sum()) / d.ngroups


def check_delta_cell(cell, delta, se, resolved=None):
    """A ``Δ [lo, hi]`` cell (points) shows the hand-computed Δ inside its interval, an interval no
    wider than a normal one of four standard errors each side, and "resolved" iff it excludes 0."""
    shown, lo, hi = (float(x) for x in re.fullmatch(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cell).groups())
    assert f"{100 * delta:+.1f}" == cell.split(" ")[0] and lo <= shown <= hi, (cell, delta)
    assert hi - lo <= 2 * 4 * 100 * se + 0.2, (cell, se)
    if resolved is not None and lo != 0 and hi != 0:
        assert resolved == ("yes" if lo > 0 or hi < 0 else "no"), (cell, resolved)


# ------------------------------------------------------------------ configuration and reports, no sweep
# (first in the file: they check that Ray has not started, and later tests start it in this process)

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

    from pipeline.config.loading import deep_merge
    from pipeline.sweep.cli import main

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
    from pipeline.config.sweep import load_sweep_config

    for name in ("smoke", "heads_gamma", "ablation", "baselines", "single_task"):
        cfg = load_sweep_config(ROOT / "sweeps" / f"{name}.yaml")
        assert cfg.name == name and cfg.search
    from pipeline.sweep.space import trial_run_config

    bl = load_sweep_config(ROOT / "sweeps" / "baselines.yaml")
    labels = [trial_run_config(bl.base.model_dump(mode="json"), {"adapter": v}, {"experiment": "e", "trial_name": "t"})
              .adapter.label for v in bl.search["adapter"].grid]
    assert labels == ["rlora-N3-r8", "hydralora-N3-r8", "lora_moe-N3-r8", "lora-r8", "lora-r24", "dora-r8",
                      "adalora-r12", "ia3", "prompt_tuning-v20", "p_tuning-v20", "prefix_tuning-v20", "full"]
    single = load_sweep_config(ROOT / "sweeps" / "single_task.yaml")
    methods = [trial_run_config(single.base.model_dump(mode="json"), {"adapter": v}, {"experiment": "e", "trial_name": "t"})
               .adapter.method for v in single.search["adapter"].grid]
    from typing import get_args

    from pipeline.config.run import AdapterSection

    assert set(methods) == set(get_args(AdapterSection.model_fields["method"].annotation))  # every method
    assert single.base.data.tasks == ["gsm8k"]
    assert single.tune.metric == "eval/gsm8k/answer_nll" and single.tune.mode == "min" and "gsm8k" in single.eval.tasks
    ab = load_sweep_config(ROOT / "sweeps" / "ablation.yaml")
    assert ab.search["adapter.preset"].grid == ["lora", "hydralora", "hydralora+mt", "hydralora+init", "rlora"]
    assert ab.search["train.seed"].grid == [0, 1, 2]
    over = load_sweep_config(ROOT / "sweeps" / "heads_gamma.yaml", ["tune.num_samples=64", "base.train.steps=500"])
    assert over.tune.num_samples == 64 and over.base.train.steps == 500



def test_report_tables_round_in_markdown_and_html_but_keep_full_precision_in_csv(tmp_path):
    from pipeline.reports import write_table

    rows = [{"model": "t1", "adapter.gamma": "128.05327075231216", "score": 0.123456789, "run": "ab.cd"},
            {"model": "base", "adapter.gamma": None, "score": None, "run": "x"}]
    md, csv_path, page = write_table(rows, ["model", "adapter.gamma", "score", "run"], tmp_path, "cmp")
    assert md.read_text().splitlines()[2:] == ["| t1 | 128.1 | 0.1235 | ab.cd |", "| base | – | – | x |"]
    assert "128.05327075231216" in csv_path.read_text() and "0.123456789" in csv_path.read_text()
    assert "<td>128.1</td>" in page.read_text()


# ------------------------------------------------------------------ one sweep through the CLI, many checks
SMOKE_EVAL = {"top_k": 3, "tasks": ["bbh", "mmlu", "heldout_sst2"], "limit": 1, "gen_kwargs": "max_gen_toks=8",
              "registry_name": "t-adapters"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir):
    """``python -m pipeline.sweep``: 3 Optuna trials on 2 slots, each trained in its trial's process
    (as ``make sweep`` does), ASHA with its only rung at the last step (it stops each trial when it
    reports step == max_t, which must not cut the trial short before its adapter is uploaded), the
    eval stage (BBH, MMLU, a held-out task; top-3, so every trial) started in the sweep's tail: the
    third trial starts when the first ends, and from then on the base model and every finished trial
    can be scored on the slot a trial freed."""
    tmp = tmp_path_factory.mktemp("smoke")
    # learning rates far apart, so the trials answer some held-out examples differently: a paired
    # difference of zero everywhere would pass any check of its sign or its pairing
    search = {"adapter.num_heads": {"choice": [2, 3]}, "adapter.gamma": {"loguniform": [16, 128]},
              "train.lr": {"loguniform": [1e-3, 5e-2]}}
    path = sweep_yaml(tmp, tiny_model_dir, eval_=SMOKE_EVAL, search=search,
                      tune={"scheduler": "asha", "grace_period": 6, "num_samples": 3, "max_concurrent_trials": 2,
                            "train_in_trial": True})
    proc = cli([str(path)])
    (tmp / "stdout.txt").write_text(proc.stdout)
    (tmp / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parents, children = mlflow_runs(tmp)
    assert len(parents) == 1
    return SimpleNamespace(tmp=tmp, path=path, proc=proc, client=client, parent=parents[0], children=children,
                           uri=f"sqlite:///{tmp / 'mlflow.db'}", model=tiny_model_dir,
                           ranked=sorted(children, key=lambda c: (-c.data.metrics["eval/mean_acc"],
                                                                  c.data.tags["rlora.trial_id"])))


@pytest.mark.slow
def test_smoke_sweep_says_its_precision_first_and_its_verdicts_last(smoke):
    out = smoke.proc.stdout
    assert out.index("standard error of about") < out.index("best eval/mean_acc")  # said before the sweep starts
    best_line = next(line for line in out.splitlines() if line.startswith("best eval/mean_acc"))
    se = smoke.ranked[0].data.metrics["eval/mean_acc_stderr"]
    assert f"= {smoke.ranked[0].data.metrics['eval/mean_acc']:.4f} ± {se:.4f}" in best_line
    assert f"; on the confirmation split confirm/mean_acc = {smoke.ranked[0].data.metrics['confirm/mean_acc']:.4f}" \
        in best_line
    assert out.index("confirmation split of 2 x 6 other examples") < best_line_at(out)  # its size, said first
    assert "The best trial (" in out and "the runner-up (" in out and "on the confirmation split (Δ = " in out
    assert "simultaneous 95 % CI over 2 comparisons" in out and "parent run" in out
    assert "3 trials (3 done, 0 stopped early by ASHA, 0 failed)" in out


@pytest.mark.slow
def test_smoke_sweep_records_the_parent_and_every_trial_in_mlflow(smoke):
    client, parent, children = smoke.client, smoke.parent, smoke.children
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" and c.data.tags["tune.status"] == "DONE" for c in children)
    assert len({c.data.tags["rlora.trial_id"] for c in children}) == 3
    for c in children:  # each child: params, step metrics, adapter
        assert c.data.params["adapter.num_heads"] in ("2", "3")
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
        assert "adapter" in {a.path for a in client.list_artifacts(c.info.run_id)}
    assert "search.adapter.gamma.loguniform" in parent.data.params
    best = smoke.ranked[0]
    assert parent.data.tags["best_run"] == best.info.run_id
    assert parent.data.params["best.adapter.num_heads"] == best.data.params["adapter.num_heads"]
    assert parent.data.metrics["sweep/trials"] == 3
    assert parent.data.metrics["sweep/best_eval_mean_acc_stderr"] == pytest.approx(best.data.metrics["eval/mean_acc_stderr"])
    assert parent.data.metrics["sweep/best_confirm_mean_acc"] == pytest.approx(best.data.metrics["confirm/mean_acc"])
    # each trial's start-up is the sum of its phases before the first step (pipeline.timeline); the
    # sweep reports their median, and the first trial to start apart from the median of the later ones
    import statistics

    from pipeline.timeline import STARTUP

    startups = [c.data.metrics["time/startup_s"] for c in children]
    for c in children:
        m = c.data.metrics
        assert m["time/startup_s"] > 0
        assert m["time/startup_s"] == pytest.approx(sum(m[f"time/phase/{k}_s"] for k in STARTUP))
    pm = parent.data.metrics
    assert pm["sweep/trial_startup_median_s"] == pytest.approx(statistics.median(startups))
    first = [i for i, s in enumerate(startups) if s == pytest.approx(pm["sweep/trial_startup_first_s"])]
    assert any(pm["sweep/trial_startup_later_median_s"] == pytest.approx(statistics.median(startups[:i] + startups[i + 1:]))
               for i in first), (startups, pm)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "trials")}
    assert {"trials/trials.md", "trials/trials.csv", "trials/trials.html"} <= arts
    assert "figures/objective_vs_params.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    import optuna  # the Optuna study persists and can be inspected

    sweep_dir = Path(parent.data.tags["sweep_dir"])
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


@pytest.mark.slow
def test_trials_table_gives_each_trial_its_paired_difference_to_the_best_by_hand(smoke, capsys):
    """Every trial's objective equals the macro accuracy of its per-example table on the selection
    split and its ``confirm/mean_acc`` that of its confirmation table (other examples); the trials
    table's ``Δ vs best`` of every other trial, and ``eval.compare``'s Δ of the best two, equal a
    paired difference computed here by hand from the confirmation tables."""
    client, ranked = smoke.client, smoke.ranked
    selection = [heldout_table(client, c.info.run_id, 6, smoke.tmp / ("s" + c.info.run_id)) for c in ranked]
    tables = [heldout_table(client, c.info.run_id, 6, smoke.tmp / ("t" + c.info.run_id), "confirm") for c in ranked]
    assert all(len(t) == 12 for t in tables + selection)
    assert not set(tables[0]["example_id"]) & set(selection[0]["example_id"])  # disjoint splits
    for c, t, s in zip(ranked, tables, selection):
        assert c.data.metrics["eval/mean_acc"] == pytest.approx(s.groupby("task")["correct"].mean().mean())
        assert c.data.metrics["confirm/mean_acc"] == pytest.approx(t.groupby("task")["correct"].mean().mean())
    results = list(Path(smoke.parent.data.tags["sweep_dir"]).rglob("result.json"))
    assert len(results) == 3 and not any("confirm/" in r.read_text() for r in results)  # Tune never sees it
    import pandas as pd

    csv = pd.read_csv(client.download_artifacts(smoke.parent.info.run_id, "trials/trials.csv", str(smoke.tmp / "csv")))
    rows = {r["mlflow_run"]: r for _, r in csv.iterrows()}
    assert csv.columns.tolist().count("Δ vs best (95% CI)") == 1
    for c, t in zip(ranked[1:], tables[1:]):
        delta, se = hand_delta(t, tables[0])
        check_delta_cell(rows[c.info.run_id]["Δ vs best (95% CI)"], delta, se, rows[c.info.run_id]["resolved"])
    md = Path(client.download_artifacts(smoke.parent.info.run_id, "trials/trials.md", str(smoke.tmp))).read_text()
    assert f"± {ranked[0].data.metrics['eval/mean_acc_stderr']:.4g}" in md
    from eval.compare import main as compare

    capsys.readouterr()
    assert compare([ranked[0].info.run_id, ranked[1].info.run_id, "--tracking-uri", smoke.uri]) == 0
    out = capsys.readouterr().out
    assert out.index("confirmation split (macro over tasks), acc") < out.index("held-out selection split")
    assert f"Δ = {100 * hand_delta(tables[0], tables[1])[0]:+.1f} points" in out
    assert compare([ranked[0].info.run_id, "0" * 32, "--tracking-uri", smoke.uri]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not found" in err


@pytest.mark.slow
def test_the_base_model_row_is_a_scoring_done_here_and_each_trial_is_paired_with_it(smoke):
    """The base model (no adapter) was scored on the trials' held-out examples and on their
    confirmation split: its tables (on the parent run; on its own child run, with
    ``confirm/mean_acc``) equal a scoring of the base model done here, and each trial's ``Δ vs base``
    cell (and, for the best, the closing sentence) is the paired difference on the confirmation
    split computed by hand."""
    import pandas as pd

    from pipeline.data.batching import build_mixture, confirmation_examples
    from pipeline.config.run import DataSection
    from pipeline.model.base import load_model
    from pipeline.model.scoring import score_choices

    client, parent = smoke.client, smoke.parent
    base_run = client.search_runs([parent.info.experiment_id], "tags.`rlora.eval_role` = 'base'")[0]
    base = heldout_table(client, parent.info.run_id, 0, smoke.tmp / "base")
    confirm = heldout_table(client, base_run.info.run_id, 0, smoke.tmp / "base_c", "confirm")
    model, tok = load_model(str(smoke.model))
    data = DataSection(tasks=["sst2", "boolq"], train_per_task=48, eval_per_task=6, confirm_per_task=6)
    for table, examples in ((base, build_mixture(["sst2", "boolq"], 48, 6, 0).held_out),
                            (confirm, confirmation_examples(data))):
        mine = pd.DataFrame(score_choices(model.eval(), tok, examples, 80))
        merged = table.merge(mine, on=["task", "example_id"], suffixes=("", "_here"))
        assert len(merged) == len(table) == 12
        assert (merged["correct"] == merged["correct_here"]).all()
        assert merged["gold_logprob"].to_numpy() == pytest.approx(merged["gold_logprob_here"].to_numpy(), abs=1e-4)
    assert parent.data.metrics["sweep/base_eval_mean_acc"] == pytest.approx(base.groupby("task")["correct"].mean().mean())
    assert base_run.data.metrics["confirm/mean_acc"] == pytest.approx(confirm.groupby("task")["correct"].mean().mean())
    assert base_run.data.metrics["confirm/mean_acc_stderr"] > 0
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials/trials.csv", str(smoke.tmp / "csv2")))
    cells = {r["mlflow_run"]: (r["Δ vs base (95% CI)"], r["vs base resolved"]) for _, r in csv.iterrows()}
    for c in smoke.ranked:
        t = heldout_table(client, c.info.run_id, 6, smoke.tmp / ("b" + c.info.run_id), "confirm")
        assert set(zip(t["task"], t["example_id"])) == set(zip(confirm["task"], confirm["example_id"]))
        delta, se = hand_delta(t, confirm)
        cell, resolved = cells[c.info.run_id]
        check_delta_cell(cell, delta, se, resolved)
        if c is smoke.ranked[0]:
            assert f"the base model on the confirmation split (Δ = {100 * delta:+.1f} points" in smoke.proc.stdout
            assert parent.data.tags["rlora.best_vs_base"].startswith(f"the best trial ({c.data.tags['rlora.trial_id']})")
    assert parent.data.tags["rlora.claims_split"] == "confirmation"
    # the resolved claims the parent lists are exactly the table's "yes" cells, each with its direction
    best_id = smoke.ranked[0].data.tags["rlora.trial_id"]
    listed = set(filter(None, parent.data.tags["rlora.claims_resolved"].split(",")))
    shown = set()
    for _, r in csv.iterrows():
        for col, ref, ok in (("Δ vs best (95% CI)", best_id, "resolved"), ("Δ vs base (95% CI)", "base", "vs base resolved")):
            if r.get(ok) == "yes":
                shown.add(f"{r['trial_id']}{'>' if r[col].startswith('+') else '<'}{ref}")
    assert listed == shown


EVAL_KEYS = ["bbh/avg", "bbh/navigate", "bbh/word_sorting", "mmlu/avg", "mmlu/stem", "mmlu/humanities",
             "heldout/sst2"]


def eval_runs(smoke):
    runs = smoke.client.search_runs([smoke.parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{smoke.parent.info.run_id}'")
    base = [r for r in runs if r.data.tags.get("rlora.eval_role") == "base"]
    assert len(base) == 1
    return base[0], [*base, *smoke.children]


@pytest.mark.slow
def test_the_eval_stage_scores_every_model_with_standard_errors_and_registers_every_trial(smoke):
    """After the sweep: the base model and all three trials scored on BBH, MMLU and the held-out task,
    lm-eval's standard error beside every score and a family's from its pooled questions (by hand);
    every trial registered from its logged model; the comparison on the parent run."""
    import pandas as pd

    from eval.mmlu import load_all

    client, parent = smoke.client, smoke.parent
    assert "eval stage" in smoke.proc.stdout and "| model |" in smoke.proc.stdout
    subjects = list(load_all())
    keys = [*EVAL_KEYS, f"mmlu/{subjects[0]}", f"mmlu/{subjects[-1]}"]
    _, models = eval_runs(smoke)
    for r in models:
        m = client.get_run(r.info.run_id).data.metrics
        assert all(k in m and 0.0 <= m[k] <= 1.0 for k in keys), sorted(m)
        scores = [k for k in m if not k.endswith("_stderr")]
        assert len([k for k in scores if k.startswith("bbh/")]) == 28
        assert len([k for k in scores if k.startswith("mmlu/")]) == 62
        # one question per subtask at limit 1: lm-eval gives no standard error (N/A) for a subtask nor
        # its groups; the family average's comes from the pooled questions (hand-computed here)
        assert f"mmlu/{subjects[0]}_stderr" not in m and "mmlu/stem_stderr" not in m
        ex = pd.read_parquet(client.download_artifacts(r.info.run_id, "examples/lmeval-000000.parquet",
                                                       str(smoke.tmp / r.info.run_id)))
        mmlu = ex[ex["task"].str.startswith("mmlu/")]
        assert len(mmlu) == len(subjects) and len(ex[ex["task"].str.startswith("bbh/")]) == 27
        assert m["mmlu/avg"] == pytest.approx(mmlu["correct"].mean())  # size-weighted = pooled
        assert mmlu["gold_logprob"].notna().all()
        for fam in ("mmlu", "bbh"):
            x = ex[ex["task"].str.startswith(fam + "/")]["correct"]
            assert m[f"{fam}/avg_stderr"] == pytest.approx(x.std(ddof=1) / len(x) ** 0.5)
    versions = client.search_model_versions("name='t-adapters'")
    assert {v.run_id for v in versions} == {c.info.run_id for c in smoke.children}
    for v in versions:
        m = client.get_run(v.run_id).data.metrics
        assert float(v.tags["bbh/avg"]) == pytest.approx(m["bbh/avg"], abs=1e-4)
        assert float(v.tags["mmlu/avg"]) == pytest.approx(m["mmlu/avg"], abs=1e-4)
        assert v.source.startswith("models:/m-")  # made from the trial's logged model
        assert client.get_logged_model(v.source[len("models:/"):]).source_run_id == v.run_id
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/comparison.md", "eval/comparison.html", "eval/comparison.png"} <= arts
    assert {"eval/comparison_paired.md", "eval/comparison_paired.csv"} <= arts
    table = Path(client.download_artifacts(parent.info.run_id, "eval/comparison.md", str(smoke.tmp))).read_text()
    main_table = table.split("\n\n")[0].strip().splitlines()
    assert len(main_table) == 2 + 4 and "| base |" in table  # header, rule, base + 3 trials
    assert " ± " in main_table[2]  # scores with their standard errors
    import pandas as pd  # each model's confirmation score beside the selection score that chose it

    cmp = pd.read_csv(client.download_artifacts(parent.info.run_id, "eval/comparison.csv", str(smoke.tmp / "cmp")))
    for _, r in cmp.iterrows():
        assert r["confirm/mean_acc"] == pytest.approx(client.get_run(r["run_id"]).data.metrics["confirm/mean_acc"])
    assert "Δ vs base" in table
    assert any(w in table for w in ("not distinguishable", "better than", "worse than"))


@pytest.mark.slow
def test_the_eval_stage_starts_in_the_sweeps_tail_and_scores_each_model_once(smoke):
    """The eval stage started in the sweep's tail: the base model and the finished trials were sent
    to be scored while the last trial still trained (the sweep's log, one console in the order things
    happened, has the tail's line before that trial's end), and nothing the tail scored was scored
    again after the sweep."""
    client, parent = smoke.client, smoke.parent
    summary = json.loads((Path(parent.data.tags["sweep_dir"]) / "eval" / "eval_stage.json").read_text())
    assert "base" in summary["tail"] and len(summary["tail"]) >= 2, summary["tail"]
    assert not summary["failed"] and len(summary["rows"]) == 4
    log = (Path(parent.data.tags["sweep_dir"]) / "sweep.log").read_text().splitlines()
    ends = [i for i, line in enumerate(log) if re.match(r"Trial run_trial_\w+ completed after", line)]
    tail = [i for i, line in enumerate(log) if line.startswith("eval stage, in the sweep's tail: scoring ")]
    assert len(ends) == 3 and tail, log
    first = log[tail[0]]
    assert "base" in first.split("scoring ", 1)[1].split(", ") and tail[0] < ends[-1], (first, log[ends[-1]])
    _, models = eval_runs(smoke)
    by_name = {r.data.tags.get("rlora.trial_id", "base"): r for r in models}
    for name in by_name:  # scored once: in the tail, or by the stage after the sweep
        assert len(client.get_metric_history(by_name[name].info.run_id, "mmlu/avg")) == 1, name


@pytest.mark.slow
def test_a_registered_version_loaded_back_by_eval_run_scores_as_the_eval_stage_logged_it(smoke, monkeypatch):
    """``eval.run --adapter models:/name/version`` loads the registered adapter: its per-question MMLU
    log-probs equal those the eval stage logged for that trial, and are not the base model's."""
    import pandas as pd

    from eval.run import main

    client = smoke.client
    base_run, _ = eval_runs(smoke)
    v = client.search_model_versions("name='t-adapters'")[0]
    probe_exp = client.create_experiment("probe", artifact_location=str(smoke.tmp / "probe"))  # not the sweep's
    probe = client.create_run(probe_exp).info.run_id
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert main(["--adapter", f"models:/t-adapters/{v.version}", "--tasks", "mmlu", "--limit", "1",
                 "--model", str(smoke.model), "--tracking-uri", smoke.uri, "--mlflow-run", probe,
                 "--out", str(smoke.tmp / "probe.json")]) == 0

    def mmlu(run_id):
        t = pd.read_parquet(client.download_artifacts(run_id, "examples/lmeval-000000.parquet",
                                                      str(smoke.tmp / ("p" + run_id))))
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


@pytest.mark.slow
def test_what_the_mlflow_ui_reads_through_a_real_server(smoke):
    """Through a real MLflow server's REST API, what its UI shows: the experiment is a model-training
    one; the parent run's description carries the best trial, the verdicts, the trials table with a
    link to every trial and the eval stage; every trial has the mixture as dataset inputs (digest and
    per-task counts recomputed here) and its adapter as a READY logged model with its held-out scores
    linked; the registered versions were created from those logged models."""
    import hashlib
    from collections import Counter

    from pipeline.data.batching import build_mixture
    from pipeline.data import content_key
    from pipeline.cluster.server import start_server, stop_server

    parent, children = smoke.parent, smoke.children
    server, url = start_server(smoke.uri, str(smoke.tmp / "mlartifacts"), port=0, log_path=smoke.tmp / "ui-server.log")
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
        assert set(by_run) == {c.info.run_id for c in children}
        for c in children:
            run = rest(url, f"runs/get?run_id={c.info.run_id}")["run"]
            got = {}
            for i in run["inputs"]["dataset_inputs"]:
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
            assert by_run[c.info.run_id]["source"] == f"models:/{out['model_id']}"
    finally:
        stop_server(server)


@pytest.mark.slow
def test_the_terminal_shows_the_projects_lines_and_the_log_keeps_every_workers(smoke):
    """The terminal gets the project's lines, Tune's trials table and the eval bar; every worker's
    output (forwarded by Ray) only goes to the log file, which is attached to the parent run."""
    proc, client, parent = smoke.proc, smoke.client, smoke.parent
    term = proc.stdout + proc.stderr
    worker = re.compile(r"^\((?:[\w.]+ )?pid=\d+")
    assert not [line for line in term.splitlines() if worker.match(line.lstrip("\r"))]
    assert "core_worker.cc" not in term
    table = ("Trial status:", "Current time:", "Logical resource usage:", "Current best trial:", "╭", "│", "├", "╰",
             "|", "eval (")
    other = [line for line in term.splitlines() if line.strip() and not line.lstrip("\r").startswith(table)]
    # the eval stage's comparison (a sentence per model, family and reference) is printed as logged
    comparison = Path(client.download_artifacts(parent.info.run_id, "eval/comparison.md", str(smoke.tmp / "cmp")))
    bullets = [line for line in other if line.startswith("- ")]
    assert bullets and set(bullets) <= set(comparison.read_text().splitlines())
    assert len(other) - len(bullets) <= 30, "\n".join(other)
    log = (Path(parent.data.tags["sweep_dir"]) / "sweep.log").read_text()
    forwarded = [line for line in log.splitlines() if worker.match(line)]
    # kept, not lost: the eval stage's workers, and the base model's scoring where it ran in the tail
    assert forwarded and all(line.startswith(("(Evaluator pid=", "(_score_base_task pid=")) for line in forwarded)
    assert "best eval/mean_acc" in log and "eval stage (" in log  # the summary too
    attached = Path(client.download_artifacts(parent.info.run_id, "logs/sweep.log", str(smoke.tmp / "log")))
    assert forwarded[0] in attached.read_text()


@pytest.mark.slow
def test_rerunning_the_eval_stage_adds_nothing_and_new_settings_add_one_round(smoke, capsys):
    """``eval.run --sweep``: with the sweep's own settings it evaluates nothing new (no metric point,
    no model version added); with other settings it scores a new round at the next step. (Last of
    the smoke sweep's tests: it adds to the store they read.)"""
    from eval.run import main

    client = smoke.client
    base, models = eval_runs(smoke)
    before = {r.info.run_id: history_lengths(client, r.info.run_id, EVAL_KEYS) for r in models}
    assert all(n == 1 for h in before.values() for n in h.values())
    capsys.readouterr()
    assert main(["--sweep", smoke.parent.info.run_id, "--tracking-uri", smoke.uri, "--out", str(smoke.tmp / "again")]) == 0
    assert "evaluated nothing new" in capsys.readouterr().out
    assert {rid: history_lengths(client, rid, EVAL_KEYS) for rid in before} == before
    assert len(client.search_model_versions("name='t-adapters'")) == 3
    assert main(["--sweep", smoke.parent.info.run_id, "--tracking-uri", smoke.uri, "--limit", "2", "--top-k", "1",
                 "--out", str(smoke.tmp / "third")]) == 0
    assert sorted(h.step for h in client.get_metric_history(base.info.run_id, "mmlu/avg")) == [0, 1]
    assert len(client.search_model_versions("name='t-adapters'")) == 3


# ------------------------------------------------------------------ sweeps run in this process
@pytest.mark.slow
def test_seeds_rank_each_configuration_by_its_mean_and_a_diverging_one_fails_alone(tmp_path, tiny_model_dir,
                                                                                   local_ray):
    """tune.seeds: 2 -> every trial is 2 runs (seeds 0 and 1) nested under the trial's child run, which
    carries the seed mean and a standard error over seeds and examples (hand-computed here). The
    configuration whose loss diverges (learning rate 1e12) fails on its first seed, with NaN named in
    its error, and the other two complete; the baselines report counts each seed run once."""
    path = sweep_yaml(tmp_path, tiny_model_dir, search={"train.lr": {"grid": [1e-3, 2e-3, 1e12]}},
                      train={"steps": 4, "eval_every": 4, "grad_clip": 1e30},
                      tune={"seeds": 2, "search_alg": "grid", "num_samples": 1, "max_concurrent_trials": 2,
                            "train_in_trial": True})
    out = sweep_here(path)
    assert out["summary"] == {"trials": 3, "done": 2, "stopped": 0, "errored": 1}
    client, parents, runs = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"
    trials = {float(c.data.params["train.lr"]): c for c in runs
              if c.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    bad = trials.pop(1e12)
    assert bad.info.status == "FAILED" and bad.data.tags["tune.status"] == "ERROR" and "NaN" in bad.data.tags["error"]
    for trial in trials.values():
        assert trial.data.tags["tune.status"] == "DONE"
        seeds = [c for c in runs if c.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(c.data.params["train.seed"] for c in seeds) == ["0", "1"]
        vals = [c.data.metrics["eval/mean_acc"] for c in seeds]
        m = trial.data.metrics
        assert m["eval/mean_acc"] == pytest.approx(sum(vals) / 2)
        avg = heldout_table(client, trial.info.run_id, 4, tmp_path / trial.info.run_id)
        assert len(avg) == 12  # 6 per task, averaged over the 2 seeds
        per_task = avg.groupby("task")["correct"]
        se_examples = math.sqrt((per_task.var(ddof=1) / per_task.size()).sum()) / 2
        se_seeds = abs(vals[0] - vals[1]) / 2  # sd of two values / sqrt(2)
        assert m["eval/mean_acc_stderr"] == pytest.approx(math.sqrt(se_seeds ** 2 + se_examples ** 2))
        # the confirmation split, averaged over seeds the same way (its own examples, disjoint from these)
        confirms = [c.data.metrics["confirm/mean_acc"] for c in seeds]
        assert m["confirm/mean_acc"] == pytest.approx(sum(confirms) / 2)
        cavg = heldout_table(client, trial.info.run_id, 4, tmp_path / ("c" + trial.info.run_id), "confirm")
        assert len(cavg) == 12 and not set(cavg["example_id"]) & set(avg["example_id"])
        per_task = cavg.groupby("task")["correct"]
        se_examples = math.sqrt((per_task.var(ddof=1) / per_task.size()).sum()) / 2
        se_seeds = abs(confirms[0] - confirms[1]) / 2
        assert m["confirm/mean_acc_stderr"] == pytest.approx(math.sqrt(se_seeds ** 2 + se_examples ** 2))
        assert "adapter" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    chosen = next(c for c in trials.values() if c.info.run_id == parents[0].data.tags["best_run"])
    assert chosen.data.metrics["eval/mean_acc"] == max(c.data.metrics["eval/mean_acc"] for c in trials.values())
    from eval.reports.baselines import collect, table

    _, rows, _ = table(collect(client, parents[0].info.run_id, ["sst2", "boolq"]), ["sst2", "boolq"])
    assert len(rows) == 2  # the failed configuration has no finished seed to report
    for trial in trials.values():
        label, tid = trial.data.tags["rlora.adapter"], trial.data.tags["rlora.trial_id"]
        row = next(r for r in rows if r["adapter"] in (label, f"{label} [{tid}]"))
        m = trial.data.metrics
        assert row["seeds"] == 2
        assert row["Avg"] == f"{100 * m['eval/mean_acc']:.1f} ± {100 * m['eval/mean_acc_stderr']:.1f}"


@pytest.mark.slow
def test_retry_errored_runs_the_failed_trial_again_and_nothing_else(tmp_path, tiny_model_dir, local_ray):
    """A trial that failed for a reason since removed (its data directory did not exist yet) stays
    failed on a plain --resume; --resume --retry-errored runs it again into its own child run, which
    ends FINISHED without the old error tag, and does not rerun the trial that had finished."""
    from pipeline.data import data_dir
    from pipeline.sweep.cli import main

    good, late = str(data_dir()), tmp_path / "late-data"
    cfg = sweep_yaml(tmp_path, tiny_model_dir, search={"data.data_dir": {"grid": [good, str(late)]}},
                     tune={"search_alg": "grid", "num_samples": 1, "train_in_trial": True})
    assert sweep_here(cfg)["summary"]["errored"] == 1
    _, _, before = mlflow_runs(tmp_path)
    failed = next(c for c in before if c.data.params["data.data_dir"] == str(late))
    assert failed.info.status == "FAILED" and "data directory not found" in failed.data.tags["error"]
    late.symlink_to(good)
    assert sweep_here(cfg, resume="latest")["summary"]["errored"] == 1
    assert next(c for c in mlflow_runs(tmp_path)[2] if c.info.run_id == failed.info.run_id).info.status == "FAILED"

    assert sweep_here(cfg, resume="latest", retry_errored=True)["summary"]["errored"] == 0
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    again = next(c for c in children if c.info.run_id == failed.info.run_id)
    assert "error" not in again.data.tags and "eval/mean_acc" in again.data.metrics
    ok = next(c for c in children if c.info.run_id != failed.info.run_id)
    steps = [m.step for m in client.get_metric_history(ok.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 7))  # the finished trial was not rerun
    with pytest.raises(SystemExit) as refused:  # meaningless without --resume: refused by the CLI
        main([str(cfg), "--retry-errored"])
    assert refused.value.code == 2


@pytest.mark.slow
def test_the_base_model_is_scored_on_a_slot_the_last_trial_leaves_free(tmp_path, tiny_model_dir, local_ray,
                                                                      monkeypatch):
    """Two slots, three trials, the last one long: the base model's held-out scoring runs while it
    trains (in the slot the second trial freed), not after it: its score is logged before the long
    trial logs its last step; the summary uses those scores. (The tail's estimate of how long the last
    trial has left, the median time of the ended ones, is set aside: the ended trials are short by design.)"""
    monkeypatch.setenv("RLORA_BASE_MIN_TAIL_S", "0")
    cfg = sweep_yaml(tmp_path, tiny_model_dir, search={"train.steps": {"grid": [4, 40, 400]}},
                     tune={"num_samples": 1, "max_concurrent_trials": 2, "train_in_trial": True,
                           "search_alg": "grid"}, train={"eval_every": 1000})
    sweep_here(cfg)
    client, parents, children = mlflow_runs(tmp_path)
    base_at = client.get_metric_history(parents[0].info.run_id, "sweep/base_eval_mean_acc")
    assert len(base_at) == 1
    long_run = next(c for c in children if c.data.params["train.steps"] == "400")
    assert long_run.info.status == "FINISHED"
    losses = client.get_metric_history(long_run.info.run_id, "train/loss")
    last_step = max(losses, key=lambda m: m.step)
    assert last_step.step == 400 and base_at[0].timestamp < last_step.timestamp, (base_at[0], last_step)


def kill_sweep_when(cfg, ready, ray_address=None, poll_s=0.1, timeout_s=600):
    """Start the sweep's driver in a child process, call ``ready()`` every ``poll_s`` until it returns
    something, then SIGKILL the driver and everything under it at once; returns what ready() said.
    With ``ray_address`` the driver connects to that Ray (as a driver on a cluster's head node does)
    and the return waits until every actor of the dead driver's job (its trials, their Train
    controllers and workers; not the detached ones, which outlive their job by design) has exited:
    Ray kills them when their owner dies, and until then one could still register another
    checkpoint. Without it the driver starts its own local Ray, which dies with it, as on a machine
    failure (Ray's processes are the driver's descendants but not all in its process group)."""
    import ray
    from ray.util.state import list_actors

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", str(cfg)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_address or ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mine = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
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
        while ray_address and time.time() < deadline:  # the dead driver's actors: gone, their processes too
            theirs = [a for a in list_actors(address=ray_address, filters=[("state", "!=", "DEAD")], detail=True)
                      if a.job_id != mine and not a.is_detached]  # (Ray Train's autoscaling coordinator is detached)
            pids = [a.pid for a in theirs if a.pid and psutil.pid_exists(a.pid)]
            if not theirs and not pids:
                return found
            time.sleep(0.5)
        if ray_address:
            pytest.fail(f"the killed driver's actors outlived it: {theirs}")
        return found
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def store_ready(tmp_path) -> bool:
    """Whether the sweep has created its MLflow store (its state file is written after the parent run):
    a second process opening a sqlite store while it is being created races MLflow's schema migration."""
    return bool(list(tmp_path.glob("out/sweeps/*/*/sweep_state.json")))


@pytest.mark.slow
def test_no_trial_has_an_mlflow_run_before_tunes_saved_state_names_it(tmp_path, tiny_model_dir, local_ray):
    """The driver is killed the moment a later trial's MLflow child run appears (Tune saves its state
    every 10 s by default, a reused trial actor starts the next trial at once): every child run's
    trial is in the saved state, so --resume knows each of them and no run is left RUNNING."""
    from pipeline.sweep.tune_state import recorded

    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 3, "max_concurrent_trials": 1,
                                                     "train_in_trial": True}, train={"steps": 12, "eval_every": 6})

    def two_trial_runs():
        children = mlflow_runs(tmp_path)[2] if store_ready(tmp_path) else []
        return children if len(children) >= 2 else None

    children = kill_sweep_when(cfg, two_trial_runs, local_ray, poll_s=0.05)
    tune_dir = next((tmp_path / "out" / "sweeps" / "t").glob("*/tune"))
    ids = [c.data.tags["rlora.trial_id"] for c in children]
    assert [recorded(str(tune_dir), t) for t in ids] == [True] * len(ids), ids

    sweep_here(cfg, resume="latest")
    children = mlflow_runs(tmp_path)[2]  # the killed trials resumed in their own runs, none added or left RUNNING
    assert set(ids) <= {c.data.tags["rlora.trial_id"] for c in children}
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]


@pytest.mark.slow
@pytest.mark.parametrize("in_trial", [pytest.param(False, marks=pytest.mark.full), True], ids=["ray_train", "in_trial"])
def test_sigkill_driver_then_resume_runs_each_trial_once(tmp_path, tiny_model_dir, in_trial, local_ray):
    """The driver is SIGKILLed (its whole process group) after one trial finished and while the next
    is past its first checkpoint: --resume does not rerun the finished trial, and the interrupted one
    restarts from its last registered checkpoint in the same child run (the steps before it are not
    re-run). Trained in the trial's own process (``tune.train_in_trial``) in ``make test``, its driver
    connected to a Ray that survives it; through Ray Train as well in ``make test-all``, its driver
    running its own local Ray, which dies with it (a machine failure)."""
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

    mid_trial = kill_sweep_when(cfg, mid_trial_past_a_checkpoint, local_ray if in_trial else None)
    _, _, before = mlflow_runs(tmp_path)
    finished_before = {c.data.tags["rlora.trial_id"] for c in before if c.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 3
    mid = next(c.info.run_id for c in before if c.data.tags["rlora.trial_id"] == mid_trial)
    # the last checkpoint registered for it when everything died (16, or 32 if the trial outran the
    # polling on a loaded machine): the resume must start from exactly that one
    last_ckpt = max(_checkpoint_steps(train_root, in_trial)[mid_trial])
    assert last_ckpt in (16, 32), last_ckpt

    sweep_here(cfg, resume="latest")
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


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_prints_how_to_resume(tmp_path, tiny_model_dir, local_ray):
    """SIGINT to the sweep's driver once a trial has finished: exit 130, the parent run KILLED, the
    resume command printed; that command's sweep directory resumes to both trials FINISHED."""
    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 2, "max_concurrent_trials": 1,
                                                     "train_in_trial": True},  # interrupted in the trial's process
                     train={"steps": 8, "eval_every": 4})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", str(cfg)], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": local_ray},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # interrupt once the first trial has finished
            time.sleep(1)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            if store_ready(tmp_path) and any(c.info.status == "FINISHED" for c in mlflow_runs(tmp_path)[2]):
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
    assert resume_cmd[:3] == ["python", "-m", "pipeline.sweep"] and resume_cmd[4] == "--resume"
    done = sweep_here(resume_cmd[3], resume=resume_cmd[5])
    assert done["summary"]["done"] == 2
    _, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED"
    ids = [c.data.tags["rlora.trial_id"] for c in children]
    seen = [(c.data.tags.get("rlora.trial_id"), c.info.status, c.data.tags.get("tune.status"), c.data.tags.get("error"))
            for c in children]
    assert len(ids) == 2 == len(set(ids)) and all(c.info.status == "FINISHED" for c in children), (
        f"{seen}\n--- first run:\n{err[-4000:]}")


@pytest.mark.slow
def test_ctrl_c_while_the_base_model_is_scored_after_the_trials_leaves_a_resumable_killed_sweep(
        tmp_path, tiny_model_dir, local_ray, monkeypatch):
    """A Ctrl-C that lands after the trials, while the driver scores the base model (a minute on
    the main job): the parent run is KILLED (not left RUNNING), the resume command is printed, and
    ``--resume`` scores the base model, writes the summary and finishes the parent without training
    again. The interrupt is raised where the base scoring starts, in a real sweep run in this process."""
    from pipeline.sweep import driver

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cfg = sweep_yaml(tmp_path, tiny_model_dir, tune={"num_samples": 1, "train_in_trial": True}, train={"steps": 2})
    monkeypatch.setattr(driver, "score_base", interrupted)
    try:
        out = sweep_here(cfg)
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the sweep: its parent run is left RUNNING")
    monkeypatch.undo()
    assert out.get("interrupted")
    client, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "KILLED" and [c.info.status for c in children] == ["FINISHED"]
    assert "sweep/base_eval_mean_acc" not in parents[0].data.metrics
    sweep_here(cfg, resume=out["sweep_dir"])
    client, parents, children = mlflow_runs(tmp_path)
    assert parents[0].info.status == "FINISHED" and len(children) == 1 and "best_run" in parents[0].data.tags
    assert "sweep/base_eval_mean_acc" in parents[0].data.metrics
    assert len(client.get_metric_history(children[0].info.run_id, "train/loss")) == 2  # not trained again
    # the resumed driver's clock does not hold the trials' loops: no outside-loop share from it
    assert "sweep/outside_training_fraction" not in parents[0].data.metrics


@pytest.mark.slow
@pytest.mark.timeout(600)  # leaked placement groups make the sweep wait forever: fail, do not hang
@pytest.mark.parametrize("in_trial", [False, True], ids=["ray_train", "in_trial"])
def test_asha_stops_the_known_worse_trial_and_frees_its_placement_group(tmp_path, tiny_model_dir, in_trial, local_ray):
    """Learning rates tried in order, one at a time: ones that train (4e-3, 3e-3) and, between them,
    one that leaves the model where it started (1e-8), ranked on the gold answer's log-prob, which
    training on the same tasks raises. ASHA (rung at step 4 of 8) must stop the do-nothing trial,
    which MLflow then shows as STOPPED with 4 steps and ended before the next trial started; no
    placement group is left (Ray state API); the sweep's best trial and the eval stage's top-k
    selection match the objectives MLflow recorded. Trained in each trial's own process
    (``tune.train_in_trial``: its reports reach Tune without Ray Train's callback, and a stopped
    trial's training ends with its actor), and through Ray Train, where the first two trials show it
    (a stopped trial's Train workers and their placement group go with it)."""
    import numpy as np
    from mlflow import MlflowClient
    from ray.util.state import list_placement_groups

    from eval.stage import select_trials

    metric = "eval/mean_gold_logprob"
    lrs = [4e-3, 1e-8, 3e-3] if in_trial else [4e-3, 1e-8]  # the order the trials run in
    path = sweep_yaml(tmp_path, tiny_model_dir, search={"train.lr": {"grid": lrs}},
                      train={"steps": 8, "eval_every": 4},
                      tune={"search_alg": "grid", "num_samples": 1, "scheduler": "asha", "grace_period": 4,
                            "reduction_factor": 2, "max_concurrent_trials": 1, "metric": metric,
                            "train_in_trial": in_trial})
    out = sweep_here(path)
    deadline, live = time.time() + 120, None
    while time.time() < deadline:
        live = [pg for pg in list_placement_groups(address=local_ray, detail=True) if pg.state != "REMOVED"]
        if not live:
            break
        time.sleep(1)
    assert not live, [(pg.placement_group_id, pg.state, pg.name) for pg in live]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(out["parent_run_id"])
    children = [c for c in client.search_runs([parent.info.experiment_id],
                                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
                if "rlora.trial_id" in c.data.tags]  # the trials (the base model has a child run too)
    assert len(children) == len(lrs) and out["summary"]["errored"] == 0
    # early stopping: no trial actor is reused (a stopped trial's actor is still inside fit())
    assert len({c.data.tags["ray.driver_pid"] for c in children}) == len(lrs)
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    at4 = {lr: next(m.value for m in client.get_metric_history(c.info.run_id, metric) if m.step == 4)
           for lr, c in by_lr.items()}
    assert min(v for lr, v in at4.items() if lr > 1e-6) > at4[1e-8]  # the known quality ordering holds
    # ASHA's rule at the rung (step 4): a trial goes on unless it is below the median of the
    # trials that reached the rung before it; so the do-nothing trial must stop
    steps = {row["mlflow_run"]: row["steps"] for row in out["rows"]}
    seen = []
    for i, lr in enumerate(lrs):
        c = by_lr[lr]
        stopped = bool(seen) and at4[lr] < float(np.percentile(seen, 50))
        seen.append(at4[lr])
        assert stopped or lr > 1e-6, lr
        assert c.data.tags["tune.status"] == ("STOPPED" if stopped else "DONE"), lr
        assert steps[c.info.run_id] == (4 if stopped else 8), lr
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) >= (4 if stopped else 8), lr
        assert c.info.status == "FINISHED"
        if not stopped:  # ASHA stops a trial as it reports the last step: not before its adapter is saved
            assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(c.info.run_id, "adapter")}
        # every trial's start-up and loop are on its run, a stopped one's too (from its reports'
        # stamps), and a stopped run ends at its last report, before the next trial started
        assert {"time/startup_s", "time/phase/driver_s", "time/phase/loop_s"} <= set(c.data.metrics), lr
        if stopped and i + 1 < len(lrs):
            assert c.info.end_time <= by_lr[lrs[i + 1]].info.start_time, lr
    assert all(row["startup_s"] is not None for row in out["rows"])
    # the overhead benchmark's breakdown of this sweep counts every trial, the stopped one too
    from benchmarks.sweep_overhead import analyse

    split = analyse(f"sqlite:///{tmp_path / 'mlflow.db'}", out["parent_run_id"])
    assert split["trials"] == len(lrs)
    # one trial at a time, in a known order: the first to start is the first learning rate's
    first = by_lr[lrs[0]].data.metrics["time/startup_s"]
    assert split["startup_first_s"] == pytest.approx(first)
    assert parent.data.metrics["sweep/trial_startup_first_s"] == pytest.approx(first)
    assert out["summary"]["stopped"] == sum(c.data.tags["tune.status"] == "STOPPED" for c in children) >= 1
    recorded = {c.info.run_id: c.data.metrics[metric] for c in children}
    assert parent.data.tags["best_run"] == max(recorded, key=recorded.get)
    done = sorted((c for c in children if c.data.tags["tune.status"] == "DONE"), key=lambda c: -recorded[c.info.run_id])
    top = select_trials(client, parent, metric, "max", 2)
    assert [r.info.run_id for r in top] == [c.info.run_id for c in done]
    assert [r.info.run_id for r in select_trials(client, parent, metric, "min", 1)] == [done[-1].info.run_id]


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


def test_a_sweep_directory_of_the_previous_layout_is_refused_in_one_line_naming_its_version(tmp_path, capsys):
    """Tune's saved state names the trainable and the searcher by module, and 0.2.0 moved them: a
    directory 0.1.0 wrote (its state file had no format) is refused before anything touches it."""
    from pipeline.sweep.cli import main

    old = tmp_path / "out" / "sweeps" / "t" / "20261201-120000"
    old.mkdir(parents=True)
    state = {"parent_run_id": "0" * 32, "config": {}, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "started": 0.0}
    (old / "sweep_state.json").write_text(json.dumps(state))
    before = sorted(p.name for p in old.iterdir())
    code = main(["sweeps/smoke.yaml", "--set", f"base.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "--set", f"base.output_dir={tmp_path / 'out'}", "--resume", str(old)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "rlora-lab 0.1.0" in err[0] and "without --resume" in err[0] and str(old) in err[0]
    assert sorted(p.name for p in old.iterdir()) == before  # nothing written into it
