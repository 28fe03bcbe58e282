"""The sweep's claims: simultaneous intervals, the confirmation split, and a simulation of many
sweeps with a known truth (``benchmarks.claims``) that checks the statistics themselves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.claims import Design, simulate
from pipeline import paired, stats


def table(correct, tasks=5):
    n = len(correct)
    return pd.DataFrame({"task": np.repeat([f"t{i}" for i in range(tasks)], n // tasks),
                         "example_id": [f"e{i}" for i in range(n)], "correct": np.asarray(correct, float),
                         "gold_logprob": 0.0, "margin": 0.0})


@pytest.mark.slow
def test_a_sweep_of_equally_good_trials_calls_a_difference_resolved_in_at_most_5_percent_of_sweeps(capsys):
    """300 simulated sweeps of six equally good trials (seeded): picking the best and comparing it
    on the same examples with a 95 % interval each (the old summary; 100 of the sweeps) calls some
    difference resolved in far more than 5 % of sweeps; the confirmation split's simultaneous intervals in at
    most about 5 % (binomial tolerance: two standard errors of 300 sweeps). And a real difference
    is found as often as the power ``pipeline.paired.power`` states for it."""
    r = simulate(300, Design(), before_sweeps=100)
    before, after, pw = r["false_resolution_before"], r["false_resolution_after"], r["power"]
    with capsys.disabled():
        print(f"\nfalse 'resolved': before {100 * before['rate']:.1f} ± {100 * before['se']:.1f} %, after "
              f"{100 * after['rate']:.1f} ± {100 * after['se']:.1f} %; power stated {100 * pw['stated']:.0f} %, "
              f"observed {100 * pw['rate']:.1f} ± {100 * pw['se']:.1f} %")
    assert after["rate"] <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 300)
    assert before["rate"] > 0.2  # what the change fixes: the old rule's false claims
    assert 0.5 < pw["stated"] < 0.95  # a difference the check can see both ways
    assert abs(pw["rate"] - pw["stated"]) <= 3 * math.sqrt(pw["stated"] * (1 - pw["stated"]) / 300)


def test_simultaneous_intervals_widen_with_the_family_and_one_comparison_is_the_paired_one():
    rng = np.random.default_rng(3)
    p = rng.beta(0.15, 0.1, size=500)
    ref = table(rng.random(500) < p)
    others = {f"o{j}": table(rng.random(500) < p) for j in range(6)}
    one = paired.compare_family(ref, {"o0": others["o0"]})["o0"]
    direct = paired.paired_compare(others["o0"], ref)
    assert (one.delta, one.lo, one.hi, one.m) == (direct.delta, direct.lo, direct.hi, 1)
    fam = paired.compare_family(ref, others)
    c = fam["o0"]
    assert c.delta == pytest.approx(one.delta) and c.se == pytest.approx(one.se) and c.m == 6
    crit = (c.hi - c.delta) / c.se  # every member of the family has the same critical value
    assert all((x.hi - x.delta) / x.se == pytest.approx(crit) for x in fam.values())
    # wider than one 95 % interval, no wider than Bonferroni's for 6 independent comparisons
    assert stats.Z95 * 1.1 < crit <= paired.family_crit(6) + 0.05
    assert "simultaneous 95 % CI over 6 comparisons" in c.sentence("o0", "ref")


def test_a_family_resolves_a_real_difference_and_not_an_identical_model():
    """One model 20 points better on 500 examples and one identical to the reference: the first
    is resolved with a small adjusted p, the second is not (its se is 0, it never sets the family's
    maximum)."""
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.5).astype(float)
    better = np.where(rng.random(500) < 0.4, 1.0, y)
    fam = paired.compare_family(table(y), {"better": table(better), "same": table(y)})
    assert fam["better"].resolved and fam["better"].lo > 0.1 and fam["better"].p_adjusted < 0.001
    assert not fam["same"].resolved and fam["same"].delta == 0 and fam["same"].p_adjusted == 1.0


def test_power_and_the_detectable_difference_agree():
    se = 0.015
    d = paired.detectable(se)
    assert paired.power(d, se) == pytest.approx(0.8, abs=0.01)
    assert paired.power(0.0, se) == pytest.approx(0.05, abs=0.001)
    assert paired.power(d, se, paired.family_crit(5)) < 0.8  # a family's wider interval needs a bigger difference


def test_the_confirmation_split_is_disjoint_from_the_selection_split_and_training():
    from pipeline.data.batching import build_mixture, confirmation_examples
    from pipeline.config.run import DataSection
    from pipeline.data import content_key

    data = DataSection(tasks=["sst2", "piqa", "gsm8k"], train_per_task=300, eval_per_task=30, confirm_per_task=40,
                       seed=2)
    confirm = confirmation_examples(data)
    mix = build_mixture(data.tasks, data.train_per_task, data.eval_per_task, data.seed)
    keys = {content_key(e) for e in confirm}
    assert len(keys) == len(confirm) == 80  # 40 per choice task; gsm8k has no per-example outcome to pair
    assert {e.task for e in confirm} == {"sst2", "piqa"}
    assert not keys & {content_key(e) for e in mix.held_out}
    assert not keys & {content_key(e) for e in mix.train}
    assert [content_key(e) for e in confirmation_examples(data)] == [content_key(e) for e in confirm]  # seeded
    other = confirmation_examples(data.model_copy(update={"seed": 3}))
    assert {content_key(e) for e in other} != keys
    assert confirmation_examples(data.model_copy(update={"confirm_per_task": 0})) == []
    # capped by what the held-out pool has left after the selection split
    from pipeline.data import task_splits

    pool = len(task_splits("piqa")[1])
    big = confirmation_examples(DataSection(tasks=["piqa"], eval_per_task=30, confirm_per_task=100_000))
    assert len(big) == pool - 30


def test_one_example_or_a_handful_of_identical_differences_is_never_resolved():
    """A task family with one question (or four, all won by the same model): the interval has no
    width, and an exact test of so few discordant pairs cannot reject; only enough of them can."""
    # and a family where two models each win 2 of 3 questions: a bootstrap interval of [+33, +100]
    fam = paired.compare_family(table([0, 0, 1], tasks=1), {"a": table([1, 1, 1], tasks=1), "b": table([1, 1, 1], tasks=1)},
                                by_task=False)
    assert fam["a"].delta == pytest.approx(2 / 3) and not fam["a"].resolved and fam["a"].discordant == 2
    for n, resolved in ((1, False), (4, False), (12, True)):
        fam = paired.compare_family(table(np.zeros(n), tasks=1), {"a": table(np.ones(n), tasks=1),
                                                                 "b": table(np.zeros(n), tasks=1)}, by_task=False)
        assert fam["a"].delta == 1.0 and fam["a"].resolved is resolved, n
        assert paired.paired_compare(table(np.ones(n), tasks=1), table(np.zeros(n), tasks=1)).resolved is resolved


def test_compare_trials_gives_each_trial_its_paired_difference_to_best_and_base(tmp_path):
    """Known per-example outcomes in a real MLflow store: trial a is 20 of 40 better than the base
    model, trial b 2 of 40; the table says so (signs, values, resolved) and the closing sentences
    name the best trial against the runner-up and against the base model, on the selection split
    when the trials have no confirmation split, labelled as such."""
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.reports import BASE_COL, DELTA_COL
    from pipeline.paired import compare_family
    from pipeline.stats import examples_file, save_examples
    from pipeline.claims import compare_trials

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
    verdict, vs_base, claims = compare_trials(rows, "eval/mean_acc", client, base)
    assert claims.split == "selection"
    a, b = rows
    assert a[BASE_COL].startswith("+50.0 [") and a["vs base resolved"] == "yes"
    assert b[BASE_COL].startswith("+5.0 [") and b["vs base resolved"] == "no"
    assert b[DELTA_COL].startswith("-45.0 [") and b["resolved"] == "yes" and DELTA_COL not in a
    assert verdict.startswith("the best trial (a) is better than the runner-up (b) on the selection split (Δ = +45.0")
    c = compare_family(base, {"a": table(30), "b": table(12)})["a"]  # two trials vs the base model: a family of 2
    assert c.m == 2 and vs_base == c.sentence("the best trial (a)", "the base model on the selection split")
    assert "simultaneous 95 % CI over 2 comparisons" in vs_base
    assert compare_trials(rows, "eval/mean_acc", client)[1] is None  # no base table: no base column


def test_claims_come_from_the_confirmation_split_where_the_trials_have_one(tmp_path):
    """The selection split says trial a beats b by 45 points; on the confirmation split they are
    equal and both 25 points above the base model: the verdicts, the Δ columns and the
    confirmation score column follow the confirmation split, and the best stays the trial the
    selection split chose."""
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.reports import BASE_COL, DELTA_COL
    from pipeline.stats import examples_file, save_examples
    from pipeline.claims import compare_trials

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))

    def table(n_right, n=40):
        return pd.DataFrame({"task": ["t"] * n, "example_id": [f"{n}-{i}" for i in range(n)],
                             "correct": [1.0 if i < n_right else 0.0 for i in range(n)],
                             "gold_logprob": [-1.0] * n, "margin": [0.0] * n})

    rows = []
    for trial, sel, conf in (("a", 30, 70), ("b", 12, 75)):
        run = client.create_run(exp).info.run_id
        for kind, t in (("heldout", table(sel)), ("confirm", table(conf, 100))):
            client.log_artifact(run, str(save_examples(t, tmp_path / trial / examples_file(kind, 8))), "examples")
        rows.append({"trial_id": trial, "mlflow_run": run})
    verdict, vs_base, claims = compare_trials(rows, "eval/mean_acc", client, table(10), table(45, 100))
    a, b = rows
    assert claims.split == "confirmation" and claims.best == "a"
    assert a["confirm/mean_acc"] == pytest.approx(0.7) and a["confirm/mean_acc_stderr"] > 0
    assert b[DELTA_COL].startswith("+5.0 [") and b["resolved"] == "no"  # b − the best, on the confirmation split
    assert a[BASE_COL].startswith("+25.0 [") and a["vs base resolved"] == "yes"
    assert verdict.startswith("the best trial (a) is not distinguishable from the runner-up (b) on the "
                              "confirmation split (Δ = -5.0 points")
    assert vs_base.startswith("the best trial (a) is better than the base model on the confirmation split (Δ = +25.0")


def test_a_best_trial_without_a_confirmation_score_makes_its_claims_on_the_selection_split_and_says_why(tmp_path):
    """Trials of a sweep resumed after an upgrade: the best has only its selection table, the
    runner-up both. The claims stay about the best (the trial the sweep reports), on the
    selection split, with a note saying why."""
    from mlflow import MlflowClient

    from pipeline.claims import claims_note, compare_trials
    from pipeline.stats import examples_file, save_examples

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    rows = []
    for trial, kinds in (("a", ("heldout",)), ("b", ("heldout", "confirm"))):
        run = client.create_run(exp).info.run_id
        for k in kinds:
            t = table(np.arange(40) < (30 if trial == "a" else 20))
            client.log_artifact(run, str(save_examples(t, tmp_path / trial / k / examples_file(k, 8))), "examples")
        rows.append({"trial_id": trial, "mlflow_run": run})
    verdict, _, claims = compare_trials(rows, "eval/mean_acc", client)
    assert claims.split == "selection" and claims.best == "a" and list(claims.vs_best) == ["b"]
    assert verdict.startswith("the best trial (a) is better than the runner-up (b) on the selection split (Δ = +25.0")
    note = claims_note(claims)
    assert "the selection split (the same examples ranked the trials" in note
    assert "the best trial has no confirmation score, 1 other trial(s) do" in note


def test_the_eval_stage_claims_each_trial_against_the_base_and_the_best_per_family_but_none_on_heldout(tmp_path):
    """Three models' lm-eval tables in a real store, one family where the best trial has no
    questions: trial − base and trial − best per family, with the family's size in each sentence;
    a family the best did not answer gets no "vs best" claim (the runner-up is not the best);
    the heldout family (the pool the trials were ranked on) gets none at all."""
    from mlflow import MlflowClient

    from eval.record import paired_rows
    from pipeline.stats import examples_file, save_examples

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))

    def lmeval(right: dict):
        frames = []
        for fam, k in right.items():
            frames.append(pd.DataFrame({"task": [f"{fam}/sub"] * 60, "example_id": [f"{fam}{i}" for i in range(60)],
                                        "correct": (np.arange(60) < k).astype(float), "gold_logprob": 0.0,
                                        "margin": 0.0}))
        return pd.concat(frames, ignore_index=True)

    models = []
    for name, right in (("base", {"mmlu": 15, "bbh": 15, "heldout": 10}), ("t1", {"mmlu": 45, "heldout": 50}),
                        ("t2", {"mmlu": 20, "bbh": 45, "heldout": 55}), ("t3", {"bbh": 30})):
        run = client.create_run(exp).info.run_id
        client.log_artifact(run, str(save_examples(lmeval(right), tmp_path / name / examples_file("lmeval", 1))),
                            "examples")
        models.append((name, run))
    rows = {(r["model"], r["family"]): r for r in paired_rows(client, models)}
    assert set(rows) == {("t1", "mmlu"), ("t2", "mmlu"), ("t2", "bbh"), ("t3", "bbh")}  # nothing on heldout
    assert rows[("t1", "mmlu")]["Δ vs base"].startswith("+50.0 [") and rows[("t1", "mmlu")]["resolved vs base"] == "yes"
    assert rows[("t2", "mmlu")]["Δ vs best"].startswith("-41.7 [") and rows[("t2", "mmlu")]["resolved vs best"] == "yes"
    assert "95 % CI [" in rows[("t2", "mmlu")]["sentence vs best"]  # t2 alone vs the best on mmlu: a family of one
    # t1, the best, answered no bbh question: t2 and t3 are compared with the base model only
    assert not any("Δ vs best" in rows[(t, "bbh")] for t in ("t2", "t3"))
    assert rows[("t2", "bbh")]["Δ vs base"].startswith("+50.0 [") and rows[("t3", "bbh")]["Δ vs base"].startswith("+25.0 [")
    assert "over 2 comparisons" in rows[("t1", "mmlu")]["sentence vs base"]  # t1 and t2 vs the base on mmlu
