"""Evaluation workers: the base model is loaded once per worker and adapters are swapped on it.

``Evaluator`` scores one job (the base model, or base + one adapter) with
``lm_eval.simple_evaluate(HFLM(pretrained=<loaded model>))``. An adapter is attached with PEFT,
evaluated, then unloaded again: R-LoRA never edits the base weights (its init correction is a
separate frozen term), so unloading restores the base exactly. ``evaluate_jobs`` runs many jobs
in parallel as Ray actors, one per GPU or per CPU slot, with a progress bar over jobs; a job that
fails is reported with its error and the others still run.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from eval.results import flatten_scores, lmeval_examples
from pipeline.model.adapters import detach, load
from pipeline.model.base import load_model
from pipeline.model.precision import autocast, load_dtype
from pipeline.runtime import ensure_ray
from pipeline.stats import mean_se

TASK_DIR = Path(__file__).parent / "tasks"
# lm-eval computes accuracy / exact-match standard errors analytically (its mean_stderr); only other
# metrics are bootstrapped, with this many draws
STDERR_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class EvalSettings:
    model: str = "smollm2-135m-instruct"
    tasks: tuple[str, ...] = ("rlora_bbh", "rlora_mmlu")  # lm-eval names (see eval.task_names.resolve_tasks)
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    gen_kwargs: Optional[str] = None  # lm-eval's override string, e.g. "max_gen_toks=256"
    seed: int = 0
    precision: str = "fp32"  # train.precision of the sweep (pipeline.model.precision)

    def signature(self) -> str:
        """Identifies what was measured; the same signature means the same numbers."""
        import hashlib
        import json

        fields = asdict(self)
        if fields["precision"] == "fp32":  # runs scored before precision existed keep their signature
            del fields["precision"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalJob:
    name: str  # "base" or a label such as the trial id
    adapter_dir: Optional[str] = None  # None: the base model; a directory, or runs:/... / models:/...
    run_id: Optional[str] = None  # the MLflow run the scores belong to
    tracking_uri: Optional[str] = None  # where runs:/ and models:/ adapters are fetched from (by the worker)
    meta: dict[str, Any] = field(default_factory=dict)
    settings: Optional[EvalSettings] = None  # this job's tasks/limit (same model); None: the evaluator's


@functools.cache
def task_manager(stock: bool = False):
    """lm-eval's task index, built once per process: the project's offline tasks only (a tenth of a
    second), or with ``stock`` lm-eval's own ~15,000 task configs beside them (indexing those takes
    about 8 s, which every eval worker would pay for tasks it never loads)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=stock)


def task_manager_for(tasks) -> Any:
    """The smallest index that knows every one of ``tasks``: the project's own, unless one is a stock name."""
    local = task_manager()
    return local if all(t in local.all_tasks for t in tasks) else task_manager(stock=True)


def _ray_gpu_ids() -> list:
    """The GPUs Ray gave this process (its share), when it is a Ray worker."""
    import sys

    ray = sys.modules.get("ray")
    return [str(g) for g in ray.get_gpu_ids()] if ray is not None and ray.is_initialized() else []


def failed(job: EvalJob, error: str, wall_s: Optional[float]) -> dict[str, Any]:
    """The result of a job that produced no scores."""
    return {"name": job.name, "run_id": job.run_id, "scores": {}, "n_samples": {}, "wall_s": wall_s, "error": error,
            "meta": job.meta}


class Evaluator:
    """Holds one base model; ``evaluate(job)`` attaches the job's adapter, scores, detaches it."""

    def __init__(self, settings: EvalSettings, device: Optional[str] = None, threads: Optional[int] = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.base, self.tok = load_model(settings.model, dtype=load_dtype(settings.precision))
        self.base.to(self.device).eval()
        self.jobs_done = 0

    def evaluate(self, job: EvalJob) -> dict[str, Any]:
        t0 = time.time()
        try:
            scores, n, examples = self._score(self._fetch(job), job.settings)
            return {"name": job.name, "run_id": job.run_id, "scores": scores, "n_samples": n, "examples": examples,
                    "wall_s": time.time() - t0, "error": None, "pid": os.getpid(), "gpu_ids": _ray_gpu_ids(),
                    "meta": job.meta}
        except Exception as e:  # one bad adapter must not cost the other jobs
            return {**failed(job, f"{type(e).__name__}: {e}", time.time() - t0),
                    "traceback": traceback.format_exc(), "pid": os.getpid()}
        finally:
            self.jobs_done += 1

    @staticmethod
    def _fetch(job: EvalJob) -> Optional[str]:
        """A local adapter directory; MLflow URIs are downloaded here, on the worker's own node."""
        if job.adapter_dir and job.adapter_dir.startswith(("runs:/", "models:/")):
            import mlflow

            return mlflow.artifacts.download_artifacts(artifact_uri=job.adapter_dir, tracking_uri=job.tracking_uri)
        return job.adapter_dir

    def _score(self, adapter_dir: Optional[str], settings: Optional[EvalSettings] = None):
        """(scores with their standard errors, questions per task, per-question table)."""
        res = self.run(adapter_dir, log_samples=True, settings=settings)
        n = {k: int(v.get("effective", v.get("original", 0))) for k, v in (res.get("n-samples") or {}).items()}
        scores, examples = flatten_scores(res["results"]), lmeval_examples(res.get("samples") or {})
        return {**pooled_stderr(scores, examples), **scores}, n, examples

    def run(self, adapter_dir: Optional[str], log_samples: bool = False,
            settings: Optional[EvalSettings] = None) -> dict[str, Any]:
        """lm-eval's full result dict for the base (+ the adapter at ``adapter_dir``)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        for name in ("lm-eval", "lm_eval"):  # one "custom kwargs" warning per task otherwise
            logging.getLogger(name).setLevel(logging.ERROR)
        model = self.base
        if adapter_dir:
            model = load(self.base, adapter_dir).to(self.device)
        try:
            model.eval()
            s = settings or self.settings
            lm = HFLM(pretrained=model, tokenizer=self.tok, batch_size=s.batch_size, device=self.device)
            with autocast(s.precision, self.device):
                return lm_eval.simple_evaluate(
                    model=lm, tasks=list(s.tasks), num_fewshot=s.num_fewshot, limit=s.limit, gen_kwargs=s.gen_kwargs,
                    task_manager=task_manager_for(s.tasks), log_samples=log_samples,
                    bootstrap_iters=STDERR_BOOTSTRAP_ITERS, random_seed=s.seed, numpy_random_seed=s.seed,
                    torch_random_seed=s.seed, fewshot_random_seed=s.seed)
        finally:
            if adapter_dir:
                self.base = detach(model, self.base)  # the adapter layers out, the untouched base modules back


def pooled_stderr(scores: dict[str, float], examples) -> dict[str, float]:
    """``<family>/avg_stderr`` from the per-question table where lm-eval gives none (it reports N/A
    for a group as soon as one subtask has a single question): sd / sqrt(N) over the family's pooled
    questions, the standard error of its size-weighted average treated as one sample."""
    out = {}
    if examples is None or not len(examples):
        return out
    families = examples["task"].str.split("/").str[0]
    for family in families.unique():
        key = f"{family}/avg"
        if key in scores and f"{key}_stderr" not in scores:
            se = mean_se(examples.loc[families == family, "correct"].to_numpy())[1]
            if se == se:  # not nan
                out[f"{key}_stderr"] = se
    return out


def merge_results(results: list[dict]) -> list[dict]:
    """Results of (model, task family) units -> one result per model (by job name, first-seen
    order): scores and question counts united, per-question tables concatenated, wall time
    summed; any failed unit fails the model, with every unit's error."""
    import pandas as pd

    merged: dict[str, dict] = {}
    for r in results:
        m = merged.setdefault(r["name"], {**r, "scores": {}, "n_samples": {}, "examples": [], "wall_s": 0.0,
                                          "error": None})
        m["scores"].update(r.get("scores") or {})
        m["n_samples"].update(r.get("n_samples") or {})
        if r.get("examples") is not None:
            m["examples"].append(r["examples"])
        m["wall_s"] += r.get("wall_s") or 0.0
        if r.get("error"):
            m["error"] = f"{m['error']}; {r['error']}" if m["error"] else r["error"]
    for m in merged.values():
        m["examples"] = pd.concat(m["examples"], ignore_index=True) if m["examples"] else None
    return list(merged.values())


def eval_slots(use_gpu: bool, cpus_per_worker: int, gpus_per_worker: float = 1.0) -> int:
    """Eval actors the cluster holds at once: CPU slots, and on GPUs also GPU shares (the fewer)."""
    import ray

    res = ray.cluster_resources()
    slots = int(res.get("CPU", 1)) // cpus_per_worker
    if use_gpu:
        slots = min(slots, int(res.get("GPU", 0) / gpus_per_worker + 1e-9))
    return max(slots, 1)


def evaluate_jobs(settings: EvalSettings, jobs: list[EvalJob], max_workers: Optional[int] = None,
                  cpus_per_worker: int = 1, use_gpu: Optional[bool] = None, progress: bool = True,
                  gpus_per_worker: float = 1.0, stop=None) -> list[dict]:
    """Run ``jobs`` on Ray actors (each loads the base model once) and return their results in job order.
    ``stop`` (a ``threading.Event``): once set, the actors are killed and the jobs not finished are
    returned as failed ("cancelled"), so a caller in another thread can abandon the work."""
    import ray
    import torch
    from tqdm.auto import tqdm

    if not jobs:
        return []
    ensure_ray()
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    n_workers = min(len(jobs), max_workers or eval_slots(use_gpu, cpus_per_worker, gpus_per_worker))
    actor_cls = ray.remote(Evaluator).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker if use_gpu else 0)

    def spawn():  # on a GPU share the actor uses CUDA if its torch has it (else the CPU, as on logical GPUs)
        return actor_cls.remote(settings, None if use_gpu else "cpu", cpus_per_worker)

    actors = [spawn() for _ in range(n_workers)]
    results: list[Optional[dict]] = [None] * len(jobs)
    pending: dict[Any, tuple[int, Any]] = {}
    queue = list(range(len(jobs)))
    bar = tqdm(total=len(jobs), desc=f"eval ({n_workers} worker{'s' if n_workers > 1 else ''})", unit="model×family",
               disable=not progress)
    try:
        for actor in actors:
            if queue:
                i = queue.pop(0)
                pending[actor.evaluate.remote(jobs[i])] = (i, actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if stop is None else 1.0)
            if stop is not None and stop.is_set():
                for k in [*queue, *(i for i, _ in pending.values())]:
                    results[k] = failed(jobs[k], "cancelled", None)
                break
            if not done:
                continue
            i, actor = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except Exception as e:  # the actor died (out of memory, killed): record it, keep going
                results[i] = failed(jobs[i], f"{type(e).__name__}: {str(e).splitlines()[0]}", None)
                if queue:  # a replacement only if there is work left for it
                    actor = spawn()
                    actors.append(actor)
            bar.update(1)
            bar.set_postfix_str(f"{jobs[i].name} {'failed' if results[i]['error'] else 'done'}")
            if queue:
                j = queue.pop(0)
                pending[actor.evaluate.remote(jobs[j])] = (j, actor)
            else:  # nothing left for it: free its slot now for whoever waits (the stage beside its tail, a trial)
                ray.kill(actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return results  # type: ignore[return-value]
