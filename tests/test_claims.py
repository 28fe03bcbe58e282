"""The sweep's claims: simultaneous intervals, the confirmation split, and a simulation of many
sweeps with a known truth (``benchmarks.claims``) that checks the statistics themselves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.claims import Design, simulate
from pipeline import stats


def table(correct, tasks=5):
    n = len(correct)
    return pd.DataFrame({"task": np.repeat([f"t{i}" for i in range(tasks)], n // tasks),
                         "example_id": [f"e{i}" for i in range(n)], "correct": np.asarray(correct, float),
                         "gold_logprob": 0.0, "margin": 0.0})


@pytest.mark.slow
def test_a_sweep_of_equally_good_trials_calls_a_difference_resolved_in_at_most_5_percent_of_sweeps(capsys):
    """300 simulated sweeps of six equally good trials (seeded): picking the best and comparing it
    on the same examples with a 95 % interval each (the old summary) calls some difference
    resolved in far more than 5 % of sweeps; the confirmation split's simultaneous intervals in at
    most about 5 % (binomial tolerance: two standard errors of 300 sweeps). And a real difference
    is found as often as the power ``pipeline.stats.power`` states for it."""
    r = simulate(300, Design())
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
    one = stats.compare_family(ref, {"o0": others["o0"]})["o0"]
    direct = stats.paired_compare(others["o0"], ref)
    assert (one.delta, one.lo, one.hi, one.m) == (direct.delta, direct.lo, direct.hi, 1)
    fam = stats.compare_family(ref, others)
    c = fam["o0"]
    assert c.delta == pytest.approx(one.delta) and c.se == pytest.approx(one.se) and c.m == 6
    crit = (c.hi - c.delta) / c.se  # every member of the family has the same critical value
    assert all((x.hi - x.delta) / x.se == pytest.approx(crit) for x in fam.values())
    # wider than one 95 % interval, no wider than Bonferroni's for 6 independent comparisons
    assert stats.Z95 * 1.1 < crit <= stats.family_crit(6) + 0.05
    assert "simultaneous 95 % CI over 6 comparisons" in c.sentence("o0", "ref")


def test_a_family_resolves_a_real_difference_and_not_an_identical_model():
    """One model 20 points better on 500 examples and one identical to the reference: the first
    is resolved with a small adjusted p, the second is not (its se is 0, it never sets the family's
    maximum)."""
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.5).astype(float)
    better = np.where(rng.random(500) < 0.4, 1.0, y)
    fam = stats.compare_family(table(y), {"better": table(better), "same": table(y)})
    assert fam["better"].resolved and fam["better"].lo > 0.1 and fam["better"].p_adjusted < 0.001
    assert not fam["same"].resolved and fam["same"].delta == 0 and fam["same"].p_adjusted == 1.0


def test_power_and_the_detectable_difference_agree():
    se = 0.015
    d = stats.detectable(se)
    assert stats.power(d, se) == pytest.approx(0.8, abs=0.01)
    assert stats.power(0.0, se) == pytest.approx(0.05, abs=0.001)
    assert stats.power(d, se, stats.family_crit(5)) < 0.8  # a family's wider interval needs a bigger difference


def test_the_confirmation_split_is_disjoint_from_the_selection_split_and_training():
    from pipeline.batching import build_mixture, confirmation_examples
    from pipeline.config import DataSection
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
    for n, resolved in ((1, False), (4, False), (12, True)):
        fam = stats.compare_family(table(np.zeros(n), tasks=1), {"a": table(np.ones(n), tasks=1),
                                                                 "b": table(np.zeros(n), tasks=1)}, by_task=False)
        assert fam["a"].delta == 1.0 and fam["a"].resolved is resolved, n
        assert stats.paired_compare(table(np.ones(n), tasks=1), table(np.zeros(n), tasks=1)).resolved is resolved
