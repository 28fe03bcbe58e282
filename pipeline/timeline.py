"""Where a training run's wall time goes, from the wall-clock stamps its driver and rank-0 worker
record (``time/at/<event>``, epoch seconds, one machine's clock or NTP-synchronised nodes).

A run's phases, in order; each is the time between two consecutive stamps:

- ``driver``: run_training entered -> training about to start (config, MLflow run and logged
  model created, model path resolved)
- ``ray_train``: that -> the worker process exists (the trainer built, Train controller,
  placement group, worker actor spawn)
- ``worker_init``: worker process spawned -> the training function runs (imports, torch
  process group)
- ``model``, ``adapter`` (incl. checkpoint restore and DDP wrap), ``data`` (mixture built and
  tokenised), ``tracking`` (MLflow dataset inputs, params, tags), ``eval_at_start``
- ``loop``: training steps and periodic evals, up to the final report
- ``finish``: the final report -> fit returns (checkpoint upload, controller and workers shut down)
- ``upload``: fit returned -> the run is FINISHED (adapter copy and MLflow upload, figures)
"""

from __future__ import annotations

EVENTS = ("start", "fit", "worker_process", "enter", "model", "adapter", "data", "tracking", "loop",
          "report", "fit_end", "done")
PHASES = ("driver", "ray_train", "worker_init", "model", "adapter", "data", "tracking", "eval_at_start",
          "loop", "finish", "upload")
STARTUP = PHASES[:PHASES.index("loop")]  # everything before the first step
PREFIX = "time/at/"


def phases(stamps: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from ``{event: epoch}`` (or ``{"time/at/<event>": epoch}``); a phase whose
    stamps are missing (a run resumed by a finished Train run, an older run) is left out."""
    at = {k.removeprefix(PREFIX): float(v) for k, v in stamps.items() if k.removeprefix(PREFIX) in EVENTS}
    return {name: at[b] - at[a] for name, a, b in zip(PHASES, EVENTS, EVENTS[1:]) if a in at and b in at}


def metrics(stamps: dict[str, float]) -> dict[str, float]:
    """``time/phase/<name>_s`` for every phase, plus ``time/startup_s`` (all phases before the loop)."""
    p = phases(stamps)
    out = {f"time/phase/{k}_s": v for k, v in p.items()}
    if all(k in p for k in STARTUP):
        out["time/startup_s"] = sum(p[k] for k in STARTUP)
    return out


def startup_summary(runs: list[tuple[float | None, float | None]]) -> dict[str, float]:
    """A sweep's start-up figures from ``(started_at, startup_s)`` per trial (epoch s; ``None`` where
    not known): the median over all trials, the first trial to start (it builds the tokenised
    mixture the others then read from the cache) and the median over the later ones (what a
    warm sweep pays per trial). A trial without a start stamp (an older run) counts in the overall median only."""
    known = [(t, s) for t, s in runs if s is not None]
    out: dict[str, float] = {}
    if not known:
        return out
    import statistics

    out["sweep/trial_startup_median_s"] = statistics.median(s for _, s in known)
    ordered = sorted((t, s) for t, s in known if t is not None)
    if len(ordered) == len(known):
        out["sweep/trial_startup_first_s"] = ordered[0][1]
        if len(ordered) > 1:
            out["sweep/trial_startup_later_median_s"] = statistics.median(s for _, s in ordered[1:])
    return out
