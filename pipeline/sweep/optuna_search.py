"""OptunaSearch for sweeps that can be resumed after a hard kill.

The Optuna study lives in its own sqlite file and commits a trial's completion at once, while
Tune's experiment state is written periodically. A driver killed in between leaves a trial that
Optuna has finished but Tune re-runs on ``--resume``; its results are already in the study, so
re-reporting them is skipped instead of failing the sweep.
"""

from __future__ import annotations

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id, result):
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            pass  # recorded before the driver died

    def on_trial_complete(self, trial_id, result=None, error=False):
        try:
            super().on_trial_complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            pass
