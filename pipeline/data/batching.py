"""Training data for a run: capped multi-task mixture, answer-only labels, length-aware batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.data import TASKS, Example, content_key, resolve_tasks, task_splits
from pipeline.data.encoding import IGNORE, encode_pair


@dataclass
class Mixture:
    train: list[Example]
    held_out: list[Example]
    tasks: list[str]

    def counts(self) -> dict[str, int]:
        out = {}
        for ex in self.train:
            out[f"train/{ex.task}"] = out.get(f"train/{ex.task}", 0) + 1
        for ex in self.held_out:
            out[f"held_out/{ex.task}"] = out.get(f"held_out/{ex.task}", 0) + 1
        return out


def _task_sample(name: str, train_per_task: int, eval_per_task: int, seed: int, root):
    """(training sample, held-out sample, the task's held-out split) of one task."""
    tr, ho = task_splits(name, root)
    rng = random.Random(f"{seed}:{name}")
    return rng.sample(tr, min(train_per_task, len(tr))), rng.sample(ho, min(eval_per_task, len(ho))), ho


def build_mixture(tasks, train_per_task: int, eval_per_task: int, seed: int = 0, root=None) -> Mixture:
    """Per task: a seeded sample of at most ``train_per_task`` training and ``eval_per_task``
    held-out examples. Deterministic for a given seed, on every worker."""
    names = resolve_tasks(tasks)
    train, held = [], []
    for name in names:
        tr, ho, _ = _task_sample(name, train_per_task, eval_per_task, seed, root)
        train += tr
        held += ho
    return Mixture(train, held, names)


def confirmation_examples(data) -> list[Example]:
    """The confirmation split of a run's data section (``data.confirm_per_task`` per choice task): a
    seeded sample of the task's held-out split without the examples the run is evaluated on
    (``build_mixture``'s held-out sample, the sweep's selection split) and without any example
    whose text is one of them. Training data never contains held-out text (``task_splits``), so
    the three are disjoint. Empty when ``confirm_per_task`` is 0."""
    out: list[Example] = []
    if not data.confirm_per_task:
        return out
    for name in resolve_tasks(data.tasks):
        if not is_choice_task(name):  # scored by answer NLL: no per-example outcome to pair
            continue
        _, selection, pool = _task_sample(name, data.train_per_task, data.eval_per_task, data.seed, data.data_dir)
        taken = {content_key(e) for e in selection}
        rest = [e for e in pool if content_key(e) not in taken]
        out += random.Random(f"{data.seed}:{name}:confirm").sample(rest, min(data.confirm_per_task, len(rest)))
    return out


def encode_example(tok, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Ids of prompt+answer+EOS; labels mask the prompt so the loss is on answer tokens only."""
    ids, n_ctx = encode_pair(tok, ex.prompt, ex.answer, max_length - 1)
    ids = ids + [tok.eos_token_id]
    return ids, [IGNORE] * n_ctx + ids[n_ctx:]


class LengthAwareBatches:
    """Endless, seeded stream of batches of similar length. All ranks draw the same global
    sequence of batches; rank r takes batches r, r+W, r+2W, ... (W = world size)."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int = 0, pool_batches: int = 32):
        if not encoded:
            raise ValueError("no training examples")
        self.encoded, self.batch_size, self.pad_id = encoded, batch_size, pad_id
        self.seed, self.pool = seed, pool_batches

    def _global(self) -> Iterator[list[int]]:
        epoch = 0
        n = len(self.encoded)
        while True:
            rng = random.Random(f"{self.seed}:{epoch}")
            order = list(range(n))
            rng.shuffle(order)
            batches = []
            chunk = self.batch_size * self.pool
            for i in range(0, n, chunk):
                pool = sorted(order[i : i + chunk], key=lambda j: len(self.encoded[j][0]))
                batches += [pool[k : k + self.batch_size] for k in range(0, len(pool), self.batch_size)]
            rng.shuffle(batches)
            yield from (b for b in batches if len(b) == self.batch_size or n < self.batch_size)
            epoch += 1

    def for_rank(self, rank: int, world: int, skip_steps: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for i, idx in enumerate(self._global()):
            if i % world != rank or i // world < skip_steps:
                continue
            yield self.collate(idx)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.encoded[j] for j in idx]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, l) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, : len(l)] = torch.tensor(l)
            mask[r, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def is_choice_task(task: str) -> bool:
    return TASKS[task].kind == "choice"
