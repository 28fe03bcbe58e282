"""The stages a sweep hands over to after its trials, found through the ``rlora_lab.post_sweep``
entry points (``pyproject.toml``): ``eval`` (the eval stage, ``eval.stage:EvalStage``) and
``eval_tail`` (its head start in the sweep's tail). ``pipeline/`` never imports ``eval/``, which
builds on it: imports go one way, and the sweep finds its later stages by name."""

from __future__ import annotations

from pipeline.config.loading import ConfigError

POST_SWEEP = "rlora_lab.post_sweep"  # entry-point group of the stages run after a sweep (pyproject.toml)
TAIL_ENTRY = "eval_tail"  # the eval stage's head start in the sweep's tail


class PostSweepError(RuntimeError):
    """The stage after a sweep failed; the sweep itself is complete and recorded."""


def find_eval_stage():
    """The eval stage (``eval.stage:EvalStage``), found through its entry point: the sweep runs it
    without importing ``eval/``, which builds on ``pipeline/`` (imports go one way)."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=POST_SWEEP, name="eval"))
    if not found:
        raise ConfigError(f"eval.enabled: no '{POST_SWEEP}' entry point named 'eval' is installed "
                          "(pip install -e . in the project), or set eval.enabled: false")
    return found[0].load()
