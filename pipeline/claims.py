"""The claims a sweep makes about its trials, from data that did not choose them.

The sweep ranks its trials on the *selection* split (the held-out examples every trial scores during
training: Optuna, ASHA and the top-k see only those). The maximum of several noisy scores is biased
upwards (the winner's curse), so a difference computed on the same examples that picked the best
overstates it. Every claim is therefore made on the *confirmation* split: held-out examples of the
same tasks, disjoint from the selection split and from training data
(``pipeline.data.batching.confirmation_examples``), scored once at the end of each finished trial and for
the base model. The trial called "best" is still the one the selection split chose; the
confirmation split only measures it.

Two families of comparisons, each with simultaneous intervals (``pipeline.paired.compare_family``):
every other confirmed trial against the best (m = k − 1) and every confirmed trial against the base
model (m = k). "Resolved" means the family's interval excludes 0.

``family_claims`` is the pure computation (also what ``benchmarks.claims`` simulates);
``compare_trials`` reads a sweep's per-example tables from MLflow, runs it and fills the trials
table's cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipeline.paired import Comparison, compare_family, paired_compare
from pipeline.reports import BASE_COL, DELTA_COL
from pipeline.runs import run_examples
from pipeline.stats import display_scale, objective_column, score_table

SELECTION, CONFIRMATION = "selection", "confirmation"


@dataclass
class Claims:
    order: list[str]  # the trials compared, best first by the selection split
    split: str  # which split the comparisons use
    vs_best: dict[str, Comparison] = field(default_factory=dict)  # trial − best, for every trial but the best
    vs_base: dict[str, Comparison] = field(default_factory=dict)  # trial − base model
    note: str = ""  # why a family is missing or the split is not the one asked for

    @property
    def best(self) -> Optional[str]:
        return self.order[0] if self.order else None

    def best_vs_runner_up(self) -> Optional[Comparison]:
        return self.vs_best[self.order[1]].flipped() if len(self.order) > 1 and self.order[1] in self.vs_best else None

    def resolved(self) -> list[str]:
        """Every comparison called resolved, as ``a>b`` / ``a<b`` (trial ids, ``base``)."""
        out = [f"{k}{'>' if c.delta > 0 else '<'}{self.best}" for k, c in self.vs_best.items() if c.resolved]
        return out + [f"{k}{'>' if c.delta > 0 else '<'}base" for k, c in self.vs_base.items() if c.resolved]

    def sentences(self, scale: float = 100.0, unit: str = "points") -> tuple[Optional[str], Optional[str]]:
        """(the best vs the runner-up, the best vs the base model), each naming the split it is measured on."""
        on = f"on the {self.split} split"
        second = self.best_vs_runner_up()
        verdict = second.sentence(f"the best trial ({self.best})", f"the runner-up ({self.order[1]}) {on}", scale,
                                  unit) if second is not None and second.n else None
        base = self.vs_base.get(self.best) if self.best else None
        vs_base = base.sentence(f"the best trial ({self.best})", f"the base model {on}", scale, unit) \
            if base is not None and base.n else None
        return verdict, vs_base


def family_claims(order: list[str], tables: dict, base=None, value: str = "correct", split: str = CONFIRMATION,
                  simultaneous: bool = True, n_boot: int = 10_000, seed: int = 0) -> Claims:
    """The two families of comparisons of the trials in ``order`` (best first; chosen elsewhere) on
    their per-example ``tables`` (trial -> DataFrame; trials without one are left out) and the base
    model's ``base``. ``simultaneous=False`` gives each comparison its own 95 % interval (how the
    sweep reported before its claims were adjusted; kept for the simulation in ``benchmarks.claims``)."""
    order = [k for k in order if tables.get(k) is not None]
    out = Claims(order, split)
    if not order:
        return out
    best = tables[order[0]]
    others = {k: tables[k] for k in order[1:]}
    trials = {k: tables[k] for k in order}
    if simultaneous:
        out.vs_best = compare_family(best, others, value, n_boot, seed) if others else {}
        out.vs_base = compare_family(base, trials, value, n_boot, seed) if base is not None else {}
    else:
        out.vs_best = {k: paired_compare(t, best, value, n_boot, seed) for k, t in others.items()}
        out.vs_base = {k: paired_compare(t, base, value, n_boot, seed) for k, t in trials.items()} \
            if base is not None else {}
    return out


def _delta_cells(c, scale: float) -> tuple[str, str]:
    """A paired comparison as two table cells: ``Δ [lo, hi]`` and whether it is resolved."""
    return f"{scale * c.delta:+.1f} [{scale * c.lo:+.1f}, {scale * c.hi:+.1f}]", "yes" if c.resolved else "no"


def confirm_metric(metric: str) -> str:
    """The confirmation split's name for an objective: ``eval/mean_acc`` -> ``confirm/mean_acc``."""
    return "confirm/" + metric.split("/", 1)[-1]


def compare_trials(ranked: list[dict], metric: str, client, base=None, base_confirm=None):
    """The sweep's claims (``pipeline.claims``) about the trials in ``ranked`` (best first by the
    selection split): on the confirmation split where the trials have one (``confirm`` tables,
    ``base_confirm`` for the base model), else on the selection split (``heldout``, ``base``),
    labelled as such. Adds to the rows the confirmation score (``confirm/<metric>`` ± se),
    ``Δ vs best``/``resolved`` and ``Δ vs base``/``vs base resolved`` (simultaneous intervals of
    each family); returns (best vs runner-up sentence, best vs base sentence, the Claims)."""
    col = objective_column(metric)
    if col is None or not ranked:
        return None, None, None

    def tables(kind: str) -> dict:
        found = {row["trial_id"]: run_examples(client, row["mlflow_run"], kind).get(kind)
                 for row in ranked if row.get("mlflow_run")}
        return {k: t for k, t in found.items() if t is not None}

    order = [row["trial_id"] for row in ranked]
    confirm = tables("confirm")
    cm = confirm_metric(metric)
    for row in ranked:
        if row["trial_id"] in confirm:
            logged = client.get_run(row["mlflow_run"]).data.metrics  # with tune.seeds: se over seeds and examples
            score = score_table(confirm[row["trial_id"]], col)[1]
            row[cm] = logged.get(cm, score.mean)
            row[f"{cm}_stderr"] = logged.get(f"{cm}_stderr", score.se)
    if order[0] in confirm:
        claims = family_claims(order, confirm, base_confirm, col, CONFIRMATION)
        if base is not None and base_confirm is None:
            claims.note = "the base model has no confirmation score, so no difference to it is claimed"
    else:  # the best has no confirmation split (data.confirm_per_task 0, or trained by an earlier version)
        claims = family_claims(order, tables("heldout"), base, col, SELECTION)
        if confirm:
            claims.note = f"the best trial has no confirmation score, {len(confirm)} other trial(s) do"
    scale, unit = display_scale(col)
    for row in ranked:
        c = claims.vs_best.get(row["trial_id"])
        if c is not None and c.n:
            row[DELTA_COL], row["resolved"] = _delta_cells(c, scale)
        c = claims.vs_base.get(row["trial_id"])
        if c is not None and c.n:
            row[BASE_COL], row["vs base resolved"] = _delta_cells(c, scale)
    verdict, vs_base = claims.sentences(scale, unit)
    return verdict, vs_base, claims


def claims_note(claims) -> str:
    """What the Δ columns are measured on and how their intervals are adjusted, in one line."""
    if claims is None:
        return ""
    split = ("the confirmation split (examples disjoint from the ones that ranked the trials)"
             if claims.split == "confirmation" else
             "the selection split (the same examples ranked the trials, so the best one's lead is biased upwards)")
    fam = [f"{len(d)} vs {what}" for d, what in ((claims.vs_best, "the best"), (claims.vs_base, "the base model")) if d]
    return (f"Δ columns: {split}; max-t simultaneous 95 % intervals per family of comparisons "
            f"({', '.join(fam) or 'none'}); 'resolved' = the family's interval excludes 0."
            + (f" Note: {claims.note}." if claims.note else ""))
