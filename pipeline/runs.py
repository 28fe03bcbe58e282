"""Reading a sweep's runs back from MLflow: the base model's run, per-example tables, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipeline.reports import pyplot, save_figure
from pipeline.stats import load_examples
from pipeline.tracking import EXAMPLES_DIR, ROLE_TAG, Tracker


def base_model_run(client, parent_run_id: str, model: str) -> str:
    """The sweep's child run of the base model (created on first use): its confirmation-split
    scores and the eval stage's lm-eval scores go there, beside the trials' runs."""
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'base'", max_results=1)
    if found:
        return found[0].info.run_id
    t = Tracker(client.tracking_uri)
    rid = t.start_run(client.get_experiment(parent.info.experiment_id).name, "base-model", {"model": model},
                      tags={ROLE_TAG: "base"}, parent_run_id=parent_run_id)
    t.finish("FINISHED")
    return rid


def run_examples(client, run_id: str, kind: Optional[str] = None) -> dict[str, Any]:
    """The latest per-example table of each kind (``heldout``, ``lmeval``) on a run, as DataFrames."""
    import tempfile

    latest: dict[str, str] = {}
    for a in client.list_artifacts(run_id, EXAMPLES_DIR):
        name = a.path.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or "-" not in name:
            continue
        k = name.rsplit("-", 1)[0]
        if (kind is None or k == kind) and a.path > latest.get(k, ""):
            latest[k] = a.path
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, path in latest.items():
            out[k] = load_examples(client.download_artifacts(run_id, path, tmp))
    return out


def plot_curves(tracker: Tracker, keys: list[str], path: Path, title: str = "") -> Optional[Path]:
    """One panel per metric key, from the run's metric history in MLflow."""
    plt = pyplot()

    series = {k: tracker.history(k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        xs, ys = [s for s, _ in pts], [v for _, v in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.45)
        if len(ys) > 10:  # exponential moving average on top of the raw per-step values
            ema, smooth = ys[0], []
            for y in ys:
                ema = 0.9 * ema + 0.1 * y
                smooth.append(ema)
            ax.plot(xs, smooth, lw=1.6, color="C1", label="EMA 0.9")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def parent_metric(role: str, metric: str) -> str:
    """A parent-run metric in the ``sweep/`` chart section (``sweep/best_eval_mean_acc``): the chart
    view groups metrics by their prefix, and sections of one parent-only value each would come
    before the trials' ``eval/...`` section that people compare."""
    return f"sweep/{role}_{metric.replace('/', '_')}"
