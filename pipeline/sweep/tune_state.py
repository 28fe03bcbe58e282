"""A trial does nothing that lasts until Tune's saved experiment state names it.

Tune saves its experiment state (the trials it knows: what ``--resume`` restores) every
``TUNE_GLOBAL_CHECKPOINT_S`` seconds, at least 10 s by default. A trial that had created its MLflow
child run or a checkpoint before that save, and then lost its driver, would be unknown to the
restored sweep: a new trial would run in its place and the lost one's child run would stay
RUNNING. So the sweep's driver saves every second (5 s on remote storage, unless the user set that
variable) and a trial waits, before its first side effect, until a saved state file lists its id
(``await_recorded``), which counts in the trial's ``driver`` start-up phase.
"""

from __future__ import annotations

import json
import os
import sys
import time

PERIOD_VAR = "TUNE_GLOBAL_CHECKPOINT_S"
SAVE_PERIOD_S = {"local": "1", "remote": "5"}  # each save is uploaded whole to remote storage


def _remote(tune_dir: str) -> bool:
    return "://" in tune_dir and not tune_dir.startswith("file://")


def save_often(tune_dir: str) -> None:
    """In the driver, before the Tuner is built: Tune reads the period when its controller starts."""
    os.environ.setdefault(PERIOD_VAR, SAVE_PERIOD_S["remote" if _remote(tune_dir) else "local"])


def recorded(tune_dir: str, trial_id: str, filesystem=None) -> bool:
    """Whether a saved experiment state under ``tune_dir`` (a path or a URI) lists ``trial_id``."""
    from pyarrow import fs as pafs

    filesystem, root = (filesystem, tune_dir) if filesystem else pafs.FileSystem.from_uri(tune_dir)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root))
    except OSError:  # not there yet (FileNotFoundError), or a network hiccup: asked again
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


def await_recorded(tune_dir: str, trial_id: str, timeout_s: float = 120.0) -> float:
    """Block until ``recorded``; the seconds waited. After ``timeout_s`` it goes on with a warning
    (the sweep is not held up, only the guarantee for this trial is lost)."""
    from pyarrow import fs as pafs

    t0 = time.monotonic()
    poll_s = 0.5 if _remote(tune_dir) else 0.1
    filesystem, root = pafs.FileSystem.from_uri(tune_dir)
    while not recorded(root, trial_id, filesystem):
        if time.monotonic() - t0 > timeout_s:
            print(f"warning: trial {trial_id} is not in Tune's saved state after {timeout_s:.0f} s "
                  f"({PERIOD_VAR}={os.environ.get(PERIOD_VAR, 'unset')}); if the sweep's driver dies now, "
                  "--resume will not know this trial", file=sys.stderr)
            break
        time.sleep(poll_s)
    return time.monotonic() - t0
