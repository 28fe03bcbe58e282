"""Tokenising a prompt and its answer into one sequence, truncated from the left; the ignored label."""

from __future__ import annotations


def truncate(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """lm-eval's truncation: continuation capped at max_length - 1, context cut from the left to fit."""
    cont = cont[: max_length - 1]
    ctx = ctx[-(max_length - len(cont)) :] if max_length - len(cont) > 0 else []
    return ctx, cont


def encode_pair(tok, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation (context truncated from the left) and the context length."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"empty continuation for context {context[:40]!r}")
    ctx, cont = truncate(ctx, cont, max_length)
    return ctx + cont, len(ctx)


IGNORE = -100  # label of tokens the loss does not count (prompt and padding)
