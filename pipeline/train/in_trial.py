"""A run trained in its sweep trial's own process (``tune.train_in_trial``): no Ray Train
controller, placement group or worker process to start, the trial's (reused) actor runs the
training function itself as rank 0 of 1.

Ray Train's own local mode (``num_workers=0``) cannot be used for this: inside a Tune trial its
``ray.train.get_context`` and ``report`` refuse to run (deprecated there in Train V2), and it keeps
no checkpoint. So this session keeps them itself: each checkpoint is copied under the run's storage
directory as ``step-NNNNNN`` (written under a temporary name, then renamed, so a directory with
that name is complete) with the metrics reported with it, the newest ``keep`` are kept, and a trial
that runs again (``--resume``, ``--retry-errored``) continues from its newest one. Every report but
the final step's also goes to Tune, as ``TuneReportCallback`` does for a Ray Train run (the trial
reports the final step itself once everything is saved).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

REPORT = "report.json"


class InProcess:
    rank, world = 0, 1

    def __init__(self, root: Path, tune_until: Optional[int], keep: int = 2):
        self.root, self.tune_until, self.keep = Path(root), tune_until, keep
        self.metrics: Optional[dict[str, Any]] = None
        self.checkpoint: Optional[Path] = None

    def get_checkpoint(self) -> Optional[Path]:
        """The newest kept checkpoint (a trial that runs again continues from it)."""
        found = sorted(self.root.glob("step-*")) if self.root.is_dir() else []
        return found[-1] if found else None

    def finished_report(self, checkpoint: Path) -> None:
        """A run that had finished: its final report once more (the trial ran again)."""
        self.report(json.loads((checkpoint / REPORT).read_text()), checkpoint=None, step=None)
        self.checkpoint = checkpoint

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path] = None, step: Optional[int] = None) -> None:
        if checkpoint is not None:
            (checkpoint / REPORT).write_text(json.dumps(metrics))
            self.checkpoint = self._persist(checkpoint, step)
        self.metrics = dict(metrics)
        if self.tune_until is not None and metrics.get("step") != self.tune_until:
            from ray import tune

            tune.report(dict(metrics))

    def _persist(self, src: Path, step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        dest, tmp = self.root / f"step-{step:06d}", self.root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return dest
