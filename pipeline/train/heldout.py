"""Held-out scoring during training: the selection split each eval step, the confirmation split at the end."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.stats import EXAMPLE_COLUMNS, examples_file, save_examples, score_metrics
from pipeline.tracking import EXAMPLES_DIR


def score_held_out(model, tok, examples, max_length: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Per-example outcomes of the multiple-choice held-out examples, scored in shards over the
    ``world`` DDP ranks (rank r takes examples r, r+W, ...) and gathered in input order on every rank."""
    from pipeline.model.scoring import score_choices  # lazy: loads torch

    rows = score_choices(model, tok, examples[rank::world], max_length)
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    out: list = [None] * len(examples)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def evaluate(model, tok, held_out, max_length: int, rank: int = 0, world: int = 1):
    """(metrics, per-example table or None). Every rank must call it (the scoring is sharded);
    metrics are per-task accuracy, margin and gold log-prob with standard errors, their macro
    means (``eval/mean_acc`` ...), answer NLL of generative tasks and head similarity."""
    import pandas as pd

    from pipeline.data.batching import is_choice_task  # lazy: loads torch
    from pipeline.model.scoring import answer_nll_by_task  # lazy: loads torch
    from rlora.analysis import head_similarity, similarity_summary  # lazy: loads peft, torch

    choice = [e for e in held_out if is_choice_task(e.task)]
    gen = [e for e in held_out if not is_choice_task(e.task)]
    out: dict[str, float] = {}
    table = None
    if choice:
        rows = score_held_out(model, tok, choice, max_length, rank, world)
        table = pd.DataFrame([{c: r[c] for c in EXAMPLE_COLUMNS} for r in rows], columns=list(EXAMPLE_COLUMNS))
        out.update(score_metrics(table, prefix="eval"))
    if gen and rank == 0:
        for t, (nll, se) in answer_nll_by_task(model, tok, gen, max_length).items():
            out.update({f"eval/{t}/answer_nll": nll, f"eval/{t}/answer_nll_stderr": se})
    if rank == 0:
        sims = head_similarity(model)
        if sims:
            out.update(similarity_summary(sims))
    return out, table


def evaluate_confirmation(model, tok, data, rank: int = 0, world: int = 1, examples=None):
    """(``confirm/...`` metrics, per-example table) on the run's confirmation split
    (``pipeline.data.batching.confirmation_examples``), or ({}, None) where it has none. Scored once, at
    the end of training: nothing that trains, stops or ranks a trial ever sees these scores."""
    import pandas as pd

    from pipeline.data.batching import confirmation_examples  # lazy: loads torch

    examples = confirmation_examples(data) if examples is None else examples  # (built once by a caller that has them)
    if not examples:
        return {}, None
    rows = score_held_out(model, tok, examples, data.max_length, rank, world)
    table = pd.DataFrame([{c: r[c] for c in EXAMPLE_COLUMNS} for r in rows], columns=list(EXAMPLE_COLUMNS))
    return score_metrics(table, prefix="confirm"), table


def log_examples(tracker, table, step: int, kind: str = "heldout") -> None:
    if tracker is None or table is None:
        return

    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(save_examples(table, Path(tmp) / examples_file(kind, step)), EXAMPLES_DIR)
