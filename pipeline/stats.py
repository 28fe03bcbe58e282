"""Uncertainty for every score, from per-example outcomes.

Conventions (the same as lm-eval's ``mean_stderr``): the standard error of a mean is the sample
standard deviation (ddof = 1) over sqrt(n); for 0/1 outcomes that is sqrt(p(1-p)/(n-1)). A
"macro" score is the unweighted mean of per-task means (the training loop's ``eval/mean_acc``);
its standard error treats tasks as independent: sqrt(sum_t se_t^2) / T.

Paired comparisons use the examples both runs scored (same task and example id): the per-example
differences give the analytic paired standard error; a paired bootstrap (examples resampled within
each task, 10,000 draws) gives the 95 % interval; for 0/1 outcomes McNemar's exact test gives a
p-value from the discordant pairs. A difference is "resolved" when its 95 % interval excludes 0.

When one model is compared with several (the best trial with every other, every trial with the base
model), the m intervals of that family are *simultaneous* (:func:`compare_family`): the examples
are resampled jointly for all m differences, and each interval is Δ_j ± c·se_j with c the 95 %
quantile of max_j |Δ*_j − Δ_j| / se_j over the draws (the max-t bootstrap). With 95 % probability
every interval of the family covers its true difference, so a "resolved" label is wrong for at
most 5 % of families, not 5 % of comparisons; c grows with m (about 2.4 for m = 5 independent
comparisons, less where they are correlated). For normal-theory intervals (the reproduction and
baselines reports, which combine seeds and examples) :func:`family_crit` gives Bonferroni's c.

Per-example tables (one row per scored example) have the columns of ``EXAMPLE_COLUMNS`` and are
stored as parquet artifacts (``examples/*.parquet``) on the MLflow run that produced them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

Z95 = 1.959963984540054
FEW_DISCORDANT = 10  # below this many discordant pairs McNemar's exact test decides "resolved"
EXAMPLE_COLUMNS = ("task", "example_id", "correct", "gold_logprob", "margin")
# what a per-example column is called as a score: correct -> acc; margin / gold_logprob as themselves
VALUE_NAMES = {"correct": "acc", "margin": "margin", "gold_logprob": "gold_logprob"}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); se is nan for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def macro_mean_se(per_task: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Mean of per-task means and its standard error (tasks independent)."""
    if not per_task:
        return math.nan, math.nan
    means = [m for m, _ in per_task.values()]
    ses = [s for _, s in per_task.values()]
    return float(np.mean(means)), float(math.sqrt(sum(s * s for s in ses)) / len(ses))


@dataclass
class Score:
    mean: float
    se: float
    n: int

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if math.isnan(self.mean):
            return "–"
        se = "?" if math.isnan(self.se) else f"{scale * self.se:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {se}"


def score_table(rows, value: str = "correct") -> tuple[dict[str, Score], Score]:
    """Per-task scores and the macro mean of a per-example table (pandas DataFrame)."""
    per_task = {}
    for task, g in rows.groupby("task", sort=True):
        m, s = mean_se(g[value].to_numpy(dtype=np.float64))
        per_task[str(task)] = Score(m, s, int(g[value].notna().sum()))
    mm, ms = macro_mean_se({t: (s.mean, s.se) for t, s in per_task.items()})
    return per_task, Score(mm, ms, sum(s.n for s in per_task.values()))


def score_metrics(rows, prefix: str = "eval", values: Iterable[str] = ("correct", "margin", "gold_logprob"),
                  mean_name: str = "mean") -> dict[str, float]:
    """MLflow metrics of a per-example table: ``<prefix>/<task>/<name>`` and ``<prefix>/mean_<name>``,
    each with ``_stderr`` beside it and ``<prefix>/<task>/n`` (examples scored)."""
    out: dict[str, float] = {}
    for value in values:
        if value not in rows or rows[value].isna().all():
            continue
        name = VALUE_NAMES[value]
        per_task, macro = score_table(rows, value)
        for task, s in per_task.items():
            out[f"{prefix}/{task}/{name}"] = s.mean
            out[f"{prefix}/{task}/{name}_stderr"] = s.se
            out[f"{prefix}/{task}/n"] = s.n
        out[f"{prefix}/{mean_name}_{name}"] = macro.mean
        out[f"{prefix}/{mean_name}_{name}_stderr"] = macro.se
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


# ---------------------------------------------------------------------------------- paired tests
@dataclass
class Comparison:
    """a - b on the examples both scored (macro over tasks)."""

    delta: float
    se: float
    lo: float  # 95 % paired-bootstrap interval
    hi: float
    n: int  # paired examples
    n_tasks: int
    p_mcnemar: Optional[float]  # exact two-sided McNemar test (0/1 outcomes only)
    value: str = "correct"
    m: int = 1  # comparisons in the family the interval is simultaneous over (compare_family)
    p_adjusted: Optional[float] = None  # max-t adjusted p-value of the family (None: m = 1)
    discordant: Optional[int] = None  # examples one got right and the other wrong (0/1 outcomes)

    @property
    def resolved(self) -> bool:
        """The interval excludes 0. With fewer than ``FEW_DISCORDANT`` examples on which the two
        disagree (0/1 outcomes), a bootstrap interval is too coarse to trust (three examples can
        give [+33, +100]): there McNemar's exact test decides, at 5 % / m."""
        excluded = self.n > 1 and (self.lo > 0 or self.hi < 0)
        if excluded and self.p_mcnemar is not None and self.discordant is not None \
                and self.discordant < FEW_DISCORDANT:
            return self.p_mcnemar < 0.05 / max(1, self.m)
        return excluded

    def fmt(self, scale: float = 100.0) -> str:
        return f"{scale * self.delta:+.1f} ± {scale * Z95 * self.se:.1f}"

    @property
    def interval_name(self) -> str:
        return "95 % CI" if self.m <= 1 else f"simultaneous 95 % CI over {self.m} comparisons"

    def sentence(self, a: str, b: str, scale: float = 100.0, unit: str = "points") -> str:
        d = 1 if unit == "points" else 3  # accuracy points vs nats
        span = f"Δ = {scale * self.delta:+.{d}f} {unit}, {self.interval_name} [{scale * self.lo:+.{d}f}, " \
               f"{scale * self.hi:+.{d}f}], {self.n} paired examples"
        if self.p_adjusted is not None:
            span += f", adjusted p = {self.p_adjusted:.2g}"
        elif self.p_mcnemar is not None:
            span += f", McNemar p = {self.p_mcnemar:.2g}"
        if not self.resolved:
            return f"{a} is not distinguishable from {b} ({span})"
        return f"{a} is {'better' if self.delta > 0 else 'worse'} than {b} ({span})"

    def to_dict(self) -> dict:
        return {**asdict(self), "resolved": self.resolved}

    def flipped(self) -> "Comparison":
        """b − a instead of a − b (McNemar's test is symmetric)."""
        return Comparison(0.0 - self.delta, self.se, 0.0 - self.hi, 0.0 - self.lo, self.n, self.n_tasks, self.p_mcnemar,
                          self.value, self.m, self.p_adjusted, self.discordant)


def _paired(a, b, value: str):
    import pandas as pd

    key = ["task", "example_id"]
    for name, t in (("a", a), ("b", b)):
        if t.duplicated(key).any():
            raise ValueError(f"run {name}: duplicate (task, example_id) rows")
    m = pd.merge(a[key + [value]], b[key + [value]], on=key, suffixes=("_a", "_b")).dropna()
    return m


def mcnemar_p(n01: int, n10: int) -> float:
    """Exact two-sided McNemar test: the discordant pairs under H0 are Binomial(n01 + n10, 1/2)."""
    from scipy.stats import binom

    n = n01 + n10  # Binomial(n, 1/2) is symmetric: twice the smaller tail (binomtest's two-sided p, faster)
    return 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(n01, n10), n, 0.5)))


def paired_compare(a, b, value: str = "correct", n_boot: int = 10_000, seed: int = 0,
                   by_task: bool = True) -> Comparison:
    """Paired comparison of two per-example tables on the examples both contain: the macro mean
    over tasks (``by_task``, the training loop's ``eval/mean_*``) or the pooled mean over all
    examples (lm-eval's size-weighted group averages)."""
    m = _paired(a, b, value)
    if m.empty:
        return Comparison(math.nan, math.nan, math.nan, math.nan, 0, 0, None, value)
    rng = np.random.default_rng(seed)
    diff = m[f"{value}_a"].to_numpy(np.float64) - m[f"{value}_b"].to_numpy(np.float64)
    if by_task:
        groups = [diff[idx] for idx in m.groupby("task", sort=True).indices.values()]
    else:
        groups = [diff]
    delta = float(np.mean([d.mean() for d in groups]))
    var = sum((d.var(ddof=1) / len(d)) if len(d) > 1 else 0.0 for d in groups)
    se = math.sqrt(var) / len(groups)
    boot = np.zeros(n_boot)
    for d in groups:  # resample within each task, then average the task means
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boot += d[idx].mean(axis=1)
    boot /= len(groups)
    lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    p = disc = None
    if value == "correct":
        av, bv = m["correct_a"].to_numpy(), m["correct_b"].to_numpy()
        n01, n10 = int(((av > 0.5) & (bv < 0.5)).sum()), int(((av < 0.5) & (bv > 0.5)).sum())
        p, disc = mcnemar_p(n01, n10), n01 + n10
    return Comparison(delta, se, lo, hi, len(m), len(groups), p, value, discordant=disc)


def _family_groups(ref, others: dict, value: str, by_task: bool):
    """Per task (or pooled), the (n_examples, m) matrix of differences other_j − ref on the
    examples every table of the family scored."""
    import pandas as pd

    key = ["task", "example_id"]
    tables = {"ref": ref, **others}
    for name, t in tables.items():
        if t.duplicated(key).any():
            raise ValueError(f"run {name}: duplicate (task, example_id) rows")
    m = ref[key + [value]].rename(columns={value: "ref"})
    for j, t in enumerate(others.values()):
        m = pd.merge(m, t[key + [value]].rename(columns={value: f"o{j}"}), on=key)
    m = m.dropna()
    diff = np.stack([m[f"o{j}"].to_numpy(np.float64) - m["ref"].to_numpy(np.float64)
                     for j in range(len(others))], axis=1) if len(m) else np.zeros((0, len(others)))
    if not by_task:
        return [diff], len(m)
    return [diff[idx] for idx in m.groupby("task", sort=True).indices.values()], len(m)


def compare_family(ref, others: dict, value: str = "correct", n_boot: int = 10_000, seed: int = 0,
                   by_task: bool = True, level: float = 0.95) -> dict:
    """``other − ref`` for every table in ``others`` (name -> per-example table), with intervals that
    hold simultaneously over the family (max-t bootstrap, module docstring) on the examples all of
    them scored. Returns name -> :class:`Comparison` (``m`` = len(others), ``p_adjusted``: the
    share of draws whose max-t reaches this comparison's |Δ/se|). A family of one is the ordinary
    paired comparison (:func:`paired_compare`)."""
    names = list(others)
    if len(names) == 1:
        return {names[0]: paired_compare(others[names[0]], ref, value, n_boot, seed, by_task)}
    nan = Comparison(math.nan, math.nan, math.nan, math.nan, 0, 0, None, value, len(names))
    if not names:
        return {}
    groups, n = _family_groups(ref, others, value, by_task)
    groups = [g for g in groups if len(g)]
    if n == 0 or not groups:
        return {k: nan for k in names}
    T = len(groups)
    delta = np.mean([g.mean(axis=0) for g in groups], axis=0)
    var = sum((g.var(axis=0, ddof=1) / len(g)) if len(g) > 1 else np.zeros(len(names)) for g in groups)
    se = np.sqrt(var) / T
    rng = np.random.default_rng(seed)
    boot = np.zeros((n_boot, len(names)))
    for g in groups:  # the same resampled examples for every comparison: their correlation is kept
        idx = rng.integers(0, len(g), size=(n_boot, len(g)))
        boot += g[idx].mean(axis=1)
    boot /= T
    safe = np.where(se > 0, se, np.inf)  # an identical pair (se 0) never sets the family's maximum
    t_max = np.max(np.abs(boot - delta) / safe, axis=1)
    crit = float(np.quantile(t_max, level))
    t_obs = np.abs(delta) / safe
    out = {}
    for j, name in enumerate(names):
        lo, hi = float(delta[j] - crit * se[j]), float(delta[j] + crit * se[j])
        p_adj = float((t_max >= t_obs[j]).mean()) if se[j] > 0 else 1.0
        p = disc = None
        if value == "correct":
            d = np.concatenate([g[:, j] for g in groups])
            n01, n10 = int((d > 0.5).sum()), int((d < -0.5).sum())
            p, disc = mcnemar_p(n01, n10), n01 + n10
        out[name] = Comparison(float(delta[j]), float(se[j]), lo, hi, n, T, p, value, len(names), p_adj, disc)
    return out


def family_crit(m: int, level: float = 0.95) -> float:
    """Bonferroni's critical value for m two-sided normal intervals that hold together: z at
    1 − (1 − level) / (2m) (1.96 for m = 1, 2.58 for m = 5)."""
    from scipy.stats import norm

    return float(norm.ppf(1 - (1 - level) / (2 * max(1, m))))


def power(delta: float, se: float, crit: float = Z95) -> float:
    """Probability that an interval Δ̂ ± crit·se excludes 0 when the true difference is ``delta``
    (Δ̂ ~ N(delta, se²))."""
    from scipy.stats import norm

    if not se > 0:
        return math.nan
    z = abs(delta) / se
    return float(norm.cdf(z - crit) + norm.cdf(-z - crit))


def detectable(se: float, crit: float = Z95, target: float = 0.8) -> float:
    """The smallest true difference found resolved with probability ``target`` (about (crit + 0.84)·se)."""
    from scipy.stats import norm

    return (crit + float(norm.ppf(target))) * se


def paired_se(n_per_task: int, n_tasks: int, discordant: float) -> float:
    """Standard error of a paired macro-mean accuracy difference with ``n_per_task`` examples in
    each task when a share ``discordant`` of examples is right for one model and wrong for the
    other (about 0.07 between two of the main sweep's trials, 0.2 between a trial and the base)."""
    if n_per_task < 2 or n_tasks < 1:
        return math.nan
    return math.sqrt(discordant / (n_per_task - 1)) / math.sqrt(n_tasks)


# ---------------------------------------------------------------------------------- seeds
def seed_average(tables: list):
    """Per-example outcomes averaged over seeds (runs of one configuration), on the examples every
    seed scored."""
    import pandas as pd

    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    g = pd.concat(tables).groupby(["task", "example_id"], sort=True)
    avg = g[["correct", "gold_logprob", "margin"]].mean()
    return avg[g.size() == len(tables)].reset_index()


def seed_mean_se(per_seed: Sequence[float], averaged=None, value: str = "correct",
                 task: Optional[str] = None) -> tuple[float, float]:
    """(mean over seeds, standard error over seeds and examples) of a macro score (or one task's):
    se² = sd²_seeds / K + se²_examples, the latter from the seed-averaged per-example table."""
    mean, sd = mean_se(per_seed)
    k = len([x for x in per_seed if x == x])
    parts = [] if math.isnan(sd) else [sd]  # mean_se gives sd / sqrt(K) already
    if averaged is not None and len(averaged):
        per_task, macro = score_table(averaged, value)
        s = macro if task is None else per_task.get(task)
        if s is not None and not math.isnan(s.se):
            parts.append(s.se)
    if k == 0:
        return math.nan, math.nan
    return mean, (math.sqrt(sum(x * x for x in parts)) if parts else math.nan)


def seed_metrics(per_seed: list[dict], averaged, prefix: str = "eval") -> dict[str, float]:
    """Held-out metrics of one configuration run with several seeds: every score of
    :func:`score_metrics` on the seed-averaged table (= the mean over seeds), its ``_stderr``
    combining seeds and examples (:func:`seed_mean_se`), and ``<key>_seed_sd``."""
    out = {}
    base = score_metrics(averaged, prefix) if averaged is not None and len(averaged) else {}
    cols = {name: col for col, name in VALUE_NAMES.items()}
    for key, value in base.items():
        if key.endswith("/n"):
            out[key] = value
            continue
        if key.endswith("_stderr"):  # examples only: replaced below by the seeds-and-examples one
            continue
        vals = [m[key] for m in per_seed if key in m]
        tail = key[len(prefix) + 1:]
        if tail.startswith("mean_"):
            task, name = None, tail[len("mean_"):]
        else:
            task, name = tail.rsplit("/", 1)
        mean, se = seed_mean_se(vals, averaged, cols[name], task)
        out[key] = value
        out[f"{key}_stderr"] = se
        if len(vals) > 1:
            out[f"{key}_seed_sd"] = float(np.std(vals, ddof=1))
    # scores no per-example table carries (a generative task's answer_nll): the mean over seeds, its
    # error from the spread between seeds and the seeds' own errors (on the same examples: their mean)
    for key in sorted({k for m in per_seed for k in m} - set(base)):
        se_key = f"{key}_stderr"
        if not key.startswith(prefix + "/") or key.endswith(("_stderr", "_seed_sd")):
            continue
        vals = [m[key] for m in per_seed if key in m]
        ses = [m[se_key] for m in per_seed if se_key in m and not math.isnan(m[se_key])]
        if not ses:
            continue
        mean, between = mean_se(vals)
        parts = [x for x in (between, float(np.mean(ses))) if not math.isnan(x)]
        out[key], out[se_key] = mean, math.sqrt(sum(x * x for x in parts))
        if len(vals) > 1:
            out[f"{key}_seed_sd"] = float(np.std(vals, ddof=1))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


# ---------------------------------------------------------------------------------- storage
def save_examples(rows, path: Path):
    """Write a per-example table (DataFrame or list of dicts) as parquet; returns the path."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(EXAMPLE_COLUMNS))
    missing = [c for c in EXAMPLE_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"per-example table lacks column(s) {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def load_examples(path):
    import pandas as pd

    df = pd.read_parquet(path)
    missing = [c for c in EXAMPLE_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"{path}: not a per-example table (missing {missing})")
    return df


def objective_column(metric: str) -> Optional[str]:
    """The per-example column behind a macro objective: eval/mean_acc -> correct, eval/mean_margin
    -> margin, eval/mean_gold_logprob -> gold_logprob; None for anything else."""
    for col, name in VALUE_NAMES.items():
        if metric == f"eval/mean_{name}":
            return col
    return None


def display_scale(column: Optional[str]) -> tuple[float, str]:
    """(factor, unit) for showing a score: accuracies in points, log-probabilities in nats."""
    return (100.0, "points") if column in (None, "correct") else (1.0, "nats")


def examples_file(kind: str, step: int) -> str:
    """``heldout-000080.parquet`` (training loop, by step), ``lmeval-000001.parquet`` (eval round)."""
    return f"{kind}-{step:06d}.parquet"


def expected_se(n_per_task: int, n_tasks: int, p: float = 0.6) -> float:
    """Standard error of a macro-mean accuracy near ``p`` with ``n_per_task`` examples in each of
    ``n_tasks`` tasks (what a sweep's settings will give, printed before it starts)."""
    if n_per_task < 2 or n_tasks < 1:
        return math.nan
    return math.sqrt(p * (1 - p) / (n_per_task - 1)) / math.sqrt(n_tasks)
