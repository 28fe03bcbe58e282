"""Paired comparisons of two arms scored on the same examples: intervals, p-values, families, power."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from pipeline.stats import Z95

FEW_DISCORDANT = 10  # below this many discordant pairs McNemar's exact test decides "resolved"


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
