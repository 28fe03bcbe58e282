"""A trial does nothing that lasts until Tune's saved experiment state names it.

Tune saves its experiment state (the trials it knows: what ``--resume`` restores) every
``TUNE_GLOBAL_CHECKPOINT_S`` seconds, at least 10 s by default. A trial that had created its MLflow
child run or a checkpoint before that save, and then lost its driver, would be unknown to the
restored sweep: a new trial would run in its place and the lost one's child run would stay
RUNNING. So the sweep's driver saves every ``SAVE_PERIOD_S`` seconds (unless the user set that
variable) and a trial waits, before its first side effect, until a saved state file lists its id
(``await_recorded``); the wait mostly overlaps the trial actor's own start-up.
"""

from __future__ import annotations

import json
import os
import sys
import time

PERIOD_VAR = "TUNE_GLOBAL_CHECKPOINT_S"
SAVE_PERIOD_S = "1"


def save_often() -> None:
    """In the driver, before the Tuner is built: Tune reads the period when its controller starts."""
    os.environ.setdefault(PERIOD_VAR, SAVE_PERIOD_S)


def recorded(tune_dir: str, trial_id: str) -> bool:
    """Whether a saved experiment state under ``tune_dir`` (a path or a URI) lists ``trial_id``."""
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(tune_dir)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root))
    except (FileNotFoundError, OSError):  # the directory is not there yet
        return False
    for info in infos:
        name = info.base_name
        if not (name.startswith("experiment_state-") and name.endswith(".json")):
            continue
        try:
            with filesystem.open_input_stream(info.path) as f:
                trials = json.loads(f.read())["trial_data"]
        except (OSError, ValueError, KeyError):  # being copied in: read again on the next poll
            continue
        if any(json.loads(state).get("trial_id") == trial_id for state, _ in trials):
            return True
    return False


def await_recorded(tune_dir: str, trial_id: str, timeout_s: float = 120.0, poll_s: float = 0.1) -> float:
    """Block until ``recorded``; the seconds waited. After ``timeout_s`` it goes on with a warning
    (the sweep is not held up, only the guarantee for this trial is lost)."""
    t0 = time.monotonic()
    while not recorded(tune_dir, trial_id):
        if time.monotonic() - t0 > timeout_s:
            print(f"warning: trial {trial_id} is not in Tune's saved state after {timeout_s:.0f} s; if the "
                  "sweep's driver dies now, --resume will not know this trial", file=sys.stderr)
            break
        time.sleep(poll_s)
    return time.monotonic() - t0
