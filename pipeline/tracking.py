"""MLflow tracking for runs: experiment with an explicit artifact location, params from the
resolved config, batched step metrics, artifacts and figures. Uses ``MlflowClient`` with an
explicit run id everywhere, so driver and Ray workers log to the same run without sharing
MLflow's process-global active-run state."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

MAX_PARAM_LEN = 6000
EXAMPLES_DIR = "examples"  # per-example tables on a run: examples/<kind>-<step>.parquet (pipeline.stats)


class TrackingError(RuntimeError):
    pass


def resolve_tracking_uri(uri: str, base_dir: Optional[Path] = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (Ray workers do not share the driver's cwd)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
    if "://" not in uri:  # a plain directory: file store
        return str(Path(uri).resolve())
    return uri


def default_artifact_root(tracking_uri: str) -> Optional[str]:
    """With sqlite, artifacts would land in ./mlruns of whatever cwd; pin them beside the db."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).read()
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        raise TrackingError(f"MLflow tracking server {tracking_uri} is unreachable: {e}") from None


class Tracker:
    def __init__(self, tracking_uri: str, run_id: Optional[str] = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    # -- runs ------------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=default_artifact_root(self.tracking_uri))

    def start_run(self, experiment: str, run_name: Optional[str], params: Mapping[str, Any],
                  tags: Optional[Mapping[str, str]] = None, parent_run_id: Optional[str] = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    def find_trial_run(self, experiment: str, trial_id: str, parent_run_id: Optional[str]) -> Optional[str]:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        query = f"tags.`rlora.trial_id` = '{trial_id}'"
        if parent_run_id:
            query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
        runs = self.client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))


def run_examples(client, run_id: str, kind: Optional[str] = None) -> dict[str, Any]:
    """The latest per-example table of each kind (``heldout``, ``lmeval``) on a run, as DataFrames."""
    import tempfile

    from pipeline.stats import load_examples

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
    from pipeline.reports import pyplot, save_figure

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
