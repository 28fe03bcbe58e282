"""Tokenised training mixtures cached on disk, built once and reused by every run that asks for the
same one (the trials of a sweep, the sweep driver's base-model scoring, later sweeps).

Reading the task files, sampling the mixture and tokenising it takes a few seconds per run (the
main sweep's 5,000 examples: ~2.6 s of a trial's start-up); loading the cached file takes ~0.1 s.
The key is everything the result depends on: the data settings (tasks, caps, seed, max length),
every data file's path, size and modification time, the tokenizer's files and library versions,
and the source of the code that builds and encodes examples. Anything else changed means a new
key, never a stale mixture. Files are written under a temporary name and renamed, so concurrent
trials building the same mixture cannot read a partial one. Location: ``$RLORA_MIXTURE_DIR``, else
``$RLORA_CACHE_DIR/mixtures`` (default ``~/.cache/rlora-lab``); ``RLORA_MIXTURE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from pipeline.data import Example, data_dir
from pipeline.data.batching import Mixture, build_mixture, encode_example
from pipeline.runtime import cache_root

_CODE = ("batching.py", "encoding.py", "__init__.py", "core.py", "loaders.py", "tasks.py")  # beside this file
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("RLORA_MIXTURE_DIR") or cache_root() / "mixtures")


def _tokenizer_files(model_path: str) -> Optional[list[Path]]:
    root = Path(model_path)
    if not root.is_dir():
        return None
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith(_WEIGHTS))


def mixture_key(data, model_path: str) -> Optional[str]:
    """The cache key of ``data`` (a ``DataSection``) tokenised by the tokenizer in ``model_path``;
    None when the tokenizer is not a local directory (nothing to key it on)."""
    import tokenizers
    import transformers

    files = _tokenizer_files(model_path)
    if files is None:
        return None
    h = hashlib.sha256()

    def add(*parts) -> None:
        for p in parts:
            h.update(str(p).encode() + b"\x00")

    tasks = data.tasks if isinstance(data.tasks, str) else list(data.tasks)
    add(VERSION, json.dumps([tasks, data.train_per_task, data.eval_per_task, data.seed, data.max_length]))
    root = data_dir(data.data_dir)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        add(f.relative_to(root), st.st_size, st.st_mtime_ns)
    add(transformers.__version__, tokenizers.__version__)
    for f in files:
        add(f.name)
        h.update(f.read_bytes())
    here = Path(__file__).parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:32]


def _dump(mix: Mixture, encoded: list) -> dict:
    ex = lambda e: [e.task, e.prompt, list(e.choices), e.gold]  # noqa: E731
    return {"tasks": mix.tasks, "train": [ex(e) for e in mix.train], "held_out": [ex(e) for e in mix.held_out],
            "encoded": encoded}


def _load(obj: dict) -> tuple[Mixture, list]:
    ex = lambda r: Example(r[0], r[1], tuple(r[2]), r[3])  # noqa: E731
    mix = Mixture([ex(r) for r in obj["train"]], [ex(r) for r in obj["held_out"]], obj["tasks"])
    return mix, [(ids, labels) for ids, labels in obj["encoded"]]


def tokenised_mixture(data, tok, model_path: str) -> tuple[Mixture, list[tuple[list[int], list[int]]], bool]:
    """(mixture, its training examples encoded, whether it came from the cache)."""
    key = None if os.environ.get("RLORA_MIXTURE_CACHE", "1") == "0" else mixture_key(data, model_path)
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            mix, encoded = _load(json.loads(path.read_text()))
            return mix, encoded, True
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass  # unreadable: built again and replaced below
    mix = build_mixture(data.tasks, data.train_per_task, data.eval_per_task, data.seed, data.data_dir)
    encoded = [encode_example(tok, ex, data.max_length) for ex in mix.train]
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(_dump(mix, encoded), f)
            os.replace(tmp, path)
        except OSError:  # a read-only or full cache directory: the run goes on uncached
            pass
    return mix, encoded, False
