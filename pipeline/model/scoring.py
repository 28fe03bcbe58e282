"""Scoring with a causal LM: continuation log-probabilities and multiple-choice answers, batched."""

from __future__ import annotations

import copy
import inspect
import math
from collections import defaultdict

import torch

from pipeline.data import Example, content_key
from pipeline.data.encoding import encode_pair, truncate
from pipeline.model.adapters import is_prompt_learning


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_logprobs(model, tok, pairs: list[tuple[str, str]], max_length: int = 512,
                          batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum log p(continuation | context), continuation token count) for every pair."""
    device = next(model.parameters()).device
    enc = [encode_pair(tok, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))  # length-sorted batches
    out: list[tuple[float, int]] = [(0.0, 0)] * len(enc)
    was_training = model.training
    model.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ids, mask = _pad([enc[i][0] for i in idx], tok.pad_token_id, device)
        logits = token_logits(model, ids, mask)[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, i in enumerate(idx):
            seq, n_ctx = enc[i]
            start = max(n_ctx - 1, 0)
            out[i] = (logp[row, start : len(seq) - 1].sum().item(), len(seq) - n_ctx)
    model.train(was_training)
    return out


def token_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the positions of ``ids``: prompt and P-tuning (PEFT) prepend virtual tokens and
    return their logits too, which are dropped here; other models are unchanged."""
    return model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]


def _shallow_copy(cache):
    """A cache whose batch_select_indices leaves ``cache`` intact: transformers' dynamic layers
    rebind their key/value tensors on selection, so copying the layer objects is enough."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def _chunks(lengths: list[int], max_rows: int, overhead: int = 8) -> list[tuple[int, int]]:
    """Split rows sorted by decreasing length into contiguous chunks of at most ``max_rows`` rows,
    minimising padded tokens plus ``overhead`` tokens per forward (exact dynamic programme; the
    overhead is a CPU figure: a forward's fixed cost is a few tokens' worth there)."""
    best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + overhead + (end - start) * lengths[start]
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], len(lengths)
    while end:
        out.append((cut[end], end))
        end = cut[end]
    return out[::-1]


def _accepts(model, name: str) -> bool:
    """Whether the (innermost) model's forward takes ``name``; a PEFT wrapper forwards its kwargs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


@torch.no_grad()
def score_choices(model, tok, examples: list[Example], max_length: int = 512,
                  batch_size: int = 16) -> list[dict]:
    """Per-example choice scores, equal to :func:`continuation_logprobs` over every (prompt, choice)
    pair, but with one forward pass per distinct (truncated) context shared by all its choices.

    Contexts run once, left-padded (``position_ids = cumsum(mask) - 1``), ``batch_size`` per
    forward, longest first; the last position's logits score each choice's first token. Choices
    longer than one token then run their remaining tokens against the context's key/value cache,
    its rows repeated per choice, in chunks of similar continuation length (see ``_chunks``;
    right-padded, ``position_ids`` continuing the context's). Contexts are grouped by their truncated token ids (a longer
    choice leaves less room for the context), so every choice sees exactly the context the
    pairwise scorer gives it.

    Returns one dict per example, in input order: ``task``, ``example_id`` (``content_key[:16]``),
    ``choice_logprobs``, ``pred`` (argmax, first max wins), ``correct`` (1.0/0.0),
    ``gold_logprob`` and ``margin`` (gold minus the best wrong choice; ``inf`` with one choice).
    A prompt-learning PEFT model (virtual tokens: no position ids, no reusable cache) is scored pair
    by pair with :func:`continuation_logprobs` instead.
    """
    if is_prompt_learning(model):  # virtual tokens ignore position ids and a cache: pair by pair, right-padded
        return _score_pairwise(model, tok, examples, max_length, batch_size)
    groups = _context_groups(tok, examples, max_length)
    scores = [[0.0] * len(ex.choices) for ex in examples]
    contexts = sorted(groups, key=len, reverse=True)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(contexts), batch_size):
            _score_context_batch(model, tok, contexts[b : b + batch_size], groups, scores, batch_size)
    finally:
        model.train(was_training)
    return _rows(examples, scores)


def _score_pairwise(model, tok, examples: list[Example], max_length: int, batch_size: int) -> list[dict]:
    flat = [(i, j) for i, ex in enumerate(examples) for j in range(len(ex.choices))]
    lp = continuation_logprobs(model, tok, [(examples[i].prompt, examples[i].choices[j]) for i, j in flat],
                               max_length, batch_size)
    scores = [[0.0] * len(ex.choices) for ex in examples]
    for (i, j), (v, _) in zip(flat, lp):
        scores[i][j] = v
    return _rows(examples, scores)


def _context_groups(tok, examples: list[Example], max_length: int) -> dict[tuple[int, ...], list]:
    """Distinct truncated context -> [(example, choice, continuation ids still to score)]."""
    ids_of: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in ids_of:
            ids_of[text] = tok(text, add_special_tokens=False)["input_ids"]
        return ids_of[text]

    groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = defaultdict(list)
    for i, ex in enumerate(examples):
        for j, choice in enumerate(ex.choices):
            cont = ids(choice)
            if not cont:
                raise ValueError(f"empty continuation for context {ex.prompt[:40]!r}")
            ctx, cont = truncate(ids(ex.prompt), cont, max_length)
            if not ctx:  # nothing of the context fits: like the pairwise scorer, the first token is given
                ctx, cont = cont[:1], cont[1:]
            groups[tuple(ctx)].append((i, j, cont))
    return groups


def _score_context_batch(model, tok, batch: list[tuple[int, ...]], groups: dict, scores: list[list[float]],
                         batch_size: int) -> None:
    """One forward over ``batch`` (contexts, longest first, left-padded) scores every choice's first
    token; choices with more tokens go on from the contexts' key/value cache (``_score_rest``)."""
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = len(batch[0])
    ctx_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    ctx_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, ctx in enumerate(batch):
        ctx_ids[r, width - len(ctx) :] = torch.tensor(ctx)
        ctx_mask[r, width - len(ctx) :] = 1
    ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)

    pairs, pair_rows, first_tok = [], [], []  # every (example, choice) with tokens to score
    for r, ctx in enumerate(batch):
        for i, j, cont in groups[ctx]:
            if cont:
                pairs.append((i, j, cont))
                pair_rows.append(r)
                first_tok.append(cont[0])
    longer = [k for k, (_, _, cont) in enumerate(pairs) if len(cont) > 1]

    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos,
                use_cache=bool(longer), **keep_last)
    # log_softmax like the pairwise scorer (on CPU it differs from logits - logsumexp by ~1e-5)
    last = torch.log_softmax(out.logits[:, -1].float(), -1)
    first = last[torch.tensor(pair_rows, device=device), torch.tensor(first_tok, device=device)]
    for (i, j, cont), v in zip(pairs, first.tolist()):
        if len(cont) == 1:
            scores[i][j] = v
    if not longer:
        return
    past = out.past_key_values
    del out, last
    _score_rest(model, pad_id, past, ctx_mask, pairs, pair_rows, longer, first, scores, batch_size)


def _score_rest(model, pad_id: int, past, ctx_mask, pairs: list, pair_rows: list[int], longer: list[int],
                first, scores: list[list[float]], batch_size: int) -> None:
    """Choices longer than one token, longest first, in chunks of similar length (little padding):
    their remaining tokens right-padded against the context's cache, one cache row per choice."""
    device = ctx_mask.device
    longer.sort(key=lambda k: -len(pairs[k][2]))
    chunks = _chunks([len(pairs[k][2]) - 1 for k in longer], batch_size)
    for n, (lo, hi) in enumerate(chunks):
        part = longer[lo:hi]
        rows = torch.tensor([pair_rows[k] for k in part], device=device)
        cache = past if n == len(chunks) - 1 else _shallow_copy(past)
        cache.batch_select_indices(rows)  # one cache row per choice
        conts = [pairs[k][2] for k in part]
        steps = len(conts[0]) - 1
        q_ids = torch.full((len(conts), steps), pad_id, dtype=torch.long)
        q_mask = torch.zeros((len(conts), steps), dtype=torch.long)
        target = torch.zeros((len(conts), steps), dtype=torch.long)
        for k, cont in enumerate(conts):  # right-padded: pads come after every real token
            q_ids[k, : len(cont) - 1] = torch.tensor(cont[:-1])
            q_mask[k, : len(cont) - 1] = 1
            target[k, : len(cont) - 1] = torch.tensor(cont[1:])
        q_ids, q_mask, target = q_ids.to(device), q_mask.to(device), target.to(device)
        q_pos = ctx_mask.sum(-1)[rows, None] + torch.arange(steps, device=device)
        logits = model(input_ids=q_ids, attention_mask=torch.cat([ctx_mask[rows], q_mask], 1),
                       position_ids=q_pos, past_key_values=cache, use_cache=True).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        del cache, logits
        # one row of per-token log-probs summed at once, as the pairwise scorer sums its slice
        lp = torch.cat([first[torch.tensor(part, device=device), None], lp.masked_fill(q_mask == 0, 0.0)], 1)
        for k, v in zip(part, lp.sum(-1).tolist()):
            i, j, _ = pairs[k]
            scores[i][j] = v


def _rows(examples: list[Example], scores: list[list[float]]) -> list[dict]:
    results = []
    for ex, s in zip(examples, scores):
        pred = max(range(len(s)), key=s.__getitem__)
        wrong = [v for k, v in enumerate(s) if k != ex.gold]
        results.append({
            "task": ex.task,
            "example_id": content_key(ex)[:16],
            "choice_logprobs": s,
            "pred": pred,
            "correct": float(pred == ex.gold),
            "gold_logprob": s[ex.gold],
            "margin": s[ex.gold] - max(wrong) if wrong else math.inf,
        })
    return results


def choice_accuracy_by_task(model, tok, examples: list[Example], max_length: int = 512,
                            batch_size: int = 16) -> dict[str, float]:
    """Per-task accuracy: the gold choice must have the highest summed log-likelihood."""
    hits: dict[str, list[float]] = defaultdict(list)
    for row in score_choices(model, tok, examples, max_length, batch_size):
        hits[row["task"]].append(row["correct"])
    return {task: sum(v) / len(v) for task, v in hits.items()}


def answer_nll_by_task(model, tok, examples: list[Example], max_length: int = 512,
                       batch_size: int = 16) -> dict[str, tuple[float, float]]:
    """Per task (for generative tasks): the negative log-likelihood per answer token over all its
    examples' answer tokens, sum(l_i) / sum(n_i), and its standard error. The examples are the
    sampled units (their tokens are not independent), so the error is the ratio estimator's:
    sqrt(sum((l_i - R n_i)^2) / (k (k - 1))) / mean(n_i) over the k examples (nan for k = 1)."""
    import math

    scores = continuation_logprobs(model, tok, [(ex.prompt, ex.answer) for ex in examples], max_length, batch_size)
    per_task: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for ex, (lp, n) in zip(examples, scores):
        per_task[ex.task].append((-lp, n))
    out = {}
    for task, rows in per_task.items():
        k, total_n = len(rows), sum(n for _, n in rows)
        ratio = sum(nll for nll, _ in rows) / max(total_n, 1)
        se = (math.sqrt(sum((nll - ratio * n) ** 2 for nll, n in rows) / (k * (k - 1))) / (total_n / k)
              if k > 1 and total_n else math.nan)
        out[task] = (ratio, se)
    return out
