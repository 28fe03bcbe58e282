"""MLflow tracking: one Tracker per run (params, metrics, artifacts, retries), names and tags."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

MAX_PARAM_LEN = 6000


EXAMPLES_DIR = "examples"  # per-example tables on a run: examples/<kind>-<step>.parquet (pipeline.stats)


# MLflow's experiment-kind tag: the UI opens a "model training" experiment on its runs, not on the
# GenAI overview (traces, latency: all empty here)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


DESCRIPTION_TAG = "mlflow.note.content"  # a run's description (markdown) in the UI


MODEL_ID_TAG = "rlora.model_id"  # the MLflow logged model holding a run's adapter


ROLE_TAG = "rlora.eval_role"  # "base": a sweep's child run that holds the base model's scores


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # experiment tags the UI reads for ?viewStateShareKey=


# the UI's global GenAI / Model-training switch (remembered per browser) set by a link's query
UI_MODEL_TRAINING = "workflowType=machine_learning"


def ui_column(kind: str, name: str) -> str:
    """A runs-table column as the MLflow UI names it: metrics.`eval/mean_acc`, params.`adapter.r`."""
    return f"{kind}.`{name}`"


class TrackingError(RuntimeError):
    pass


# what a SQL store (sqlite, PostgreSQL, MySQL, MSSQL) says when two writers insert the same unique row,
# seen by a process writing to the store directly (sqlite:///, the tests' and `make sweep`'s case).
# Through a tracking server the dataset race is an HTTP 500 that MLflow's client already retries
# itself; the experiment race is RESOURCE_ALREADY_EXISTS, matched here.
_CONFLICT_MARKERS = ("unique constraint", "integrityerror", "duplicate key", "duplicate entry",
                     "resource_already_exists")


def _is_conflict(exc: BaseException) -> bool:
    return any(m in str(exc).lower() for m in _CONFLICT_MARKERS)


def retry_on_conflict(fn, attempts: int = 4):
    """Call ``fn`` (an idempotent store write) again when a concurrent writer won a check-then-insert
    race: MLflow's SQL store looks a shared row up (a dataset by experiment, name and digest), then
    inserts it, so two trials logging the same dataset at one moment make the second insert fail on
    the unique constraint. The retry finds the row and only links it. Other errors raise at once."""
    import random

    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MlflowException or the driver's IntegrityError
            if attempt == attempts - 1 or not _is_conflict(e):
                raise
            time.sleep(random.uniform(0.01, 0.1) * (attempt + 1))


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
        """The experiment's id, created if missing (processes that create it at one moment all get it)."""
        return retry_on_conflict(lambda: self._get_or_create_experiment(name))

    def _get_or_create_experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name, artifact_location=default_artifact_root(self.tracking_uri),
                                                 tags=EXPERIMENT_KIND)
        for k, v in EXPERIMENT_KIND.items():  # one made before the project tagged them
            if k not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id

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

    def reopen(self, run_id: str) -> str:
        """Log into an existing run again (a trial run again by --resume): RUNNING, and without the
        ``error`` tag an earlier failed attempt left (``--retry-errored``)."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        if "error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "error")
        return run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, model_id: Optional[str] = None) -> None:
        """Step metrics of the run; with ``model_id`` also linked to that logged model."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        link = {"model_id": model_id, "run_id": self.run_id} if model_id else {}
        items = [Metric(k, float(v), now, step, **link) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def set_description(self, markdown: str) -> None:
        """The run's description in the MLflow UI (its note)."""
        self.client.set_tag(self.run_id, DESCRIPTION_TAG, markdown)

    def log_dataset(self, name: str, digest: str, source: str, rows: int, profile: Mapping[str, Any],
                    context: str) -> None:
        """A dataset input of the run (MLflow's own entities): what the run ``context`` ("training",
        "evaluation") used, identified by its content ``digest``; ``profile`` shows in the UI."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                     schema=None, profile=json.dumps({"num_rows": rows, **profile}))
        inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])]
        retry_on_conflict(lambda: self.client.log_inputs(self.run_id, inputs))

    def create_model(self, name: str, params: Mapping[str, Any], tags: Optional[Mapping[str, str]] = None) -> str:
        """An MLflow 3 logged model of this run (PENDING until ``finish_model``): metrics logged with
        its id are linked to it; the run's tag records it, so a restarted run reuses it."""
        existing = self.client.get_run(self.run_id).data.tags.get(MODEL_ID_TAG)
        if existing:
            return existing
        run = self.client.get_run(self.run_id)
        model = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                params={k: str(v) for k, v in params.items()},
                                                tags=dict(tags or {}), model_type="peft-adapter")
        self.client.set_tag(self.run_id, MODEL_ID_TAG, model.model_id)
        return model.model_id

    def finish_model(self, model_id: str, local_dir: str | os.PathLike, step: int) -> None:
        """Upload ``local_dir`` as the model's files, mark it READY and record it as the run's output
        (``models:/<model_id>`` loads it). Idempotent: a run finished again (a trial that --resume
        reruns after its run had ended, reusing its model) keeps its one output record."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        self.client.log_model_artifacts(model_id, str(local_dir))
        self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        outputs = self.client.get_run(self.run_id).outputs
        if not any(o.model_id == model_id for o in (outputs.model_outputs if outputs else [])):
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])

    def share_view(self, experiment_id: str, key: str, state: Mapping[str, Any]) -> str:
        """A view of the experiment's runs table (columns, expanded parents, sort order) stored the
        way the MLflow UI's "share" button stores one (an experiment tag); returns the UI route."""
        import json

        self.client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_PREFIX}{key}", json.dumps(dict(state)))
        return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{UI_MODEL_TRAINING}"

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
