"""``python -m eval.run --adapter <dir | MLflow run id | none> --tasks mmlu,mmlu_continuation``

Scores the base model, or base + an R-LoRA adapter, with lm-eval's ``simple_evaluate`` over
``HFLM(pretrained=<loaded model>)``. Offline (the default, ``--task-source local``) the stock
names map to this project's tasks in ``eval/tasks`` (data from the installed wheels);
``--task-source stock`` passes names straight to lm-eval for machines with the hub.
Scores are printed, written as JSON and, with ``--mlflow-run`` (or an adapter given as a
run id), logged to that MLflow run as ``mmlu/<subject>``, ``mmlu/<category>``, ``mmlu/avg``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL_NAMES = {"mmlu": "rlora_mmlu", "mmlu_continuation": "rlora_mmlu_continuation"}
CATEGORY_GROUPS = ("stem", "other", "social_sciences", "humanities")


class EvalInputError(ValueError):
    pass


def resolve_tasks(names: list[str], source: str) -> list[str]:
    if source == "stock":
        return names
    out = []
    for n in names:
        if n in LOCAL_NAMES:
            out.append(LOCAL_NAMES[n])
        elif n.startswith("rlora_"):
            out.append(n)
        else:
            raise EvalInputError(f"--tasks: {n!r} has no offline version; known: {', '.join(LOCAL_NAMES)} "
                                 "(or use --task-source stock where the hub is reachable)")
    return out


def metric_name(task: str) -> Optional[str]:
    """lm-eval task/group name -> our MLflow metric name (mmlu/avg, mmlu/stem, mmlu/anatomy, ...).
    Nested groups come back as ``parent::child``."""
    task = task.split("::")[-1]
    for stock, local in LOCAL_NAMES.items():
        for prefix in (local, stock):
            if task == prefix:
                return f"{stock}/avg"
            if task.startswith(prefix + "_"):
                rest = task[len(prefix) + 1 :]
                if stock == "mmlu" and rest.startswith("continuation"):
                    continue
                return f"{stock}/{rest}"
    return None


def flatten_scores(results: dict[str, dict]) -> dict[str, float]:
    out = {}
    for task, metrics in results.items():
        name = metric_name(task)
        acc = metrics.get("acc,none")
        if name and isinstance(acc, (int, float)):
            out[name] = float(acc)
    return out


def load_adapter_dir(adapter: str, tracking_uri: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(local adapter dir or None, MLflow run id or None)."""
    if adapter == "none":
        return None, None
    if Path(adapter).is_dir():
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise EvalInputError(f"--adapter: {adapter} has no adapter_config.json")
        return adapter, None
    if re.fullmatch(r"[0-9a-f]{32}", adapter):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        local = mlflow.artifacts.download_artifacts(run_id=adapter, artifact_path="adapter")
        return local, adapter
    raise EvalInputError(f"--adapter: {adapter!r} is neither a directory, an MLflow run id, nor 'none'")


def evaluate(model_spec: str, adapter_dir: Optional[str], tasks: list[str], limit: Optional[float],
             num_fewshot: Optional[int], batch_size: int, log_samples: bool = False) -> dict[str, Any]:
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pipeline.models import load_model

    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # one "custom kwargs" warning per task otherwise
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tok = load_model(model_spec)
    if adapter_dir:
        import rlora

        model = rlora.from_pretrained(model, adapter_dir)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=TaskManager(include_path=str(TASK_DIR)),
                                   log_samples=log_samples, bootstrap_iters=0, random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter directory, MLflow run id, or 'none' (base model)")
    ap.add_argument("--tasks", default="mmlu", help="comma-separated: mmlu, mmlu_continuation")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=float, default=None, help="examples per subtask (or a fraction)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--task-source", choices=["local", "stock"], default="local")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--mlflow-run", default=None, help="log the scores to this MLflow run")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default outputs/eval/<adapter>.json)")
    args = ap.parse_args(argv)
    from pipeline.cli import fail, user_errors

    try:
        from pipeline.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        tasks = resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.task_source)
        adapter_dir, run_from_adapter = load_adapter_dir(args.adapter, tracking_uri)
    except (EvalInputError, *user_errors()) as e:
        return fail(e)
    t0 = time.time()
    res = evaluate(args.model, adapter_dir, tasks, args.limit, args.num_fewshot, args.batch_size)
    scores = flatten_scores(res["results"])
    wall = time.time() - t0
    for k in sorted(scores):
        if k.endswith("/avg") or k.split("/")[1] in CATEGORY_GROUPS:
            print(f"{k:32s} {scores[k]:.4f}")
    print(f"({len(scores)} scores, {wall:.0f}s)")
    out = args.out or Path("outputs") / "eval" / f"{Path(args.adapter).name or 'adapter'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"adapter": args.adapter, "tasks": tasks, "limit": args.limit,
                               "num_fewshot": args.num_fewshot, "scores": scores, "wall_s": wall}, indent=2) + "\n")
    print(f"wrote {out}")
    run_id = args.mlflow_run or run_from_adapter
    if run_id:
        from pipeline.tracking import Tracker

        Tracker(tracking_uri, run_id).log_metrics(scores, step=0)
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
