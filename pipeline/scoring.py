"""Batched log-likelihood scoring of multiple-choice examples (lm-eval's ``loglikelihood``
convention: context and continuation tokenised separately, sum of continuation log-probs)."""

from __future__ import annotations

from collections import defaultdict

import torch

from pipeline.data import Example


def encode_pair(tok, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation (context truncated from the left) and the context length."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"empty continuation for context {context[:40]!r}")
    cont = cont[: max_length - 1]
    ctx = ctx[-(max_length - len(cont)) :] if max_length - len(cont) > 0 else []
    return ctx + cont, len(ctx)


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
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, i in enumerate(idx):
            seq, n_ctx = enc[i]
            start = max(n_ctx - 1, 0)
            out[i] = (logp[row, start : len(seq) - 1].sum().item(), len(seq) - n_ctx)
    model.train(was_training)
    return out


def choice_accuracy_by_task(model, tok, examples: list[Example], max_length: int = 512,
                            batch_size: int = 16) -> dict[str, float]:
    """Per-task accuracy: the gold choice must have the highest summed log-likelihood."""
    pairs = [(ex.prompt, c) for ex in examples for c in ex.choices]
    scores = continuation_logprobs(model, tok, pairs, max_length, batch_size)
    hits: dict[str, list[int]] = defaultdict(list)
    k = 0
    for ex in examples:
        s = [scores[k + j][0] for j in range(len(ex.choices))]
        k += len(ex.choices)
        hits[ex.task].append(int(max(range(len(s)), key=s.__getitem__) == ex.gold))
    return {task: sum(v) / len(v) for task, v in hits.items()}


def answer_nll_by_task(model, tok, examples: list[Example], max_length: int = 512,
                       batch_size: int = 16) -> dict[str, float]:
    """Per-task mean negative log-likelihood per answer token (for generative tasks)."""
    scores = continuation_logprobs(model, tok, [(ex.prompt, ex.answer) for ex in examples], max_length, batch_size)
    tot: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ex, (lp, n) in zip(examples, scores):
        tot[ex.task][0] -= lp
        tot[ex.task][1] += n
    return {task: s / max(n, 1) for task, (s, n) in tot.items()}
