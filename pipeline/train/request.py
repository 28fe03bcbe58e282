"""What the driver hands each training worker, and the per-run helpers the worker draws on: the
learning-rate schedule, each step's seed, the mixture's record on the run, the failure-test hook."""

from __future__ import annotations

import hashlib
import math
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config.run import RunConfig
from pipeline.data import content_key, data_dir

KILL_ENV = "RLORA_TEST_KILL_RANK_AT_STEP"  # "rank:step": SIGKILL that worker once (failure tests)


@dataclass(frozen=True)
class TrainRequest:
    """One run as its workers receive it (Ray Train's ``train_loop_config`` is this, as a dict)."""

    run: dict[str, Any]  # the RunConfig as JSON, validated again on the worker
    model_path: str  # the base model, resolved by the driver (an embedded one already converted)
    tracking_uri: str
    run_id: str  # the MLflow run rank 0 logs into
    model_id: Optional[str] = None  # the MLflow logged model its evaluations are linked to
    nan_metrics: dict[str, float] = field(default_factory=dict)  # reported with a diverged loss
    driver_stamps: dict[str, float] = field(default_factory=dict)  # the driver's phase stamps

    @property
    def config(self) -> RunConfig:
        return RunConfig.model_validate(self.run)


def lr_schedule(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one rank (its dropout masks). Drawn afresh every step,
    so a run resumed from a checkpoint draws exactly the masks the uninterrupted run drew, and
    ranks draw independent masks."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def log_mixture(tracker, cfg: RunConfig, mix) -> None:
    """The run's training and held-out examples as MLflow dataset inputs: named after the mixture,
    identified by a hash of their content, sourced from the data directory, counted per task."""
    name = cfg.data.tasks if isinstance(cfg.data.tasks, str) else "+".join(cfg.data.tasks)
    source = str(data_dir(cfg.data.data_dir).resolve())
    for split, examples, context in (("train", mix.train, "training"), ("held-out", mix.held_out, "evaluation")):
        digest = hashlib.sha256("\n".join(sorted(content_key(e) for e in examples)).encode()).hexdigest()[:16]
        tracker.log_dataset(f"{name}/{split}", digest, source, len(examples),
                            {"per_task": dict(sorted(Counter(e.task for e in examples).items())),
                             "max_length": cfg.data.max_length, "seed": cfg.data.seed}, context)


def process_start() -> float:
    """When this process started (epoch seconds): the worker's spawn, before its imports."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:  # Linux without psutil: /proc
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")


def maybe_kill(rank: int, step: int, resumed: bool) -> None:
    """SIGKILL this worker at ``step`` when the failure tests ask for it (``KILL_ENV``), once."""
    spec = os.environ.get(KILL_ENV)
    if spec and not resumed:
        r, s = (int(x) for x in spec.split(":"))
        if r == rank and s == step:
            os.kill(os.getpid(), signal.SIGKILL)
