"""Standard errors and paired comparisons (pipeline.stats) against hand computations."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import paired, stats


def table(correct, task="t", margin=None, ids=None):
    n = len(correct)
    return pd.DataFrame({"task": [task] * n, "example_id": ids or [f"{task}{i}" for i in range(n)],
                         "correct": np.asarray(correct, float),
                         "gold_logprob": np.zeros(n) if margin is None else -np.abs(margin),
                         "margin": np.zeros(n) if margin is None else np.asarray(margin, float)})


def test_standard_error_of_known_outcomes():
    # 3 of 4 right: p = 0.75, sample sd = 0.5 (ddof 1), se = 0.5 / 2 = sqrt(p(1-p)/(n-1)) = 0.25
    m, se = stats.mean_se([1, 1, 1, 0])
    assert m == 0.75 and se == pytest.approx(0.25, abs=1e-12)
    # 60 of 100: sqrt(0.24 / 99)
    assert stats.mean_se([1] * 60 + [0] * 40)[1] == pytest.approx(math.sqrt(0.24 / 99), abs=1e-12)
    assert math.isnan(stats.mean_se([1])[1])


def test_macro_mean_and_metrics_names():
    t = pd.concat([table([1, 1, 1, 0], "a"), table([1, 0], "b")])
    per_task, macro = stats.score_table(t)
    assert per_task["a"].mean == 0.75 and per_task["b"].mean == 0.5
    # macro = (0.75 + 0.5) / 2; se = sqrt(0.25^2 + 0.5^2) / 2  (b: sd 0.7071, se 0.5)
    assert macro.mean == pytest.approx(0.625)
    assert macro.se == pytest.approx(math.sqrt(0.25**2 + 0.5**2) / 2)
    m = stats.score_metrics(t, values=("correct",))
    assert m["eval/mean_acc"] == pytest.approx(0.625)
    assert m["eval/mean_acc_stderr"] == pytest.approx(macro.se)
    assert m["eval/a/acc_stderr"] == pytest.approx(0.25) and m["eval/a/n"] == 4


def test_mcnemar_exact_p():
    # 6 discordant pairs all one way: two-sided p = 2 * 0.5**6
    assert paired.mcnemar_p(0, 6) == pytest.approx(2 * 0.5**6)
    assert paired.mcnemar_p(3, 3) == pytest.approx(1.0)


def test_paired_known_difference_is_detected():
    rng = np.random.default_rng(0)
    b = (rng.random(300) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:45]] = 1.0  # A fixes 45 of B's errors: +15 points
    c = paired.paired_compare(table(a), table(b))
    assert c.delta == pytest.approx(0.15)
    assert c.resolved and c.lo > 0.08 and c.p_mcnemar < 1e-6
    assert "better" in c.sentence("A", "B")
    # the reverse comparison is the mirror image
    r = paired.paired_compare(table(b), table(a))
    assert r.delta == pytest.approx(-0.15) and r.resolved and "worse" in r.sentence("B", "A")


def test_identical_runs_and_noise_are_not_resolved():
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.6).astype(float)
    same = paired.paired_compare(table(a), table(a))
    assert same.delta == 0 and not same.resolved and "not distinguishable" in same.sentence("A", "B")
    # two models with the same skill whose errors differ: a few points apart, not resolved
    b = a.copy()
    flip = rng.choice(200, 20, replace=False)
    b[flip] = 1 - b[flip]
    c = paired.paired_compare(table(a), table(b))
    assert abs(c.delta) < 0.06 and not c.resolved


def test_paired_interval_matches_analytic_se_and_pairs_by_id():
    rng = np.random.default_rng(2)
    ma, mb = rng.normal(0.3, 1, 400), rng.normal(0.0, 1, 400)
    c = paired.paired_compare(table(np.ones(400), margin=ma), table(np.ones(400), margin=mb), "margin")
    d = ma - mb
    assert c.se == pytest.approx(d.std(ddof=1) / 20)
    assert (c.hi - c.lo) / 2 == pytest.approx(stats.Z95 * c.se, rel=0.1)  # bootstrap ≈ normal interval
    # rows are matched by example id, not position; examples only one run has are left out
    ta = table([1, 0, 1], ids=["x", "y", "z"])
    tb = table([1, 0, 0, 0], ids=["w", "z", "y", "x"])  # w only in B; B wrong on x, y, z
    p = paired.paired_compare(ta, tb)
    assert p.n == 3 and p.delta == pytest.approx(2 / 3)  # by position it would be 1/3
    with pytest.raises(ValueError, match="duplicate"):
        paired.paired_compare(pd.concat([ta, ta]), tb)


def test_examples_round_trip(tmp_path):
    t = pd.concat([table([1, 0, 1], "a", margin=[0.5, -0.2, 1.0]), table([0, 1], "b", margin=[-1.0, 2.0])])
    path = stats.save_examples(t, tmp_path / "examples" / stats.examples_file("heldout", 80))
    assert path.name == "heldout-000080.parquet"
    back = stats.load_examples(path)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), t.reset_index(drop=True))
    with pytest.raises(ValueError, match="lacks"):
        stats.save_examples(t.drop(columns=["margin"]), tmp_path / "bad.parquet")


def test_expected_se_for_sweep_settings():
    # 5 tasks x 80 examples near p = 0.6: sqrt(0.24 / 79) / sqrt(5) ≈ 2.46 points
    assert stats.expected_se(80, 5) == pytest.approx(math.sqrt(0.24 / 79) / math.sqrt(5))
    assert stats.expected_se(80, 5) < 0.025 < stats.expected_se(16, 5)


def test_seed_metrics_of_a_score_without_a_per_example_table():
    """A configuration run with 3 seeds on a generative task (GSM8K's single-task sweep): its
    answer_nll is the mean over seeds, and its error combines the spread between seeds with the
    seeds' own (same examples, so their mean): se² = sd²/K + mean(se_k)²; keys without an error
    (head similarity, timings) are not averaged."""
    per_seed = [{"eval/gsm8k/answer_nll": 2.0, "eval/gsm8k/answer_nll_stderr": 0.10, "eval/head_cos_mean": 0.5},
                {"eval/gsm8k/answer_nll": 2.3, "eval/gsm8k/answer_nll_stderr": 0.12, "time/loop_s": 3.0},
                {"eval/gsm8k/answer_nll": 2.6, "eval/gsm8k/answer_nll_stderr": 0.08}]
    out = stats.seed_metrics(per_seed, None)
    sd = np.std([2.0, 2.3, 2.6], ddof=1)
    assert out["eval/gsm8k/answer_nll"] == pytest.approx(2.3)
    assert out["eval/gsm8k/answer_nll_stderr"] == pytest.approx(math.sqrt(sd ** 2 / 3 + 0.1 ** 2))
    assert out["eval/gsm8k/answer_nll_seed_sd"] == pytest.approx(sd)
    assert set(out) == {"eval/gsm8k/answer_nll", "eval/gsm8k/answer_nll_stderr", "eval/gsm8k/answer_nll_seed_sd"}
    # next to a choice task, the table's scores are unchanged and the generative one is added
    table = pd.DataFrame({"task": ["sst2"] * 4, "example_id": list("abcd"), "correct": [1.0, 0.0, 1.0, 1.0],
                          "gold_logprob": [-1.0, -2.0, -1.5, -0.5], "margin": [0.5, -0.2, 0.1, 0.3]})
    mixed = [{**m, "eval/sst2/acc": 0.75} for m in per_seed]
    both = stats.seed_metrics(mixed, table)
    assert both["eval/sst2/acc"] == pytest.approx(0.75) and both["eval/mean_acc"] == pytest.approx(0.75)
    assert both["eval/gsm8k/answer_nll_stderr"] == pytest.approx(out["eval/gsm8k/answer_nll_stderr"])
