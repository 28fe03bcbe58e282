"""The base model's scores in a sweep: the reference every trial is compared with, on the
selection split (the parent run) and on the confirmation split (the base model's child run)."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from pipeline.config.sweep import SweepConfig
from pipeline.data.batching import confirmation_examples
from pipeline.data.mixture_cache import tokenised_mixture
from pipeline.model.base import load_model, resolve_model
from pipeline.model.precision import autocast, load_dtype
from pipeline.runs import base_model_run, parent_metric, run_examples
from pipeline.stats import objective_column
from pipeline.tracking import Tracker
from pipeline.train.heldout import evaluate, evaluate_confirmation, log_examples


def score_base(cfg: SweepConfig, tracker, threads: Optional[int] = None) -> tuple[Optional[Any], Optional[Any]]:
    """The base model, without adapter, on the held-out examples every trial scores (the selection
    split) and on the confirmation split: once per sweep, in the sweep's tail on a freed slot
    (``pipeline.sweep.tail.BaseHeldOut``) or else in the driver after the trials (reused on
    ``--resume``). The selection scores go on the parent run (``sweep/base_<objective>`` ± se and
    the per-example table), the confirmation scores on the base model's child run
    (``confirm/<metric>`` ± se and its table), so the summary can say whether fine-tuning helped at
    all, with the same paired test as between trials. Returns (selection table, confirmation table)."""
    if objective_column(cfg.tune.metric) is None:
        return None, None
    base_run = base_model_run(tracker.client, tracker.run_id, cfg.base.model)
    found = run_examples(tracker.client, tracker.run_id, "heldout").get("heldout")
    confirmed = run_examples(tracker.client, base_run, "confirm").get("confirm")
    examples = confirmation_examples(cfg.base.data)
    if found is not None and (confirmed is not None or not examples):
        return found, confirmed
    import torch

    t0 = time.time()
    d = cfg.base.data
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    model, tok = load_model(cfg.base.model, dtype=load_dtype(cfg.base.train.precision))
    model.eval()
    obj = cfg.tune.metric
    with torch.no_grad(), autocast(cfg.base.train.precision, "cpu"):
        if found is None:
            mix = tokenised_mixture(d, tok, resolve_model(cfg.base.model))[0]  # the trials' (cached) mixture
            metrics, found = evaluate(model, tok, mix.held_out, d.max_length)
            tracker.log_metrics({parent_metric("base", k): metrics[k] for k in (obj, obj + "_stderr") if k in metrics},
                                step=0)
            log_examples(tracker, found, 0)
            print(f"base model on the held-out examples: {obj} = {metrics.get(obj, float('nan')):.4f}"
                  f" ± {metrics.get(obj + '_stderr', float('nan')):.4f} ({time.time() - t0:.0f} s)", flush=True)
        if confirmed is None and examples:
            metrics, confirmed = evaluate_confirmation(model, tok, d, examples=examples)
            base = Tracker(tracker.tracking_uri, base_run)
            base.log_metrics(metrics, step=0)
            log_examples(base, confirmed, 0, "confirm")
    return found, confirmed
